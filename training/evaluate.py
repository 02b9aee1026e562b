"""Evaluation as in the paper: PSNR/SSIM of input, base and refined on full-size test images.

Run: `python -m training eval --task deblur --run deblur` (what `make eval` calls).
Writes `eval.json` (means, gain with a bootstrap 95% interval) and `eval.csv` (per image).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path, PurePosixPath

import numpy as np

from common.metrics import to_uint8
from ptgrm.images import save_png
from ptgrm.refine import refine
from stores import atomic_path, write_json_atomic
from stores.files import open_regular

from .data import SplitLike
from .metrics import quality


def bootstrap_ci(values, n: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of `values`, resampling images."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return [float(v.mean()), float(v.mean())]
    means = v[np.random.default_rng(seed).integers(0, len(v), (n, len(v)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def saved_image_path(save_dir: Path, name: str) -> Path:
    """Where a sample's refined PNG goes: its name's folders kept (two sets' `0001.png` stay two
    files), never outside `save_dir` (`..` and root parts of a stored name are dropped)."""
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("/", ".", "..")]
    return Path(save_dir, *(parts or ["unnamed"])).with_suffix(".png")


def evaluate(
    model, split: SplitLike, space: str | None = None, save_dir: Path | None = None
) -> dict:
    """Mean and per-image metrics of input, base and refined; `space` 'rgb' or 'y' (default:
    what the store's task asks for). With `save_dir`, refined images are saved there as PNG."""
    info = split.info()
    if not info.get("ground_truth", True):
        raise ValueError(
            f"{info['store']} has no ground truth (unpaired layout): evaluate on a paired test split"
        )
    space = space or split.metric_space
    model.eval()
    rows = []
    for i, name in enumerate(split.names):
        if split.hw[i][0] == 0:  # excluded by the pipeline (listed in the store's manifest)
            continue
        s = split.image(i)
        refined = to_uint8(refine(model, s["lq"], s["base"], s["g"]))
        if save_dir is not None:
            save_png(saved_image_path(Path(save_dir), name), refined)
        row = {"name": name, "h": int(s["lq"].shape[0]), "w": int(s["lq"].shape[1])}
        for what, img in (("input", s["lq"]), ("base", to_uint8(s["base"])), ("refined", refined)):
            q = quality(img, s["gt"], space)
            row[f"psnr_{what}"], row[f"ssim_{what}"] = q["psnr"], q["ssim"]
        row["gain_psnr"] = row["psnr_refined"] - row["psnr_base"]
        rows.append(row)
    mean = {
        k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k.startswith(("psnr", "ssim"))
    }
    return {
        "store": info["store"],
        "target": info["target"],
        "encoder": info["encoders"],
        "weights": info["weights"],
        "target_weights": info.get("target_weights_kind", "none"),
        "space": space,
        "n_images": len(rows),
        **mean,
        "gain_psnr": mean["psnr_refined"] - mean["psnr_base"],
        "gain_psnr_ci95": bootstrap_ci([r["gain_psnr"] for r in rows]),
        "images": rows,
    }


def write_eval(run_dir: Path, result: dict) -> None:
    """eval.json (everything) and eval.csv (one row per image)."""
    write_json_atomic(Path(run_dir) / "eval.json", result)
    rows = result["images"]
    with (
        atomic_path(Path(run_dir) / "eval.csv") as tmp,
        os.fdopen(open_regular(tmp), "w", newline="") as f,
    ):
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
