"""Benchmarks of the pipeline against its limits: `make bench` (writes bench/results.json).

Every row is a ratio measured side by side in this one process (absolute times drift on shared
machines), with medians over repeats, its target and the settings used. Rows:
extraction efficiency, loader headroom (Zarr and WebDataset) and stall, cached vs online
training, store size, demo wall time, the demo's PSNR gain over seeds, the WebDataset tile
codecs (decode rate per process, bytes over PNG) and demo training on the CPU alone and two
side by side (steps/s), and CLIP extraction in fp32 against `--encoder-dtype bf16`.
`--only codec,cpu,encoders` runs just the last three.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu import WAITS, train_rates  # noqa: E402
from common.log import quiet  # noqa: E402
from common.runtime import cpu_count, tune_allocator  # noqa: E402
from pipeline.encoders import build_encoder  # noqa: E402
from pipeline.extract import FeaturesConfig, build_features  # noqa: E402
from pipeline.sources import _demo_image, read_image  # noqa: E402
from pipeline.targets import build_target  # noqa: E402
from ptgrm.model import PTGRM, PTGRMConfig  # noqa: E402
from stores import Store  # noqa: E402
from stores.cli import Parser  # noqa: E402
from training.data import CropBatches, Split  # noqa: E402
from training.losses import charbonnier  # noqa: E402


def median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(a, b, repeats: int) -> tuple[float, float]:
    """Median times of a and b, run alternately so that drifting machine speed hits both."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(median_time(a, 1))
        tb.append(median_time(b, 1))
    return statistics.median(ta), statistics.median(tb)


def row(name, value, target, unit, settings, **extra) -> dict:
    ok = (
        None
        if target is None
        else (value >= target[1] if target[0] == ">=" else value <= target[1])
    )
    return {
        "row": name,
        "value": value,
        "unit": unit,
        "target": None if target is None else f"{target[0]} {target[1]}",
        "meets_target": ok,
        "settings": settings,
        **extra,
    }


# -- 1. extraction efficiency -------------------------------------------------------------------
def make_folder(root: Path, n: int, size: int) -> Path:
    """A clean-image dataset (test split) of n size x size tiles cut from the demo photos."""
    from PIL import Image

    folder = root / "benchdata" / "test"
    folder.mkdir(parents=True)
    photos = [
        _demo_image(p) for p in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")
    ]
    for i in range(n):
        img = photos[i % len(photos)]
        y = (i * 37) % (img.shape[0] - size)
        x = (i * 53) % (img.shape[1] - size)
        Image.fromarray(img[y : y + size, x : x + size]).save(folder / f"{i:04d}.png")
    return root / "benchdata"


def random_restormer(path: Path) -> Path:
    """A Restormer-size (26 M parameters) deblurring network with random weights, saved."""
    from pipeline.networks import restormer_config
    from pipeline.restormer import Restormer

    torch.manual_seed(0)
    torch.save({"params": Restormer(**restormer_config("deblur")).state_dict()}, path)
    return path


def bench_extraction(tmp: Path, n: int, size: int) -> dict:
    data = make_folder(tmp, n, size)
    ckpt = random_restormer(tmp / "restormer.pth")
    cfg = dict(
        task="denoise",
        data=str(data),
        target="restormer-deblur",
        target_weights=str(ckpt),
        encoder="clip-vit-b32",
        splits=("test",),
        allow_random_weights=True,
        shard_len=8,
    )
    target = build_target("restormer-deblur", str(ckpt))
    encoder = build_encoder("clip-vit-b32", allow_random=True)
    images = [
        read_image(p)[0] for p in sorted((data / "test").glob("*.png"))
    ]  # as extraction reads them

    def bare():  # the frozen forward passes alone: target per image, encoder in batches of 8
        for img in images:
            target(img.astype(np.float32) / 255, {})
        for k in range(0, len(images), 8):
            encoder(images[k : k + 8])

    def end_to_end():
        root = tmp / f"stores-{time.monotonic_ns()}"
        with quiet():
            build_features(FeaturesConfig(store_root=str(root), **cfg))
        shutil.rmtree(root)

    end_to_end()  # warm-up (first-call caches of the libraries)
    t_bare, t_e2e = interleaved(bare, end_to_end, 2)
    return row(
        "extraction_efficiency",
        t_bare / t_e2e,
        (">=", 0.90),
        "ratio",
        {
            "images": n,
            "size": size,
            "target": "restormer-deblur (26 M, random weights)",
            "encoder": "clip-vit-b32 (random weights)",
            "threads": torch.get_num_threads(),
        },
        images_per_s_end_to_end=n / t_e2e,
        images_per_s_bare=n / t_bare,
    )


def bench_encoders(size: int, batch: int = 8) -> list[dict]:
    """images/s of each built-in encoder alone (g for 4 flips per image), as extraction calls it."""
    from bench.gpu import encoder_rate

    out = []
    for name in ("clip-vit-b32", "effnet-lite0"):
        r = encoder_rate(name, torch.device("cpu"), batch, size, 3)
        out.append(
            row(
                f"extraction_encoder[{name}]",
                r["images_per_s"],
                None,
                "images/s",
                {
                    "batch": batch,
                    "size": size,
                    "weights": r["weights"],
                    "dim": r["dim"],
                    "threads": torch.get_num_threads(),
                },
            )
        )
    return out


def bench_encoder_dtypes(size: int, batch: int = 8, repeats: int = 3) -> list[dict]:
    """CLIP ViT-B/32 (random weights) as extraction calls it in fp32 and in `--encoder-dtype bf16`,
    run alternately; with bf16's speed-up and its g's least cosine similarity to fp32's."""
    encs = {d: build_encoder("clip-vit-b32", allow_random=True, dtype=d) for d in ("fp32", "bf16")}
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
    g = {d: e(images) for d, e in encs.items()}  # warm-up, and the values compared
    t32, t16 = interleaved(lambda: encs["fp32"](images), lambda: encs["bf16"](images), repeats)
    settings = {
        "batch": batch,
        "size": size,
        "weights": "random",
        "threads": torch.get_num_threads(),
    }
    cos = float((g["fp32"] * g["bf16"]).sum(-1).min())  # both L2-normalised
    return [
        row("extraction_encoder_dtype[clip-vit-b32,fp32]", batch / t32, None, "images/s", settings),
        row(
            "extraction_encoder_dtype[clip-vit-b32,bf16]",
            batch / t16,
            None,
            "images/s",
            settings,
            speedup_over_fp32=t32 / t16,
            min_cosine_to_fp32=cos,
        ),
    ]


# -- 2. loader headroom and stall ---------------------------------------------------------------
def train_step_time(split, crop: int, batch: int, steps: int = 8) -> float:
    torch.manual_seed(0)
    model = PTGRM(PTGRMConfig(osf_dim=split.info()["osf_dim"]))
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    batches = CropBatches(split, crop, batch, 0, steps)
    data = [batches[s] for s in range(steps)]

    def step(b):
        loss = charbonnier(model(b["base"], b["lq"], b["g"]), b["gt"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(data[0])
    return median_time(lambda: [step(b) for b in data[1:]], 1) / (steps - 1)


def loader_time(split, crop: int, batch: int, steps: int = 30) -> float:
    batches = CropBatches(split, crop, batch, 1, steps)
    batches[0]
    return median_time(lambda: [batches[s] for s in range(steps)], 3) / steps


def bench_loader(train_store: Path, tmp: Path, crop: int, batch: int) -> list[dict]:
    from stores.wds import export_wds
    from training.wds_data import WdsBatches, WdsSplit

    zarr_split = Split.open(train_store, None, None)
    with quiet():
        wds_split = WdsSplit.open(export_wds(train_store, out=tmp, min_shards=4), None, None)
    t_step = train_step_time(zarr_split, crop, batch)
    rows = []
    for name, split in (("zarr", zarr_split), ("wds", wds_split)):
        if name == "wds":  # streamed: the time per batch of a running stream
            stream = iter(WdsBatches(split, crop, batch, 1, 0, 10**6, streams=4, buffer=64))
            next(stream)
            t_load = median_time(lambda: [next(stream) for _ in range(30)], 3) / 30
        else:
            t_load = loader_time(split, crop, batch)
        rows.append(
            row(
                f"loader_headroom_{name}",
                t_step / t_load,
                (">=", 3.0),
                "ratio",
                {"crop": crop, "batch": batch, "workers": 0},
                samples_per_s_loader=batch / t_load,
                samples_per_s_training=batch / t_step,
            )
        )
    return rows


def bench_stall(run_dir: Path) -> dict:
    rows = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    return row(
        "data_stall_fraction",
        rows[-1]["data_wait_frac"],
        ("<=", 0.05),
        "fraction of the training loop's time (evaluations, checkpoints excluded)",
        {"run": str(run_dir), "steps": rows[-1]["step"], "workers": 1},
    )


# -- 3. cached vs online training ---------------------------------------------------------------
def bench_online(split, tmp: Path, crop: int, batch: int) -> list[dict]:
    """Online = what the paper's code does: the target and CLIP run on every batch."""
    encoder = build_encoder("clip-vit-b32", allow_random=True)
    store = Store(split.path)
    meta = [json.loads(str(m)) for m in store.array("pairs", "meta")[:]]
    batches = CropBatches(split, crop, batch, 0, 8)
    data = [batches[s] for s in range(8)]
    draws = [batches.draw(s) for s in range(8)]
    t_cached = train_step_time(split, crop, batch)
    out = []
    targets = {
        "classical (wiener)": build_target("wiener"),
        "restormer-size (26 M)": build_target(
            "restormer-deblur", str(random_restormer(tmp / "r.pth"))
        ),
    }
    for name, target in targets.items():
        n = 3 if "classical" in name else 1  # the 26 M network takes seconds per batch on a CPU

        def online():
            for b, draw in zip(data[:n], draws[:n]):
                lq = (b["lq"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
                for img, (i, *_rest) in zip(lq, draw):
                    target(img.astype(np.float32) / 255, meta[i])
                encoder(list(lq))

        t_frozen = median_time(online, 1) / n
        out.append(
            row(
                f"online_over_cached_step_time[{name}]",
                (t_frozen + t_cached) / t_cached,
                None,
                "ratio",
                {"crop": crop, "batch": batch, "encoder": "clip-vit-b32 (random)"},
                seconds_per_step_cached=t_cached,
                seconds_per_step_online=t_frozen + t_cached,
            )
        )
    return out


# -- 4. store size ------------------------------------------------------------------------------
def bench_size(store_path: Path) -> dict:
    import io

    from PIL import Image

    store = Store(store_path)
    m = store.manifest()["members"]
    n = store.manifest()["n"]
    tgt, osf = store.members("targets")[0], store.members("osf")[0]

    def array_bytes(member: str, name: str) -> int:  # <member>/<size bucket>/<name>/... files
        root = store.path / member
        return sum(
            p.stat().st_size
            for p in root.rglob("*")
            if p.is_file() and name in p.relative_to(root).parts[:-1]
        )

    per = {
        name: array_bytes(member, name) / n
        for member, name in (("pairs", "lq"), ("pairs", "gt"), (tgt, "base"), (osf, "g"))
    }
    hw = store.array("pairs", "hw")[:]
    png = {}
    for field in ("lq", "gt"):
        total = 0
        for i, (h, w) in enumerate(hw):
            buf = io.BytesIO()
            Image.fromarray(store.array("pairs", field)[i, :h, :w]).save(buf, format="PNG")
            total += buf.tell()
        png[field] = total / n
    raw_base = float(np.mean([h * w * 3 * 2 for h, w in hw]))
    return row(
        "store_bytes_per_sample",
        sum(per.values()),
        None,
        "bytes",
        {"store": store_path.name, "samples": n},
        per_field=per,
        png_lq=png["lq"],
        png_gt=png["gt"],
        raw_float16_base=raw_base,
        lq_vs_png=per["lq"] / png["lq"],
        gt_vs_png=per["gt"] / png["gt"],
        base_vs_raw=per["base"] / raw_base,
        osf_bytes_per_sample=per["g"],
        members={k: v.get("bytes") for k, v in m.items()},
    )


# -- 4b. WebDataset tile codecs ----------------------------------------------------------------
def codec_tiles(side: int = 512) -> list[np.ndarray]:
    """side x side uint8 tiles of the demo's training photos (the ones at least `side` px both
    ways), each as gt and as the lq of two tasks (deblur's motion blur, denoise's sigma 25)."""
    from pipeline.degrade import deblur, gaussian_noise

    rng, out = np.random.default_rng(0), []
    for name in ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina"):
        img = _demo_image(name)
        h, w = img.shape[:2]
        for y in np.linspace(0, h - side, -(-h // side)).astype(int):
            for x in np.linspace(0, w - side, -(-w // side)).astype(int):
                gt = np.ascontiguousarray(img[y : y + side, x : x + side])
                out.append(gt)
                for degrade in (deblur, gaussian_noise):
                    lq = degrade(gt.astype(np.float32) / 255, rng)[0]
                    out.append(np.round(lq * 255).astype(np.uint8))
    return out


def bench_codec(repeats: int = 5) -> list[dict]:
    """Per codec: lq/gt tiles of 512 px decoded per second in this one process (as the WebDataset
    reader decodes them), with and without its per-entry sha256 check, and bytes over PNG."""
    import hashlib

    from stores.wds import CODECS, image_bytes, png_bytes
    from training.wds_data import decode_image

    tiles = codec_tiles()
    png = sum(len(png_bytes(t)) for t in tiles)
    rows = []
    for codec in CODECS:
        data = [image_bytes(t, codec) for t in tiles]
        assert all(np.array_equal(decode_image(d, codec, codec), t) for d, t in zip(data, tiles))
        c0 = time.process_time()
        decode = median_time(lambda: [decode_image(d, codec, codec) for d in data], repeats) / len(
            data
        )
        cpu = (time.process_time() - c0) / (repeats * len(data))
        checked = median_time(
            lambda: [(hashlib.sha256(d).hexdigest(), decode_image(d, codec, codec)) for d in data],
            repeats,
        ) / len(data)
        settings = {
            "tiles": len(tiles),
            "tile": "512 x 512 x 3 uint8",
            "photos": "demo train photos >= 512 px; each as gt, deblur lq, denoise (sigma 25) lq",
            "process": "one, one thread",
        }
        ok = (">=", 1000) if codec == "zstd" else None
        rows += [
            row(
                f"wds_tile_decode[{codec}]",
                1 / decode,
                ok,
                "tiles/s per process",
                settings,
                tiles_per_s_with_sha256=1 / checked,
                tiles_per_cpu_s=1 / cpu,
            ),
            row(
                f"wds_tile_bytes_over_png[{codec}]",
                sum(map(len, data)) / png,
                ("<=", 1.5) if codec == "zstd" else None,
                "ratio",
                settings,
                bytes_per_tile=sum(map(len, data)) / len(data),
            ),
        ]
    return rows


# -- 4c. demo training on the CPU, alone and two side by side (bench/cpu.py) ------------------
def bench_cpu(
    store_root: Path, tmp: Path, steps: int, waits: dict, precisions=("auto",)
) -> list[dict]:
    """The demo training's steps/s alone and, side by side, two at once (together over alone),
    for each OpenMP wait setting in `waits` (name -> environment) and each --precision."""
    rows = []
    for (wait, env), precision in ((w, p) for w in waits.items() for p in precisions):
        extra = ["--precision", precision]
        alone = train_rates(store_root, tmp / "cpu-runs", 1, steps, env, extra)[0]
        pair = train_rates(store_root, tmp / "cpu-runs", 2, steps, env, extra)
        name = wait if precision == "auto" else f"{wait},{precision}"
        settings = {
            "steps": steps,
            "waits": wait,
            "precision": precision,
            "env": env,
            "cpus": cpu_count(),
            "batch": 8,
            "crop": 96,
            "note": "steady rate from metrics.jsonl: start-up excluded",
        }
        rows += [
            row(f"cpu_training_alone[{name}]", alone, (">=", 6.0), "steps/s", settings),
            row(
                f"cpu_training_two_at_once[{name}]",
                sum(pair) / alone,
                (">=", 0.8),
                "together / alone",
                settings,
                steps_per_s_each=pair,
            ),
        ]
    shutil.rmtree(tmp / "cpu-runs", ignore_errors=True)
    return rows


# -- 5/6. demo wall time and quality ------------------------------------------------------------
def make(target: str, env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        ["make", "-s", target, *[f"{k}={v}" for k, v in env.items()]],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def bench_demo(tmp: Path, seeds: list[int], steps: int | None) -> tuple[list[dict], Path, Path]:
    env = {"TASK": "deblur", "STORE_ROOT": str(tmp / "demo-stores")}
    t_features = make("features", env)
    gains, t_train, runs = [], None, tmp / "runs"
    for seed in seeds:
        run_env = {**env, "SEED": seed, "RUN": f"bench-seed{seed}"} | (
            {"STEPS": steps} if steps else {}
        )
        t = make("train", run_env)
        t_train = t_train or t
        result = json.loads((ROOT / "runs" / f"bench-seed{seed}" / "eval.json").read_text())
        gains.append(result["psnr_refined"] - result["psnr_base"])
        shutil.copytree(ROOT / "runs" / f"bench-seed{seed}", runs / f"seed{seed}")
        shutil.rmtree(ROOT / "runs" / f"bench-seed{seed}")
    train_store = next((tmp / "demo-stores").glob("demo-train-deblur-*"))
    rows = [
        row(
            "demo_wall_time_features",
            t_features,
            None,
            "s",
            {"command": "make features TASK=deblur"},
        ),
        row(
            "demo_wall_time_train",
            t_train,
            None,
            "s",
            {"command": "make train TASK=deblur", "steps": steps},
        ),
        row(
            "demo_wall_time_two_commands",
            t_features + t_train,
            ("<=", 300),
            "s",
            {"command": "make features TASK=deblur && make train", "steps": steps},
        ),
        row(
            "demo_psnr_gain",
            float(np.mean(gains)),
            (">=", 0.2),
            "dB",
            {"seeds": seeds, "steps": steps or "default"},
            per_seed=gains,
            spread=float(np.std(gains)) if len(gains) > 1 else 0.0,
        ),
    ]
    return rows, train_store, runs / f"seed{seeds[0]}"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}"


SECTIONS = {  # --only: a section's rows (by name before any "[")
    "codec": {"wds_tile_decode", "wds_tile_bytes_over_png"},
    "cpu": {"cpu_training_alone", "cpu_training_two_at_once", "demo_wall_time_features"},
    "encoders": {"extraction_encoder_dtype"},
}


def main(argv=None) -> int:
    p = Parser(prog="python bench/run.py", description=__doc__)
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    p.add_argument("--seeds", default="0,1,2", help="demo seeds for the quality row")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of the demo runs (default: the demo's)",
    )
    p.add_argument("--extract-images", type=int, default=24)
    p.add_argument("--extract-size", type=int, default=128)
    p.add_argument(
        "--table", action="store_true", help="only print the README table of --out's results"
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated: run only these sections (codec, cpu, encoders; cpu makes "
        "the demo stores first); their rows replace their namesakes in --out, the others stay",
    )
    p.add_argument(
        "--cpu-steps", type=int, default=200, help="steps of each CPU training (alone, two at once)"
    )
    p.add_argument(
        "--cpu-waits",
        default="default",
        help=f"OpenMP wait settings to compare in the CPU rows "
        f"({', '.join(WAITS)}; comma-separated)",
    )
    p.add_argument(
        "--cpu-precisions",
        default="auto",
        help="training --precision values to compare in the CPU rows (auto, bf16, fp32; "
        "comma-separated)",
    )
    args = p.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    tune_allocator()  # as `make features` and `make train` do, so both sides of each ratio match
    started = time.time()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "complete": False,
        "rows": [],
    }

    only = {x for x in args.only.split(",") if x}
    if only - set(SECTIONS):
        p.error(
            f"--only takes {', '.join(SECTIONS)}, not {', '.join(sorted(only - set(SECTIONS)))}"
        )
    if (
        only and Path(args.out).is_file()
    ):  # the other rows of --out stay; these replace their namesakes
        old = json.loads(Path(args.out).read_text())
        replaced = set().union(*(SECTIONS[s] for s in only))
        result = {
            **old,
            "rows": [r for r in old["rows"] if r["row"].split("[")[0] not in replaced],
        }
    waits = {w: WAITS[w] for w in args.cpu_waits.split(",")}
    precisions = tuple(args.cpu_precisions.split(","))

    def record(
        rows: list,
    ) -> None:  # written after every section: an interrupted run keeps its rows
        result["rows"] += rows
        result["seconds"] = time.time() - started
        Path(args.out).write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory(prefix="bench-") as d:
        tmp = Path(d)
        if not only or "codec" in only:
            record(bench_codec())
        if not only:
            demo_rows, train_store, first_run = bench_demo(
                tmp, [int(s) for s in args.seeds.split(",")], args.steps
            )
            record(demo_rows)
        elif "cpu" in only:
            t = make("features", {"TASK": "deblur", "STORE_ROOT": str(tmp / "demo-stores")})
            record(
                [
                    row(
                        "demo_wall_time_features",
                        t,
                        None,
                        "s",
                        {"command": "make features TASK=deblur"},
                    )
                ]
            )
        if not only or "cpu" in only:
            record(bench_cpu(tmp / "demo-stores", tmp, args.cpu_steps, waits, precisions))
        if not only:
            record(bench_loader(train_store, tmp / "wds", 96, 8) + [bench_stall(first_run)])
            record([bench_size(train_store)])
            record(bench_online(Split.open(train_store, None, None), tmp, 96, 8))
            record([bench_extraction(tmp / "x", args.extract_images, args.extract_size)])
            record(bench_encoders(args.extract_size))
        if not only or "encoders" in only:
            record(bench_encoder_dtypes(args.extract_size))
    result["complete"] = True
    record([])
    print(table(result))
    print()
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    """The benchmark table of docs/benchmarks.md."""
    lines = [
        f"Measured {result['date']} on {result['machine']} (torch {result['torch']}, "
        f"{result['threads']} threads), `make bench`, {result['seconds'] / 60:.1f} min:",
        "",
        "| row | value | target | met |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        ok = {True: "yes", False: "no", None: ""}[r["meets_target"]]
        seeds = (
            f" (seeds: {', '.join(f'{v:.3f}' for v in r['per_seed'])})"
            if len(r.get("per_seed", [])) > 1
            else ""
        )
        lines.append(
            f"| {r['row']} | {r['value']:.3g} {r['unit']}{seeds} | {r['target'] or ''} | {ok} |"
        )
    return "\n".join(lines)


def table(result: dict) -> str:
    lines = [
        f"bench {result['date']} on {result['machine']} ({result['seconds'] / 60:.1f} min)",
        f"{'row':44s} {'value':>12s}  {'target':>8s}  ok",
        "-" * 74,
    ]
    for r in result["rows"]:
        ok = {True: "yes", False: "NO", None: ""}[r["meets_target"]]
        lines.append(
            f"{r['row']:44s} {r['value']:12.3f}  {r['target'] or '':>8s}  {ok}  {r['unit']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
