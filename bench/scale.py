"""Stores and loaders at real dataset sizes: `make bench-scale` (writes bench/results-scale.json).

Synthetic datasets written here (generic layout: `test/{lq,gt}/*.png`, lq = gt + noise):
    gopro     uniform 1280x720
    rain13k   mixed small sizes (8 sizes, 320-640 px sides), both orientations
    sidd      12 MP photos in two sizes (4000x3000, 4608x2592), both orientations
each at N, 2N and 4N samples. Per row: extraction wall time and images/s, the extraction's peak RSS,
store bytes (lq + gt) over the PNG bytes of the same pixels, no-op re-run time, `stores verify` time,
and the loaders' samples/s and RSS: Zarr, and streaming WDS from a local export and from S3 (the
tests' SeaweedFS server, when its binary is here). Extraction uses the `identity` target and a random
ViT-B/32 (the frozen networks are not what is measured). Then CPU sharing: one demo-sized training
alone, then two at once (steady steps/s, bench/cpu.py), with the default OpenMP waits (a bounded spin,
threads shared among the trainings) and, with --compare-spinning, with spinning ones (OMP_WAIT_POLICY=ACTIVE).
Then the no-op re-run of 2.5k and 10k tiny samples (a complete store answered from the stat cache), and
peak RSS of a mixed split: 40 crops of 256 px plus one 12 MP portrait, `make features` of three
tasks with their default targets, beside the frozen networks built alone.
Each measurement runs in its own process, started from a small launcher; peak RSS is that process's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu import WAITS, train_rates  # noqa: E402
from common.runtime import cpu_count  # noqa: E402
from stores.cli import Parser  # noqa: E402

SETS = {  # name: (sizes drawn from, N)
    "gopro": ([(720, 1280)], 12),  # N of at least 3 shards: 3 are in flight (load, compute, write)
    "rain13k": (
        [
            (320, 480),
            (480, 320),
            (400, 600),
            (600, 400),
            (384, 512),
            (512, 384),
            (360, 640),
            (640, 360),
        ],
        48,
    ),
    "sidd": (
        [(3000, 4000), (4000, 3000), (2592, 4608), (4608, 2592)],
        2,
    ),  # one 12 MP photo is a shard
}
# Extraction's memory is the frozen networks plus the shards in flight (load, compute, write). A
# shard holds --shard-len samples of one size bucket (fewer for large images), so until a dataset
# fills its shards, memory still grows with N: 20 Rain13K-like sizes made 20 buckets, and at the
# default 16 samples per shard its peak rose 14 % from 48 to 192 images (1.45 -> 1.66 GB), as its
# shards filled up; with shards of 4 the same pair rose 2 % (1.42 -> 1.45 GB). Partial shards are
# also slower per image (2.3 against 3.1 images/s), which hid the time's growth with N. The
# benchmark's datasets are small, so it uses shards of 4 and 8 Rain13K-like sizes (8 buckets): its
# N are past that point, as a real dataset's are, and the rows show what grows with N after it.
SHARD_LEN = 4


def write_set(folder: Path, sizes: list, n: int, seed: int = 0) -> int:
    """n pairs of natural-ish PNGs (smooth gradients plus texture, so PNG compresses as photos do);
    returns their PNG bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for kind in ("gt", "lq"):
        (folder / "test" / kind).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = 127 + 60 * np.sin(x / (17 + i % 7)) * np.cos(y / (23 + i % 5))
        gt = np.clip(base[..., None] + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        lq = np.clip(gt + rng.normal(0, 12, gt.shape), 0, 255).astype(np.uint8)
        for kind, img in (("gt", gt), ("lq", lq)):
            path = folder / "test" / kind / f"{i:05d}.png"
            Image.fromarray(img).save(path, compress_level=6)
            total += path.stat().st_size
    return total


LAUNCH = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"MAXRSS_KB {usage.ru_maxrss}", flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(argv: list, env: dict | None = None, mark: str | None = None):
    """(wall s, peak RSS GB, stdout) of a subprocess; with `mark`, also the seconds from the first
    stdout line holding `mark` to the end (None when none did).

    The process is started from a small launcher (LAUNCH): Linux gives an exec'd process the peak
    RSS of the memory it replaced, so a child forked (or vforked) straight from this benchmark would
    report at least the benchmark's own peak."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    lines, seen = [], None
    for line in proc.stdout:  # as they come: the mark's time is when it was printed
        lines.append(line)
        if mark and seen is None and mark in line:
            seen = time.perf_counter()
    proc.wait()
    end = time.perf_counter()
    out, _, rss = "".join(lines).rpartition("MAXRSS_KB ")
    if proc.returncode or not rss:
        raise RuntimeError(f"{argv} failed (status {proc.returncode}):\n{''.join(lines)[-2000:]}")
    if mark:
        return end - t0, int(rss.split()[0]) / 1e6, out, None if seen is None else end - seen
    return end - t0, int(rss.split()[0]) / 1e6, out


LOADER = """
import resource, sys, time
from training.data import CropBatches, Split
split = Split.open(sys.argv[1], None, None)
b = CropBatches(split, 96, 8, 0, 10 ** 6)
b[0]
t0 = time.perf_counter(); k = 0
while time.perf_counter() - t0 < 3:
    b[k]; k += 1
print(8 * k / (time.perf_counter() - t0))
"""


WDS_LOADER = """
import sys, time
from training.wds_data import WdsBatches, WdsSplit
split = WdsSplit.open(sys.argv[1])  # fewer shards than 4 streams only at tiny N
streams = min(4, len(split.shards))
it = iter(WdsBatches(split, 96, 8, 0, 0, 10 ** 6, streams=streams, buffer=64))
for _ in range(streams):  # every stream's shuffle buffer filled once
    next(it)
t0 = time.perf_counter(); k = 0
while time.perf_counter() - t0 < 3:
    next(it); k += 1
print(8 * k / (time.perf_counter() - t0))
"""


def bench_wds(tmp: Path, store: Path, s3) -> dict:
    """Streaming WebDataset loader samples/s and peak RSS, from a local export and from S3."""
    out = {}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stores",
            "export-wds",
            str(store),
            "--out",
            str(tmp),
            "--min-shards",
            "4",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    folder = tmp / f"{store.name}-wds"
    places = [("local", str(folder), None)]
    if s3 is not None:
        s3.filesystem().put(str(folder), f"bench/{folder.name}", recursive=True)
        places.append(("s3", f"s3://bench/{folder.name}", s3.env()))
    for where, url, env in places:
        _, rss, text = timed([sys.executable, "-c", WDS_LOADER, url], env)
        out[f"wds_{where}_samples_per_s"], out[f"wds_{where}_rss_gb"] = float(text.split()[-1]), rss
    shutil.rmtree(folder)
    return out


def start_s3(tmp: Path):
    """The SeaweedFS S3 server of the tests (tests/services.py) with a bucket `bench`, or None."""
    sys.path.insert(0, str(ROOT / "tests"))
    from services import SeaweedS3

    try:
        server = SeaweedS3(tmp / "seaweedfs").start()
    except Exception as e:  # no weed binary here: the S3 rows are left out
        print(f"no S3 server ({e}); WDS-from-S3 rows left out", file=sys.stderr)
        return None
    server.filesystem().mkdir("bench")
    return server


NETWORKS_ONLY = """
import resource, sys
from pipeline.extract import FeaturesConfig, build_models
build_models(FeaturesConfig(task=sys.argv[1], data="demo", **({"target": sys.argv[2]} if len(sys.argv) > 2 else {})))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
"""


def write_mixed(folder: Path, crops: int = 40, portrait=(4000, 3000)) -> None:
    """`crops` clean 256x256 crops plus one 12 MP portrait photo (generic layout, train/gt only: the
    task degrades them)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    (folder / "train" / "gt").mkdir(parents=True, exist_ok=True)
    for i in range(crops):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), np.uint8)).save(
            folder / "train" / "gt" / f"c{i:03d}.png"
        )
    h, w = portrait
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = (
        127
        + 60 * np.sin(x / 17)[..., None] * np.cos(y / 23)[..., None]
        + rng.normal(0, 6, (h, w, 3))
    )
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        folder / "train" / "gt" / "portrait.png"
    )


MIXED_TARGETS = {
    "lowlight": "gamma"
}  # the classical target these rows were measured with (lowlight now defaults to SCI)


def features_cmd(task: str) -> str:
    return f"make features TASK={task}" + (
        f" TARGET={MIXED_TARGETS[task]}" if task in MIXED_TARGETS else ""
    )


def bench_mixed(tmp: Path, tasks=("lowlight", "deblur", "denoise")) -> list:
    """Peak RSS of `make features` (each task's classical target, CLIP ViT-B/32) on small crops plus one
    12 MP portrait, and of building the frozen networks alone."""
    data = tmp / "mixed"
    write_mixed(data)
    rows = []
    for task in tasks:
        stores = tmp / f"stores-mixed-{task}"
        target = [MIXED_TARGETS[task]] if task in MIXED_TARGETS else []  # [] : the task's default
        wall, rss, _ = timed(
            [
                sys.executable,
                "-m",
                "pipeline",
                "features",
                "--task",
                task,
                "--data",
                f"generic:{data}",
                "--allow-random-weights",
                "--splits",
                "train",
                "--store-root",
                str(stores),
                *(["--target", *target] if target else []),
            ]
        )
        _, nets, out = timed([sys.executable, "-c", NETWORKS_ONLY, task, *target])
        rows.append(
            {
                "task": task,
                "extract_s": wall,
                "peak_rss_gb": rss,
                "networks_rss_gb": float(out.split()[-1]),
            }
        )
        shutil.rmtree(stores)
    shutil.rmtree(data)
    return rows


def bench_noop(tmp: Path, sizes=(2500, 10000)) -> list:
    """The no-op re-run at 2.5k and 10k samples: tiny PNG pairs (24 px), identity target and a tiny
    random OpenCLIP model (tests/conftest.py), so building the store is quick and the re-run's cost
    is the stat path alone: start-up plus (size, mtime) of every source file."""
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_clip

    clip = make_tiny_clip(Path(tempfile.mkdtemp(dir=tmp)), seed=0)
    rows = []
    for n in sizes:
        data = tmp / f"noop-{n}"
        for kind in ("gt", "lq"):
            (data / "test" / kind).mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(n):
            img = rng.integers(0, 256, (24, 24, 3), np.uint8)
            Image.fromarray(img).save(data / "test" / "gt" / f"{i:06d}.png", compress_level=1)
            Image.fromarray(img[::-1]).save(data / "test" / "lq" / f"{i:06d}.png", compress_level=1)
        args = [
            sys.executable,
            "-m",
            "pipeline",
            "features",
            "--task",
            "denoise",
            "--data",
            f"generic:{data}",
            "--target",
            "identity",
            "--encoder",
            f"openclip:{clip}",
            "--allow-random-weights",
            "--splits",
            "test",
            "--shards",
            "4",
            "--store-root",
            str(tmp / f"stores-noop-{n}"),
        ]
        build, _, _ = timed(args)
        noop, rss, out = timed(args)
        assert "nothing to compute" in out, out
        rows.append({"n": n, "build_s": build, "noop_rerun_s": noop, "noop_rss_gb": rss})
        shutil.rmtree(data)
        shutil.rmtree(tmp / f"stores-noop-{n}")
    return rows


def bench_set(tmp: Path, name: str, sizes: list, n: int, s3=None) -> dict:
    t0 = time.perf_counter()
    data = tmp / f"{name}-{n}"
    png = write_set(data, sizes, n)
    stores = tmp / f"stores-{name}-{n}"
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "features",
        "--task",
        "denoise",
        "--data",
        f"generic:{data}",
        "--target",
        "identity",
        "--encoder",
        "clip-vit-b32",
        "--allow-random-weights",
        "--splits",
        "test",
        "--store-root",
        str(stores),
        "--shard-len",
        str(SHARD_LEN),
    ]
    # extraction time: from "computing ..." (networks built, dataset listed) to the end
    wall, rss, _, compute = timed(args, mark=": computing ")
    store = next(stores.glob("*/manifest.json")).parent
    noop, _, out = timed(args)
    assert "nothing to compute" in out, out
    verify, _, _ = timed([sys.executable, "-m", "stores", "verify", str(store)])
    stored = sum(
        p.stat().st_size
        for k in ("lq", "gt")
        for p in (store / "pairs").glob(f"*/{k}/**/*")
        if p.is_file()
    )
    load_s = 0.0
    loader_rss = None
    if min(min(s) for s in sizes) >= 96:
        load_t, loader_rss, out = timed([sys.executable, "-c", LOADER, str(store)])
        load_s = float(out.split()[-1])
    wds = bench_wds(tmp, store, s3) if loader_rss is not None else {}
    shutil.rmtree(data)
    shutil.rmtree(stores)
    return {
        "set": name,
        "n": n,
        "extract_s": wall,
        "images_per_s": n / wall,
        "startup_s": wall - compute,
        "compute_s": compute,
        "compute_images_per_s": n / max(compute, 1e-9),
        "peak_rss_gb": rss,
        "store_over_png": stored / png,
        "noop_rerun_s": noop,
        "verify_s": verify,
        "zarr_loader_samples_per_s": load_s,
        "zarr_loader_rss_gb": loader_rss,
        **wds,
        "bench_s": time.perf_counter() - t0,
    }


POLICIES = {k: WAITS[k] for k in ("default", "spinning")}  # spinning: with --compare-spinning


def bench_sharing(store_root: str, steps: int, out: dict, save, policies: dict = POLICIES) -> dict:
    """Steps/s of one demo training alone and of two at once, for each OpenMP wait policy."""
    runs = Path(tempfile.gettempdir()) / "bench-share"
    out.update(
        steps=steps, note="steady steps/s from metrics.jsonl (bench/cpu.py): start-up excluded"
    )
    for policy, env in policies.items():
        alone = train_rates(Path(store_root), runs, 1, steps, env)[0]
        pair = train_rates(Path(store_root), runs, 2, steps, env)
        out[policy] = {
            "alone_steps_per_s": alone,
            "pair_steps_per_s": pair,
            "pair_over_alone": sum(pair) / alone,
        }
        save()  # an interrupted run keeps what it measured
    return out


def main(argv=None) -> int:
    p = Parser(
        prog="python bench/scale.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results-scale.json"))
    p.add_argument("--scale", type=float, default=1.0, help="multiply every set's N by this")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument(
        "--share-steps",
        type=int,
        default=150,
        help="training steps of the CPU-sharing runs (0: skip)",
    )
    p.add_argument(
        "--store-root",
        default="data/stores",
        help="where the demo stores are (make features TASK=deblur)",
    )
    p.add_argument(
        "--compare-spinning",
        action="store_true",
        help="also measure the sharing runs with spinning "
        "OpenMP waits (two at once then crawl: about 7 more minutes)",
    )
    p.add_argument(
        "--no-noop",
        dest="noop",
        action="store_false",
        help="skip the no-op re-run rows at 2.5k and 10k samples",
    )
    p.add_argument(
        "--no-mixed",
        dest="mixed",
        action="store_false",
        help="skip the peak-RSS rows of small crops plus one 12 MP portrait",
    )
    p.add_argument("--table", action="store_true", help="only print the README table of --out")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep what --out holds and replace only what this run "
        "measures (the rows of --sets, and the sections not skipped); `runs` says which run gave what",
    )
    args = p.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    sets = [x for x in args.sets.split(",") if x]
    this = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "sets": sets,
        "mixed": args.mixed,
        "noop": args.noop,
        "sharing": bool(args.share_steps),
    }
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {cpu_count()} usable CPUs",
        "load_before": os.getloadavg(),
        "rows": [],
        "complete": False,
        "runs": [this],
    }
    if args.merge and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        kept = [r for r in old.get("rows", []) if r["set"] not in sets]
        result = {
            **old,
            "load_before": os.getloadavg(),
            "complete": False,
            "runs": [*old.get("runs", []), this],
            "rows": kept,
        }
        result.pop("startup_s", None)

    began = last = time.perf_counter()
    result.setdefault("section_s", {})

    def save(section: str | None = None):
        nonlocal last
        now = time.perf_counter()
        this["wall_s"] = now - began
        if section:
            result["section_s"][section], last = now - last, now
        result["rows"].sort(key=lambda r: (list(SETS).index(r["set"]), r["n"]))
        Path(args.out).write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as d:
        if args.mixed:
            result["mixed"] = bench_mixed(Path(d))
            save("mixed")
        if args.noop:
            result["noop"] = bench_noop(Path(d))
            save("noop")
        s3 = start_s3(Path(d))
        try:
            for name in sets:
                sizes, n = SETS[name]
                n = max(1, round(n * args.scale))
                for k in (1, 2, 4):
                    result["rows"].append(bench_set(Path(d), name, sizes, n * k, s3))
                    save()
                save(name)
        finally:
            if s3 is not None:
                s3.stop()
    if args.share_steps:
        result["sharing"] = {}
        policies = POLICIES if args.compare_spinning else {"default": POLICIES["default"]}
        bench_sharing(args.store_root, args.share_steps, result["sharing"], save, policies)
        save("sharing")
    result["load_after"] = os.getloadavg()
    result["complete"] = True
    save()
    print(markdown(result))
    return 0


def checks(result: dict) -> list[tuple]:
    """The issue's acceptance rows: (what, measured, target, met)."""
    out = []
    rows = result["rows"]
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = sorted((r for r in rows if r["set"] == name), key=lambda r: r["n"])
        if len(mine) < 2:
            continue
        a, b = mine[0], mine[-1]
        k = b["n"] / a["n"]
        growth = b["compute_s"] / a["compute_s"]
        out.append(
            (
                f"{name}: extraction time N={a['n']} -> {b['n']} (after start-up)",
                f"{growth:.2f}x",
                f"{k:.0f}x within 20 %",
                abs(growth / k - 1) <= 0.2,
            )
        )
        rss = b["peak_rss_gb"] / a["peak_rss_gb"] - 1
        out.append(
            (
                f"{name}: peak RSS growth N={a['n']} -> {b['n']}",
                f"{rss:+.1%}",
                "<= +10 %",
                rss <= 0.10,
            )
        )
        out.append(
            (
                f"{name}: lq/gt store bytes over PNG",
                f"{max(r['store_over_png'] for r in mine):.2f}",
                "<= 1.5",
                max(r["store_over_png"] for r in mine) <= 1.5,
            )
        )
        wds = [
            r[k2]
            for r in mine
            for k2 in ("wds_local_rss_gb", "wds_s3_rss_gb")
            if r.get(k2) is not None
        ]
        if wds:
            out.append(
                (f"{name}: streaming WDS peak RSS", f"{max(wds):.2f} GB", "< 1 GB", max(wds) < 1.0)
            )
    noop = sorted(result.get("noop", []), key=lambda r: r["n"])
    for r in noop[
        -1:
    ]:  # the largest: at fewer samples the start-up (~0.6 s) weighs more per 10,000
        per10k = r["noop_rerun_s"] / r["n"] * 1e4
        out.append(
            (
                f"no-op re-run of {r['n']:,} samples, per 10,000 (start-up included)",
                f"{per10k:.2f} s",
                "<= 2 s",
                per10k <= 2,
            )
        )
    if len(noop) > 1:
        a, b = noop[0], noop[-1]
        slope = (b["noop_rerun_s"] - a["noop_rerun_s"]) / (b["n"] - a["n"]) * 1e4
        out.append(
            ("no-op re-run, each further 10,000 samples", f"{slope:.2f} s", "<= 2 s", slope <= 2)
        )
    for r in result.get("mixed", []):
        out.append(
            (
                f"mixed split (12 MP portrait), `{features_cmd(r['task'])}` peak RSS",
                f"{r['peak_rss_gb']:.2f} GB",
                "< 2.5 GB",
                r["peak_rss_gb"] < 2.5,
            )
        )
    sh = (result.get("sharing") or {}).get("default") or (result.get("sharing") or {}).get(
        "sleeping"
    )  # before
    if sh:
        out.append(
            (
                "two trainings side by side: together over one alone",
                f"{sh['pair_over_alone']:.0%}",
                ">= 80 %",
                sh["pair_over_alone"] >= 0.8,
            )
        )
    return out


def wds_cell(r: dict, where: str) -> str:
    rate = r.get(f"wds_{where}_samples_per_s")
    return "-" if rate is None else f"{rate:.0f} ({r[f'wds_{where}_rss_gb']:.2f})"


def markdown(result: dict) -> str:
    lines = [
        f"Measured {result['date']} on {result['machine']} (load average before/after: "
        f"{result['load_before'][0]:.1f}/{result.get('load_after', [float('nan')])[0]:.1f}), `make bench-scale`:",
        "",
        "| set | N | extract s (after start-up) | img/s (after start-up) | peak RSS GB | store/PNG | no-op s "
        "| verify s | Zarr loader samples/s | WDS local samples/s (RSS GB) | WDS S3 samples/s (RSS GB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['set']} | {r['n']} | {r['extract_s']:.1f} ({r['compute_s']:.1f}) | {r['images_per_s']:.2f} "
            f"({r['compute_images_per_s']:.2f}) | {r['peak_rss_gb']:.2f} "
            f"| {r['store_over_png']:.2f} | {r['noop_rerun_s']:.1f} | {r['verify_s']:.1f} "
            f"| {r['zarr_loader_samples_per_s']:.0f} | {wds_cell(r, 'local')} | {wds_cell(r, 's3')} |"
        )
    if result.get("mixed"):
        lines += [
            "",
            "| mixed split: 40 crops of 256 px + one 12 MP portrait | extract s | peak RSS GB "
            "| frozen networks alone GB | over the networks GB |",
            "|---|---|---|---|---|",
        ]
        for r in result["mixed"]:
            lines.append(
                f"| `{features_cmd(r['task'])}` | {r['extract_s']:.1f} | {r['peak_rss_gb']:.2f} "
                f"| {r['networks_rss_gb']:.2f} | {r['peak_rss_gb'] - r['networks_rss_gb']:.2f} |"
            )
    if result["rows"]:
        lines += [
            "",
            'Extraction times after start-up are from the process\'s "computing" line (networks built, '
            "dataset listed) to its end; start-up took "
            f"{min(r['startup_s'] for r in result['rows']):.1f}-{max(r['startup_s'] for r in result['rows']):.1f} s.",
        ]
    lines += ["", "| check | value | target | met |", "|---|---|---|---|"] + [
        f"| {name} | {value} | {target} | {'yes' if ok else 'NO'} |"
        for name, value, target, ok in checks(result)
    ]
    s = result.get("sharing")
    if s:
        lines += [
            "",
            "| CPU sharing (demo training) | alone steps/s | two at once, steps/s each | together / alone |",
            "|---|---|---|---|",
        ]
        for policy in (p for p in ("default", "sleeping", "spinning") if p in s):
            r = s[policy]
            lines.append(
                f"| {policy} OpenMP waits | {r['alone_steps_per_s']:.2f} | "
                f"{', '.join(f'{v:.2f}' for v in r['pair_steps_per_s'])} | {r['pair_over_alone']:.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
