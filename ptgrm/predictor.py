"""The distilled OSF predictor: a small CNN that predicts g from lq, so restoring needs no
pre-trained model. Trained by `python -m training distill` (training/distill.py), read by
`python -m pipeline restore --osf distilled`; stored in `runs/<run>/distill/`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from stores import atomic_path, write_json_atomic

from .images import image_tensor

SIZE = 112  # predictor input: the whole image resized, as the encoder sees it


class OSFPredictor(nn.Module):
    """lq (B,3,H,W) in [0,1] -> unit vector (B,D): a 5-stage strided CNN, ~1.1 M parameters (D=512)."""

    def __init__(self, dim: int, width: int = 32):
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 8, width * 8]
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1),
                nn.GroupNorm(8, cout),
                nn.GELU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], dim)
        self.dim, self.width = dim, width

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(
            lq, size=(SIZE, SIZE), mode="bicubic", antialias=True, align_corners=False
        )
        x = self.features(x).mean((2, 3))  # (B, 8w)
        return F.normalize(self.head(x), dim=-1)


@torch.no_grad()
def predict_g(predictor: OSFPredictor, lq: np.ndarray) -> np.ndarray:
    """(D,): the predictor's g of one unflipped uint8 (H, W, 3) image."""
    return predictor(image_tensor(lq))[0].numpy()


def save_predictor(run_dir: Path, model: OSFPredictor, meta: dict) -> None:
    d = Path(run_dir) / "distill"
    with atomic_path(d / "predictor.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json_atomic(
        d / "predictor.json", {"dim": model.dim, "width": model.width, "size": SIZE, **meta}
    )


def load_predictor(run_dir: Path) -> OSFPredictor:
    d = Path(run_dir) / "distill"
    if not (d / "predictor.json").is_file():
        raise FileNotFoundError(
            f"{run_dir}: no distilled OSF predictor; run `make distill RUN={Path(run_dir).name}`"
        )
    meta = json.loads((d / "predictor.json").read_text())
    model = OSFPredictor(meta["dim"], meta["width"])
    model.load_state_dict(load_file(str(d / "predictor.safetensors")))
    return model.eval()
