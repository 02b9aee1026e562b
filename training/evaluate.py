"""Evaluation as in the paper: PSNR/SSIM of input, base and refined on full-size test images.

Run: `python -m training eval --task deblur --run deblur` (what `make eval` calls).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import Split
from .metrics import quality, to_uint8


@torch.no_grad()
def refine(model, lq: np.ndarray, base: np.ndarray, g: np.ndarray) -> np.ndarray:
    """PTG-RM on one full image: lq uint8 (h,w,3), base float (h,w,3), g (D,) -> float (h,w,3).

    The module needs sides divisible by 4: inputs are replicate-padded, the output cropped.
    """
    h, w = lq.shape[:2]
    ph, pw = -h % 4, -w % 4
    lq_t = torch.from_numpy(np.ascontiguousarray(lq)).permute(2, 0, 1)[None].float() / 255
    base_t = torch.from_numpy(np.ascontiguousarray(base)).permute(2, 0, 1)[None].float()
    if ph or pw:
        lq_t = F.pad(lq_t, (0, pw, 0, ph), mode="replicate")
        base_t = F.pad(base_t, (0, pw, 0, ph), mode="replicate")
    out = model(base_t, lq_t, torch.from_numpy(g)[None].float())  # (1, 3, H, W)
    return out[0, :, :h, :w].permute(1, 2, 0).numpy()


def evaluate(model, split: Split, space: str = "rgb") -> dict:
    """Mean and per-image metrics; `space` is 'rgb' or 'y'."""
    rows = []
    names = split_names(split)
    for i in range(len(split.hw)):
        s = split.image(i)
        refined = refine(model, s["lq"], s["base"], s["g"])
        row = {"name": names[i], "h": int(s["lq"].shape[0]), "w": int(s["lq"].shape[1])}
        for what, img in (("input", s["lq"]), ("base", to_uint8(s["base"])), ("refined", to_uint8(refined))):
            q = quality(img, s["gt"], space)
            row[f"psnr_{what}"], row[f"ssim_{what}"] = q["psnr"], q["ssim"]
        rows.append(row)
    info = split.info()
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k.startswith(("psnr", "ssim"))}
    return {"store": info["store"], "target": info["target"], "encoder": info["encoders"],
            "weights": info["weights"], "space": space, "n_images": len(rows), **mean,
            "gain_psnr": mean["psnr_refined"] - mean["psnr_base"], "images": rows}


def split_names(split: Split) -> list[str]:
    from stores import Store

    return [str(n) for n in Store(split.path).array("pairs", "names")[:]]
