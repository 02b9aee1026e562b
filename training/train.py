"""Stage 2: fit PTG-RM on a train store, evaluate it on the test store, write `runs/<run>/`.

Run: `python -m training train --task deblur --data demo` (what `make train` calls). Reads only
the stores: no frozen network is loaded here.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from stores import atomic_path, write_json_atomic

from .data import CropBatches, Split, find_store
from .evaluate import evaluate
from .model import PTGRM, PTGRMConfig, count_parameters


@dataclass(frozen=True)
class TrainConfig:
    task: str = "deblur"
    data: str = "demo"
    store_root: str = "data/stores"
    train_store: str | None = None  # explicit store paths override the search under store_root
    test_store: str | None = None
    target: str | None = None  # target member name (default: the store's only one)
    encoder: str = "clip-vit-b32"  # comma-separated to concatenate several OSF vectors
    run: str | None = None  # default: the task name
    runs_dir: str = "runs"
    steps: int = 1500
    batch: int = 8
    crop: int = 96
    lr: float = 1e-4
    lr_min: float = 1e-7
    seed: int = 0
    workers: int = 1  # loader processes (0: load in the training process)
    threads: int = 0  # torch threads (0: torch's default)
    log_every: int = 25
    ckpt_every: int = 250
    resume: bool = False


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """sum(sqrt((pred - target)^2 + eps)): the official code's Charbonnier loss (summed)."""
    diff = pred - target
    return torch.sqrt(diff * diff + eps).sum()


def save_checkpoint(run_dir: Path, model, opt, sched, step: int, sidecar: dict) -> None:
    """Weights (safetensors) + JSON sidecar + optimizer state, each written atomically."""
    with atomic_path(run_dir / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_path(run_dir / "state.pt") as tmp:
        torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp)
    write_json_atomic(run_dir / "model.json", {**sidecar, "step": step})


def load_model(run_dir: Path) -> tuple[PTGRM, dict]:
    """A trained PTG-RM and its sidecar from `runs/<run>/`."""
    sidecar = json.loads((run_dir / "model.json").read_text())
    model = PTGRM(PTGRMConfig.from_dict(sidecar["model"]))
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    return model.eval(), sidecar


def open_splits(cfg: TrainConfig) -> tuple[Split, Split]:
    encoders = cfg.encoder.split(",") if cfg.encoder else None
    paths = [getattr(cfg, f"{s}_store") or find_store(cfg.store_root, cfg.data, cfg.task, s)
             for s in ("train", "test")]
    return tuple(Split.open(p, cfg.target, encoders) for p in paths)


def train(cfg: TrainConfig, log=print) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.runs_dir) / (cfg.run or cfg.task)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_split, test_split = open_splits(cfg)
    info = train_split.info()
    torch.manual_seed(cfg.seed)
    model = PTGRM(PTGRMConfig(osf_dim=info["osf_dim"]))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr_min)
    sidecar = {"model": model.cfg.to_dict(), "train": asdict(cfg), "params": count_parameters(model),
               "train_store": info, "test_store": test_split.info(), "weights": info["weights"]}
    start = resume_state(run_dir, model, opt, sched, cfg) if cfg.resume else 0
    if start == 0:
        (run_dir / "metrics.jsonl").write_text("")
    log(f"run {run_dir}: PTG-RM {sidecar['params']:,} params, g {info['osf_dim']}-d from "
        f"{', '.join(info['encoders'])} (weights: {info['weights']}), target {info['target']}, "
        f"{cfg.steps} steps of {cfg.batch}x{cfg.crop}px" + (f", resuming at {start}" if start else ""))

    batches = CropBatches(train_split, cfg.crop, cfg.batch, cfg.seed, cfg.steps)
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start, cfg.steps), num_workers=cfg.workers,
        prefetch_factor=4 if cfg.workers else None, persistent_workers=False)
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="train", dynamic_ncols=True)
    wait = compute = 0.0
    t_last = time.perf_counter()
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        for step, batch in enumerate(loader, start):
            t0 = time.perf_counter()
            wait += t0 - t_last
            refined = model(batch["base"], batch["lq"], batch["g"])
            loss = charbonnier(refined, batch["gt"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            t_last = time.perf_counter()
            compute += t_last - t0
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                per_px = loss.item() / batch["gt"].numel()
                bar.set_postfix(loss=f"{per_px:.4f}")
                metrics.write(json.dumps({"step": step + 1, "loss": per_px, "loss_sum": loss.item(),
                                          "lr": sched.get_last_lr()[0],
                                          "data_wait_frac": wait / max(wait + compute, 1e-9)}) + "\n")
                metrics.flush()
            if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(run_dir, model, opt, sched, step + 1, sidecar)
    bar.close()
    save_checkpoint(run_dir, model, opt, sched, cfg.steps, sidecar)
    result = evaluate(model.eval(), test_split, space="rgb")
    result.update({"task": cfg.task, "run": run_dir.name, "train_store": info["store"],
                   "params": sidecar["params"], "steps": cfg.steps,
                   "data_wait_frac": wait / max(wait + compute, 1e-9)})
    write_eval(run_dir, result)
    log(summary(result))
    return result


def resume_state(run_dir: Path, model, opt, sched, cfg: TrainConfig) -> int:
    """Load the last checkpoint of an interrupted run with the same settings; returns its step."""
    if not (run_dir / "state.pt").is_file():
        return 0
    sidecar = json.loads((run_dir / "model.json").read_text())
    same = {k: v for k, v in sidecar["train"].items() if k not in ("resume", "workers", "threads")} == \
        {k: v for k, v in asdict(cfg).items() if k not in ("resume", "workers", "threads")}
    if not same:
        raise ValueError(f"{run_dir}: its checkpoint was made with other settings; use another RUN")
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    state = torch.load(run_dir / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"])


def write_eval(run_dir: Path, result: dict) -> None:
    write_json_atomic(run_dir / "eval.json", result)


def summary(r: dict) -> str:
    return (f"{r['store']} ({r['n_images']} images, {r['space'].upper()}, weights: {r['weights']}): "
            f"input {r['psnr_input']:.2f} dB / {r['ssim_input']:.4f} | base {r['psnr_base']:.2f} / "
            f"{r['ssim_base']:.4f} -> refined {r['psnr_refined']:.2f} / {r['ssim_refined']:.4f} "
            f"(gain {r['psnr_refined'] - r['psnr_base']:+.2f} dB)")
