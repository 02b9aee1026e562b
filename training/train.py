"""Stage 2: fit PTG-RM on a train store, evaluate it on the test store, write `runs/<run>/`.

Run: `python -m training train --task deblur --data demo` (what `make train` calls);
several processes: `torchrun --nproc_per_node N -m training train ...` (DDP; gloo on CPU).
Reads only the stores: no frozen network is loaded here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from contextlib import suppress
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from common.log import bars
from common.runtime import cpu_count, cpu_share, follow_cpu_share, tune_allocator
from ptgrm.model import PTGRM, PTGRMConfig, count_parameters
from stores import atomic_path, write_json_atomic
from stores.cli import setting
from stores.files import open_regular

from .data import CropBatches, Split, check_same_members, find_store
from .evaluate import evaluate, write_eval
from .losses import LOSSES, NO_REFERENCE, VGGPerceptual, zerodce_loss
from .step import Step, autocast_bf16, float_lrs, load_optimizer, make_optimizer

log = logging.getLogger(__name__)

AUTO_EVALS = 5  # test evaluations over a run when --eval-every is -1 (the PSNR curve)
SWITCHES = (
    "sve",
    "channel_attention",
    "spatial_attention",
    "position_embedding",
    "osf_mapping",
    "use_g",
)


@dataclass(frozen=True)
class TrainConfig:
    """The settings of `python -m training train|eval|...`, each one flag (stores/cli.py) with its help."""

    task: str = setting("deblur", "restoration task")
    data: str = setting("demo", "'demo' or the dataset folder given to `make features`")
    store_root: str = setting("data/stores", "where stores live")
    train_store: str | None = setting(None, "train store path (default: search --store-root)")
    test_store: str | None = setting(None, "test store path (default: search --store-root)")
    target: str | None = setting(
        None, "target member name (default: the store's only complete one)"
    )
    encoder: str = setting("clip-vit-b32", "OSF member name(s), comma-separated to concatenate")
    format: str = setting(
        "zarr",
        "read the train store as 'zarr' or as its 'wds' (WebDataset) export, streamed; "
        "--train-store may then be an export folder or URL (s3://bucket/prefix/<store>-wds)",
    )
    wds_streams: int = setting(
        4, "wds: shuffled shard streams per process; batches depend on it; --workers must divide it"
    )
    wds_buffer: int = setting(
        256,
        "wds: shuffle buffer per stream, in tiles (bounds the loader's memory: streams "
        "x buffer x tile)",
    )
    wds_buffer_mb: float = setting(
        128.0,
        "wds: MB of encoded tiles the shuffle buffers may hold in all (fewer "
        "tiles per buffer when tiles are large, at least 1)",
    )
    run: str | None = setting(None, "run name (default: the task)")
    runs_dir: str = setting("runs", "where runs are written")
    steps: int = setting(1500, "training iterations")
    batch: int = setting(8, "crops per step (global: split across DDP processes)")
    crop: int = setting(96, "crop size in px (multiple of 4)")
    lr: float = setting(1e-4, "Adam learning rate")
    lr_min: float = setting(1e-7, "cosine floor")
    seed: int = setting(0, "seed of initialisation and data order")
    ablate: str = setting(
        "",
        "comma-separated model parts to turn off (the paper's Table 3): sve, "
        "channel_attention, spatial_attention, position_embedding, osf_mapping, use_g",
    )
    output: str = setting("code", "'code' (clamp(base)+I_r) or 'eq1' (paper's Eq. 1)")
    loss: str = setting(
        "charbonnier",
        "'charbonnier' (on the ground truth) or a no-reference loss that needs "
        "none: 'zerodce' (ZeroDCE's spatial consistency, exposure, colour constancy, and smoothness "
        "of PTG-RM's correction) or 'sci' (SCI's fidelity + smoothness on the illumination lq / "
        "refined; its minimum is a white image); docs/training.md",
    )
    exposure: float = setting(
        0.6,
        "--loss zerodce: the exposure level E, the mean intensity asked of each 16x16 "
        "patch (ZeroDCE's authors use 0.6)",
    )
    perceptual: float = setting(
        0.0, "weight of the VGG19 perceptual loss (paper: 0.1; needs --vgg-weights)"
    )
    vgg_weights: str | None = setting(
        None,
        "torchvision VGG19 ImageNet weights (vgg19-dcbb9e9d.pth, or a "
        ".safetensors of its features.* tensors)",
    )
    device: str = setting("auto", "'auto' (a CUDA GPU when visible), 'cpu' or 'cuda[:i]'")
    compile: bool = setting(False, "torch.compile the model")
    compile_mode: str = setting(
        "default",
        "torch.compile mode with --compile: default, reduce-overhead (CUDA graphs) or max-autotune",
    )
    cuda_graph: bool = setting(
        False,
        "GPU: capture the whole training step (forward, backward, fused Adam) as "
        "one CUDA graph and replay it (training/step.py); on a CPU the step runs eagerly "
        "and says why",
    )
    precision: str = setting(
        "auto",
        "the forward pass: 'bf16' (bfloat16 autocast, the loss and the weights in float32), "
        "'fp32', or 'auto' (bf16 on a CUDA GPU and on a CPU with native bfloat16, AVX512-BF16 or "
        "AMX, where it trains 1.3x faster with the same results; fp32 on other CPUs, where "
        "bfloat16 is emulated). eval.json says which ran; docs/benchmarks.md has the measurements",
    )
    workers: int = setting(
        -1,
        "loader processes (0: load in the training process; -1: 0 when a Zarr store trains on a "
        "machine of at most 2 CPUs and no GPU, where a loader process takes the compute threads' "
        "cores, else 1)",
    )
    threads: int = setting(0, "torch CPU threads (0: default)")
    log_every: int = setting(25, "steps between metrics.jsonl lines")
    ckpt_every: int = setting(250, "steps between checkpoints")
    eval_every: int = setting(
        -1, "steps between test evaluations (PSNR curve; -1: 5 over the run, 0: at the end only)"
    )
    stop_at: int = setting(
        0, "stop with a checkpoint after this step; continue later with --resume"
    )
    resume: bool = setting(False, "continue an interrupted run from its checkpoint")
    save_images: bool = setting(
        False,
        "save the refined test images as PNG in runs/<run>/images/, in the folders "
        "of their sample names (two sets' 0001.png stay two files)",
    )


# settings that may differ between a run and its resumption without changing the result (where
# the stores are is one: the keys of the members read are compared instead, check_same_members)
RUNTIME_ONLY = (
    "resume",
    "workers",
    "threads",
    "stop_at",
    "device",
    "compile",
    "compile_mode",
    "cuda_graph",
    "log_every",
    "eval_every",
    "save_images",
    "store_root",
    "train_store",
    "test_store",
)


STATE, PREVIOUS_STATE, DAMAGED_STATE = (
    "state.pt",
    "state.prev.pt",
    "state.damaged.pt",
)  # last, one before


def model_config(cfg: TrainConfig, osf_dim: int) -> PTGRMConfig:
    off = [s for s in cfg.ablate.split(",") if s]
    unknown = sorted(set(off) - set(SWITCHES))
    if unknown:
        raise ValueError(f"unknown --ablate switch(es) {unknown}; known: {', '.join(SWITCHES)}")
    return PTGRMConfig(osf_dim=osf_dim, output=cfg.output, **{s: False for s in off})


def save_checkpoint(
    run_dir: Path, model, opt, sched, step: int, sidecar: dict, keep_previous: bool = True
) -> None:
    """Weights (safetensors) + JSON sidecar + optimizer state, each written atomically (read back by
    `ptgrm.refine.load_model`). The state.pt it replaces becomes state.prev.pt, for a resume when
    state.pt cannot be read; not when it is another run's (`keep_previous=False`: a new run)."""
    with atomic_path(run_dir / "model.safetensors") as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp)
        )
    if not keep_previous:
        (run_dir / PREVIOUS_STATE).unlink(missing_ok=True)
    elif (run_dir / STATE).is_file():
        with atomic_path(run_dir / PREVIOUS_STATE) as tmp:
            shutil.copyfile(run_dir / STATE, tmp)
    with atomic_path(run_dir / STATE) as tmp:  # one file holds everything a resume needs
        torch.save(
            {
                "step": step,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": float_lrs(opt.state_dict()),
                "scheduler": float_lrs(sched.state_dict()),
            },
            tmp,
        )
    write_json_atomic(run_dir / "model.json", {**sidecar, "step": step})


def open_splits(cfg: TrainConfig, rank: int = 0, world: int = 1) -> tuple:
    encoders = cfg.encoder.split(",") if cfg.encoder else None
    paths = [
        getattr(cfg, f"{s}_store") or find_store(cfg.store_root, cfg.data, cfg.task, s)
        for s in ("train", "test")
    ]
    if cfg.format == "wds":
        from .wds_data import WdsSplit

        return WdsSplit.open(paths[0], cfg.target, encoders), Split.open(
            paths[1], cfg.target, encoders
        )
    if cfg.format != "zarr":
        raise ValueError(f"--format must be 'zarr' or 'wds', got {cfg.format!r}")
    return tuple(Split.open(p, cfg.target, encoders) for p in paths)


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """--workers, with -1 resolved: on a machine of at most 2 CPUs without a GPU, a Zarr store's
    crops (cheap to read) load in the training process, since a loader process would take a core
    from the compute threads (measured on 2 cores: 5.5 against 5.0 steps/s), and so would a loader
    thread (bf16 demo, 400 steps: 72 s against 51 s, though its data wait fell from 7.7 % to
    0.2 %); else one process."""
    if cfg.workers >= 0:
        return cfg.workers
    return 0 if cfg.format == "zarr" and device.type == "cpu" and cpu_count() <= 2 else 1


def make_loader(
    cfg: TrainConfig, train_split, start: int, stop: int, rank: int, world: int, workers: int
):
    """The batches of steps [start, stop): read by index from a Zarr store, or streamed from a
    WebDataset export (training/wds_data.py)."""
    prefetch = {"num_workers": workers, "prefetch_factor": 4 if workers else None}
    if cfg.format == "wds":
        from .wds_data import WdsBatches

        batches = WdsBatches(
            train_split,
            cfg.crop,
            cfg.batch,
            cfg.seed,
            start,
            stop,
            rank,
            world,
            cfg.wds_streams,
            cfg.wds_buffer,
            cfg.wds_buffer_mb,
        )
        return torch.utils.data.DataLoader(batches, batch_size=None, **prefetch)
    train_split.arrays()  # load once before the loader forks
    batches = CropBatches(train_split, cfg.crop, cfg.batch, cfg.seed, cfg.steps, rank, world)
    return torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start, stop), **prefetch
    )


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device.startswith("cuda")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def same_settings(recorded: dict, cfg: TrainConfig) -> bool:
    """Whether a run recorded with the settings `recorded` (model.json's "train") gives the results
    of `cfg`: settings added since it was made count as their defaults, runtime ones not at all."""
    recorded = {**asdict(TrainConfig()), **recorded}
    return all(recorded.get(k) == v for k, v in asdict(cfg).items() if k not in RUNTIME_ONLY)


def resume_state(
    run_dir: Path, model, opt, sched, cfg: TrainConfig, train_split, test_split, device
) -> int:
    """Load the last checkpoint of an interrupted run with the same settings and store members
    (same keys) onto `device`, where the model already is (the optimizer state is placed beside
    the parameters it finds); returns its step."""
    if not any((run_dir / name).is_file() for name in (STATE, PREVIOUS_STATE)):
        return 0
    sidecar = json.loads((run_dir / "model.json").read_text())
    for role, split in (("train", train_split), ("test", test_split)):
        check_same_members(run_dir, role, sidecar.get(f"{role}_store"), split.info())
    if not same_settings(sidecar["train"], cfg):
        raise ValueError(f"{run_dir}: its checkpoint was made with other settings; use another RUN")
    problems = []
    for path in (p for p in (run_dir / STATE, run_dir / PREVIOUS_STATE) if p.is_file()):
        try:
            state = torch.load(path, map_location=device, weights_only=True)
            model.load_state_dict(
                state["model"]
            )  # weights, optimizer and scheduler of one and the same step
            load_optimizer(opt, state["optimizer"])  # as this run built it (eager or graph)
            sched.load_state_dict(state["scheduler"])
            step = int(state["step"])
        except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways; the next one is tried
            problems.append(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]})")
            continue
        if (
            problems
        ):  # state.pt is damaged: set aside, so that the next checkpoint keeps this one as previous
            with suppress(FileNotFoundError):  # another DDP rank set it aside first
                os.replace(run_dir / STATE, run_dir / DAMAGED_STATE)
            warnings.warn(
                f"{problems[0]}; resuming from {path} (step {step}); the damaged file is now "
                f"{DAMAGED_STATE}"
            )
        return step
    raise ValueError(
        "; ".join(problems) + ": no checkpoint to resume from; train again without --resume "
        "to start over (or restore state.pt from a copy)"
    )


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric lines after `step` (a resumed run rewrites them as an uninterrupted run would);
    a partial last line (a run killed while writing it) is dropped with a warning."""
    lines = path.read_text().splitlines() if path.is_file() and not path.is_symlink() else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append((int(json.loads(line)["step"]), line))
        except (ValueError, KeyError, TypeError) as e:
            if i < len(lines) - 1:
                raise ValueError(
                    f"{path}, line {i + 1}: not a metrics line ({e}); remove that line and resume "
                    f"again"
                ) from None
            warnings.warn(
                f"{path}: dropped its partial last line {line[:80]!r} (written when the run was stopped)"
            )
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for s, line in rows if s <= step))


def train(cfg: TrainConfig) -> dict:
    """Train, checkpoint, evaluate and report; returns eval.json's content (rank 0)."""
    tune_allocator()
    with cpu_share(
        cfg.threads
    ):  # torch's threads: the CPUs this process may use, shared with other trainings
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict:
    rank, world, device = setup_distributed(cfg)
    use_bf16 = autocast_bf16(cfg.precision, device)  # checked before anything is opened or written
    main = rank == 0
    run_dir = Path(cfg.runs_dir) / (cfg.run or cfg.task)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_split, test_split = open_splits(cfg, rank, world)
    info = train_split.info()
    check_loss(cfg, info, test_split.info())
    torch.manual_seed(cfg.seed)
    model = PTGRM(model_config(cfg, info["osf_dim"]))
    if cfg.cuda_graph and cfg.compile:
        raise ValueError(
            "--cuda-graph captures the step itself; use it without --compile (or use --compile "
            "--compile-mode reduce-overhead, torch.compile's own CUDA graphs)"
        )
    model.to(device)  # before the optimizer: a graph run's fused Adam keeps its state on the device
    opt = make_optimizer(model.parameters(), cfg.lr, device, cfg.cuda_graph)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr_min)
    sidecar = {
        "model": model.cfg.to_dict(),
        "train": asdict(cfg),
        "params": count_parameters(model),
        "train_store": info,
        "test_store": test_split.info(),
        "weights": info["weights"],
    }
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    start = (
        resume_state(run_dir, model, opt, sched, cfg, train_split, test_split, device)
        if cfg.resume
        else 0
    )
    own_state = (
        start > 0
    )  # a state.pt left by an earlier run in this folder never becomes the previous one
    if main:
        keep_metrics_until(run_dir / "metrics.jsonl", start)
        log.info(
            f"run {run_dir}: PTG-RM {sidecar['params']:,} params, g {info['osf_dim']}-d from "
            f"{', '.join(info['encoders'])} (weights: {info['weights']}), target {info['target']}, "
            f"{cfg.steps} steps of {cfg.batch}x{cfg.crop}px on {device} "
            f"({'bf16 autocast' if use_bf16 else 'fp32'})"
            + (f" x{world} processes" if world > 1 else "")
            + (f", resuming at {start}" if start else "")
        )
        log.debug(f"settings: {json.dumps(asdict(cfg), sort_keys=True, default=str)}")
    if cfg.perceptual and not cfg.vgg_weights:
        raise ValueError(
            "--perceptual needs --vgg-weights PATH (torchvision VGG19 ImageNet weights)"
        )
    perceptual = VGGPerceptual(cfg.vgg_weights).to(device) if cfg.perceptual else None
    no_ref = no_reference_loss(cfg)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = torch.compile(net, mode=cfg.compile_mode) if cfg.compile else net
    step_fn = Step(
        net,
        opt,
        device,
        world,
        perceptual,
        cfg.perceptual,
        no_ref,
        cfg.cuda_graph,
        use_bf16,
    )
    stop = min(cfg.stop_at or cfg.steps, cfg.steps)
    loader = make_loader(cfg, train_split, start, stop, rank, world, loader_workers(cfg, device))
    tb = _tensorboard(run_dir, start) if main else None
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        unit="step",
        desc="train",
        disable=not (main and bars()),
        dynamic_ncols=True,
    )
    wait = compute = 0.0
    eval_every = cfg.eval_every if cfg.eval_every >= 0 else max(cfg.steps // AUTO_EVALS, 1)
    loss_sum = (
        step_fn.loss_sum
    )  # (refined, base) loss per pixel, summed on the device since the last log
    model.train()
    t_last = time.perf_counter()
    metrics = run_dir / "metrics.jsonl"
    last_log = start
    for step, batch in enumerate(loader, start):
        t0 = time.perf_counter()
        wait += t0 - t_last
        follow_cpu_share()  # CPU threads: shared fairly with the trainings started or ended meanwhile
        loss = step_fn(batch)
        sched.step()
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            n = done - max(last_log, start)
            mean_loss, mean_base = (loss_sum / max(n, 1)).tolist()  # waits for the device
            now = time.perf_counter()
            compute, t0 = compute + now - t0, now  # this step counts in the row it logs
            loss_sum.zero_()
            last_log = done
            if main:
                row = {
                    "step": done,
                    "loss": loss.item() / (batch["gt"].numel() * world),
                    "loss_sum": loss.item(),
                    "loss_mean": mean_loss,
                    "loss_base_mean": mean_base,
                    "lr": float(sched.get_last_lr()[0]),
                    "data_wait_frac": wait / max(wait + compute, 1e-9),
                }
                _log(metrics, tb, row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
        compute += time.perf_counter() - t0  # the step (and its log line)
        if main and eval_every and done % eval_every == 0 and done < cfg.steps:
            r = evaluate(model, test_split)
            _log(
                metrics,
                tb,
                {
                    "step": done,
                    "eval_psnr_refined": r["psnr_refined"],
                    "eval_psnr_base": r["psnr_base"],
                },
            )
            model.train()
        if main and ((done % cfg.ckpt_every == 0 and done < cfg.steps) or done == stop):
            save_checkpoint(run_dir, model, opt, sched, done, sidecar, keep_previous=own_state)
            own_state = True  # state.pt is this run's now
        t_last = time.perf_counter()  # logs, evaluations and checkpoints are not data wait
    bar.close()
    if world > 1:
        dist.barrier()
    if not main or stop < cfg.steps:
        if main:
            log.info(
                f"stopped at step {stop} of {cfg.steps}; continue with --resume (make train RESUME=1)"
            )
        return {"stopped_at": stop}
    result = evaluate(model, test_split, save_dir=run_dir / "images" if cfg.save_images else None)
    result.update(
        {
            "task": cfg.task,
            "run": run_dir.name,
            "train_store": info["store"],
            "params": sidecar["params"],
            "steps": cfg.steps,
            "precision": "bf16" if use_bf16 else "fp32",
            "model": model.cfg.to_dict(),
            "data_wait_frac": wait / max(wait + compute, 1e-9),
        }
    )
    _log(
        metrics,
        tb,
        {
            "step": cfg.steps,
            "eval_psnr_refined": result["psnr_refined"],
            "eval_psnr_base": result["psnr_base"],
        },
    )
    write_eval(run_dir, result)
    from .report import write_report

    write_report(run_dir, model, test_split)
    if tb:
        tb.close()
    log.info(summary(result))
    return result


def check_loss(cfg: TrainConfig, train_info: dict, test_info: dict) -> None:
    """--loss is known; a train store without ground truth (`unpaired` layout) needs a no-reference
    loss; the test store always needs ground truth (PSNR/SSIM)."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown --loss {cfg.loss!r}; known: {', '.join(LOSSES)}")
    if not train_info.get("ground_truth", True) and cfg.loss not in NO_REFERENCE:
        raise ValueError(
            f"train store {train_info['store']} has no ground truth (unpaired layout): train it with "
            f"a no-reference loss, --loss {' or '.join(NO_REFERENCE)} (make train LOSS=zerodce)"
        )
    if not 0 < cfg.exposure < 1:
        raise ValueError(f"--exposure is a mean intensity in (0, 1), got {cfg.exposure}")
    if cfg.loss in NO_REFERENCE and cfg.perceptual:
        raise ValueError(
            f"--perceptual compares with the ground truth; it does not combine with --loss {cfg.loss}"
        )
    if not test_info.get("ground_truth", True):
        raise ValueError(
            f"test store {test_info['store']} has no ground truth: evaluation needs a paired test split"
        )


def no_reference_loss(cfg: TrainConfig):
    """`(refined, lq, base) -> summed loss` of a no-reference --loss (with its settings), else None."""
    if cfg.loss == "zerodce":
        return partial(zerodce_loss, e=cfg.exposure)
    return LOSSES[cfg.loss]


def _log(path: Path, tb, row: dict) -> None:
    """One line of metrics.jsonl, and the same scalars to TensorBoard."""
    with os.fdopen(
        open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "a"
    ) as f:  # never via a link
        f.write(json.dumps(row) + "\n")
    for k, v in row.items():
        if tb is not None and k != "step":
            tb.add_scalar(k, v, row["step"])


def _tensorboard(run_dir: Path, start: int):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb"), purge_step=start if start else None)


def summary(r: dict) -> str:
    lo, hi = r["gain_psnr_ci95"]
    return (
        f"{r['store']} ({r['n_images']} images, {r['space'].upper()}, weights: {r['weights']}): "
        f"input {r['psnr_input']:.2f} dB / {r['ssim_input']:.4f} | base {r['psnr_base']:.2f} / "
        f"{r['ssim_base']:.4f} -> refined {r['psnr_refined']:.2f} / {r['ssim_refined']:.4f} "
        f"(gain {r['gain_psnr']:+.2f} dB, 95% CI {lo:+.2f}..{hi:+.2f})"
    )
