"""Does the pre-trained prior matter? PTG-RM with no OSF, a random CLIP, a pre-trained
EfficientNet-Lite0, and both, over several seeds, on one task's stores.

Run: `make prior-study TASK=deblur` (builds the two OSF members, then
`python -m training prior-study --task deblur --seeds 0,1,2`). Each (row, seed) is a run of its
own (`runs/<run>-prior-<row>-s<seed>/`), reused when finished with the same settings. Writes
`runs/<run>-prior/prior.{json,md}`: mean PSNR/SSIM per row, and the differences
pretrained - random and pretrained - none with 95% bootstrap intervals that resample both the
test samples and the seeds (paired: the same sample and seed on both sides).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from common.log import flags as log_flags
from stores import atomic_path, write_json_atomic

from .ablate import _slug, finished
from .train import TrainConfig, open_splits, train

log = logging.getLogger(__name__)

# Without CLIP weights on the machine the CLIP row is a random CLIP (its weights column says so);
# EfficientNet-Lite0's ImageNet weights ship in a package, so that row is always pre-trained.
RANDOM, PRETRAINED = "clip-vit-b32", "effnet-lite0"
ROWS = [  # (row, changes to the training config)
    ("no OSF (w/o g)", {"encoder": RANDOM, "ablate": "use_g"}),
    ("CLIP ViT-B/32", {"encoder": RANDOM}),
    ("EfficientNet-Lite0", {"encoder": PRETRAINED}),
    ("both, concatenated", {"encoder": f"{RANDOM},{PRETRAINED}"}),
]
COMPARE = [("EfficientNet-Lite0", "CLIP ViT-B/32"), ("EfficientNet-Lite0", "no OSF (w/o g)")]


def paired_bootstrap(diff: np.ndarray, n: int = 4000, seed: int = 0) -> list[float]:
    """95% interval of the mean of diff (seeds x samples), resampling seeds and samples."""
    rng = np.random.default_rng(seed)
    s, m = diff.shape
    means = [diff[rng.integers(0, s, s)][:, rng.integers(0, m, m)].mean() for _ in range(n)]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def cli_args(cfg: TrainConfig) -> list[str]:
    """The `python -m training train` flags that give this config."""
    out = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        elif value is not None:
            out += [flag, str(value)]
    return out


def run_parallel(configs: list[TrainConfig], jobs: int) -> None:
    """Train configs in `jobs` processes at a time (several small runs share one GPU well);
    each run's output goes to runs/<run>/train.log. Raises naming the runs that failed."""
    pending, running, failed = list(configs), [], []
    while pending or running:
        while pending and len(running) < jobs:
            c = pending.pop(0)
            (Path(c.runs_dir) / c.run).mkdir(parents=True, exist_ok=True)
            out = open(Path(c.runs_dir) / c.run / "train.log", "w")
            running.append(
                (
                    c,
                    out,
                    subprocess.Popen(
                        [sys.executable, "-m", "training", "train", *log_flags(), *cli_args(c)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    ),
                )
            )
            log.info(f"== started {c.run}")
        for item in list(running):
            c, out, proc = item
            if proc.poll() is not None:
                out.close()
                running.remove(item)
                (failed.append(c.run) if proc.returncode else log.info(f"== finished {c.run}"))
        time.sleep(0.5)
    if failed:
        raise RuntimeError(
            f"prior study: {len(failed)} run(s) failed: "
            + ", ".join(f"{r} (see {Path(configs[0].runs_dir) / r / 'train.log'})" for r in failed)
        )


def prior_study(cfg: TrainConfig, seeds: list[int], jobs: int = 1) -> Path:
    name = cfg.run or cfg.task
    plan = [
        (row, replace(cfg, run=f"{name}-prior-{_slug(row)}-s{seed}", seed=seed, **changes))
        for row, changes in ROWS
        for seed in seeds
    ]
    opened: dict[
        str, tuple
    ] = {}  # encoder(s) -> (train, test) splits: a finished run must match their keys

    def done(c: TrainConfig) -> dict | None:
        if c.encoder not in opened:
            opened[c.encoder] = open_splits(c)
        return finished(Path(cfg.runs_dir) / c.run, c, opened[c.encoder])

    todo = [c for _, c in plan if done(c) is None]
    log.info(f"prior study: {len(plan)} runs, {len(plan) - len(todo)} finished before and reused")
    if jobs > 1:
        run_parallel(todo, jobs)
    else:
        for c in todo:
            log.info(f"== {c.run}")
            train(c)
    results: dict[str, list[dict]] = {row: [] for row, _ in ROWS}
    for row, c in plan:
        result = done(c)
        if result is None:
            raise RuntimeError(f"prior study: run {c.run} did not finish")
        results[row].append(result)
    names = [r["name"] for r in results[ROWS[0][0]][0]["images"]]

    def per_sample(row: str, key: str = "psnr_refined") -> np.ndarray:  # (seeds, samples)
        out = []
        for r in results[row]:
            by_name = {x["name"]: x[key] for x in r["images"]}
            out.append([by_name[n] for n in names])
        return np.array(out)

    rows = [
        {
            "row": row,
            "encoder": changes["encoder"] if "use_g" not in changes.get("ablate", "") else "none",
            "weights": sorted({r["weights"] for r in results[row]}),
            "psnr_base": float(np.mean([r["psnr_base"] for r in results[row]])),
            "psnr_refined": float(per_sample(row).mean()),
            "psnr_refined_per_seed": [r["psnr_refined"] for r in results[row]],
            "ssim_refined": float(per_sample(row, "ssim_refined").mean()),
        }
        for row, changes in ROWS
    ]
    diffs = []
    for a, b in COMPARE:
        d = per_sample(a) - per_sample(b)
        diffs.append(
            {
                "a": a,
                "b": b,
                "psnr_diff": float(d.mean()),
                "ci95": paired_bootstrap(d),
                "ssim_diff": float(
                    (per_sample(a, "ssim_refined") - per_sample(b, "ssim_refined")).mean()
                ),
            }
        )
    out = Path(cfg.runs_dir) / f"{name}-prior"
    report = {
        "task": cfg.task,
        "steps": cfg.steps,
        "seeds": seeds,
        "n_samples": len(names),
        "space": results[ROWS[0][0]][0]["space"],
        "rows": rows,
        "differences": diffs,
    }
    write_json_atomic(out / "prior.json", report)
    lines = [
        f"# Does the prior matter? ({cfg.task}, {len(names)} test samples, seeds {seeds}, {cfg.steps} steps, "
        f"PSNR in {report['space'].upper()})",
        "",
        "| OSF | weights | PSNR base -> refined (mean) | per seed | SSIM refined |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['row']} | {', '.join(r['weights']) if r['encoder'] != 'none' else '-'} | "
        f"{r['psnr_base']:.2f} -> {r['psnr_refined']:.3f} | "
        f"{', '.join(f'{v:.3f}' for v in r['psnr_refined_per_seed'])} | {r['ssim_refined']:.4f} |"
        for r in rows
    ]
    lines += ["", "| difference | PSNR (95% CI over samples and seeds) | SSIM |", "|---|---|---|"]
    lines += [
        f"| {d['a']} - {d['b']} | {d['psnr_diff']:+.3f} dB ({d['ci95'][0]:+.3f}..{d['ci95'][1]:+.3f}) | "
        f"{d['ssim_diff']:+.4f} |"
        for d in diffs
    ]
    with atomic_path(out / "prior.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    log.info("\n".join(lines))
    return out
