"""A trained PTG-RM on whole images: read a run's model, refine one full-size image (tiled when large).

Used by evaluation (`python -m training eval`) and inference (`python -m pipeline restore`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .images import image_tensor
from .model import PTGRM, PTGRMConfig
from .tiling import pad_to, tiled

MAX_PIXELS = 1536 * 1536  # larger images are refined in overlapping tiles
TILE, OVERLAP = 896, 128  # every kept pixel has at least 64 px of context (ptgrm/tiling.py)
FACTOR = 4  # PTG-RM works at H/4 x W/4: sides are padded to a multiple of 4


def load_model(run_dir: Path) -> tuple[PTGRM, dict]:
    """A trained PTG-RM and its sidecar from `runs/<run>/`."""
    sidecar = json.loads((Path(run_dir) / "model.json").read_text())
    model = PTGRM(PTGRMConfig.from_dict(sidecar["model"]))
    model.load_state_dict(load_file(str(Path(run_dir) / "model.safetensors")))
    return model.eval(), sidecar


@torch.no_grad()
def refine(
    model, lq: np.ndarray, base: np.ndarray, g: np.ndarray, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """PTG-RM on one full image: lq uint8 (h,w,3), base float (h,w,3), g (D,) -> float (h,w,3).

    Sides are replicate-padded to a multiple of 4 and cropped back. Images above `max_pixels`
    run in overlapping tiles (`ptgrm.tiling`, as the frozen targets do); the module normalises
    over its whole input, so tiles differ slightly from one pass; small images always run in one pass.
    """
    device = next(model.parameters()).device
    lq_t = image_tensor(lq, device)  # (1, 3, h, w)
    base_t = torch.from_numpy(np.ascontiguousarray(base)).permute(2, 0, 1)[None].float().to(device)
    g_t = torch.tensor(np.asarray(g), dtype=torch.float32, device=device)[
        None
    ]  # a copy: g may be read-only
    h, w = lq.shape[:2]
    x = tuple(
        pad_to(t, FACTOR, "replicate") for t in (base_t, lq_t)
    )  # (1, 3, H', W'), multiples of 4

    def run(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return model(b, q, g_t)

    out = run(*x) if h * w <= max_pixels else tiled(run, x, TILE, OVERLAP, FACTOR)
    return out[0, :, :h, :w].permute(1, 2, 0).float().cpu().numpy()
