"""Evaluation as in the paper: PSNR/SSIM of input, base and refined on full-size test images.

Run: `python -m training eval --task deblur --run deblur` (what `make eval` calls).
Writes `eval.json` (means, gain with a bootstrap 95% interval) and `eval.csv` (per image).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stores import atomic_path, write_json_atomic

from .metrics import quality, to_uint8

MAX_PIXELS = 1536 * 1536  # larger images are refined in overlapping tiles
TILE, OVERLAP = 768, 64


def _pad4(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % 4, 0, -h % 4), mode="replicate") if (h % 4 or w % 4) else x


@torch.no_grad()
def refine(model, lq: np.ndarray, base: np.ndarray, g: np.ndarray, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """PTG-RM on one full image: lq uint8 (h,w,3), base float (h,w,3), g (D,) -> float (h,w,3).

    Sides are replicate-padded to a multiple of 4 and cropped back. Images above `max_pixels`
    run in overlapping tiles whose borders are discarded (the module normalises over the whole
    input, so tiles differ slightly from one pass; small images always run in one pass).
    """
    device = next(model.parameters()).device
    lq_t = torch.from_numpy(np.ascontiguousarray(lq)).permute(2, 0, 1)[None].float().to(device) / 255
    base_t = torch.from_numpy(np.ascontiguousarray(base)).permute(2, 0, 1)[None].float().to(device)
    g_t = torch.tensor(np.asarray(g), dtype=torch.float32, device=device)[None]  # a copy: g may be read-only
    h, w = lq.shape[:2]
    if h * w <= max_pixels:
        out = model(_pad4(base_t), _pad4(lq_t), g_t)[..., :h, :w]
    else:
        out = torch.zeros_like(base_t)
        for y0, y1, x0, x1 in tiles(h, w):
            ya, xa = max(y0 - OVERLAP, 0), max(x0 - OVERLAP, 0)
            yb, xb = min(y1 + OVERLAP, h), min(x1 + OVERLAP, w)
            part = model(_pad4(base_t[..., ya:yb, xa:xb]), _pad4(lq_t[..., ya:yb, xa:xb]), g_t)
            out[..., y0:y1, x0:x1] = part[..., y0 - ya:y1 - ya, x0 - xa:x1 - xa]
    return out[0].permute(1, 2, 0).float().cpu().numpy()


def tiles(h: int, w: int, size: int = TILE):
    """Non-overlapping cores covering (h, w); each is refined with OVERLAP px of context."""
    for y in range(0, h, size):
        for x in range(0, w, size):
            yield y, min(y + size, h), x, min(x + size, w)


def bootstrap_ci(values, n: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of `values`, resampling images."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return [float(v.mean()), float(v.mean())]
    means = v[np.random.default_rng(seed).integers(0, len(v), (n, len(v)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def evaluate(model, split, space: str | None = None, save_dir: Path | None = None) -> dict:
    """Mean and per-image metrics of input, base and refined; `space` 'rgb' or 'y' (default:
    what the store's task asks for). With `save_dir`, refined images are saved there as PNG."""
    space = space or split.metric_space
    model.eval()
    rows = []
    for i, name in enumerate(split.names):
        if split.hw[i][0] == 0:  # excluded by the pipeline (listed in the store's manifest)
            continue
        s = split.image(i)
        refined = to_uint8(refine(model, s["lq"], s["base"], s["g"]))
        if save_dir is not None:
            save_png(Path(save_dir) / f"{Path(name).stem}.png", refined)
        row = {"name": name, "h": int(s["lq"].shape[0]), "w": int(s["lq"].shape[1])}
        for what, img in (("input", s["lq"]), ("base", to_uint8(s["base"])), ("refined", refined)):
            q = quality(img, s["gt"], space)
            row[f"psnr_{what}"], row[f"ssim_{what}"] = q["psnr"], q["ssim"]
        row["gain_psnr"] = row["psnr_refined"] - row["psnr_base"]
        rows.append(row)
    info = split.info()
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k.startswith(("psnr", "ssim"))}
    return {"store": info["store"], "target": info["target"], "encoder": info["encoders"],
            "weights": info["weights"], "space": space, "n_images": len(rows), **mean,
            "gain_psnr": mean["psnr_refined"] - mean["psnr_base"],
            "gain_psnr_ci95": bootstrap_ci([r["gain_psnr"] for r in rows]), "images": rows}


def save_png(path: Path, img: np.ndarray) -> Path:
    """uint8 (h, w, 3) -> PNG, written atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")
    return path


def write_eval(run_dir: Path, result: dict) -> None:
    """eval.json (everything) and eval.csv (one row per image)."""
    write_json_atomic(Path(run_dir) / "eval.json", result)
    rows = result["images"]
    with atomic_path(Path(run_dir) / "eval.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
