"""SCI, Self-Calibrated Illumination (Ma et al., CVPR 2022): the low-light network PTG-RM's Table 4 refines.

`python -m pipeline features --task lowlight --target sci-medium` (also `sci-easy`, `sci-difficult`).
The three published state dicts ship with the project (`pipeline/third_party/sci/`, MIT, with
their LICENSE and NOTICE) and are loaded by default; their sha256 is checked at load and is part
of the member key. Parameter names are those of the authors' `model.py`
(github.com/vis-opt-group/SCI, `EnhanceNetwork` under `enhance.`), so the published files load
with `strict=True`; their `calibrate.*` keys (the self-calibrated module, used only in training)
are skipped.

At test time the authors run the illumination network alone (`Finetunemodel` in `test.py`):
`i = clamp(sigmoid(out_conv(f)) + x, 1e-4, 1)` with `f` from a 3x3 convolution + ReLU followed by
`layers` residual steps `f = f + block(f)` (conv, BatchNorm in eval mode, ReLU; the official code
repeats one and the same block, so its weights appear under both `conv.` and `blocks.<k>.`), and
the output is `clamp(x / i, 0, 1)`, x RGB in [0, 1]. Published configuration: 1 layer, 3 channels.
Every layer is a 3x3 convolution with zero padding: no size constraint, no padding by us.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "third_party" / "sci"
SCI_CONFIG = {"layers": 1, "channels": 3}
# variant -> sha256 of the published file (NOTICE.md in WEIGHTS_DIR)
SCI_WEIGHTS = {
    "easy": "b17326a26a93bf187ecbab217f9d3c57467a8b56020d4d9ff600ba257bbffb36",
    "medium": "4ff1e7e66e8f18114f790e5085ca4c936f0858e329e7ad1cb65b8aa09a9c6916",
    "difficult": "657fa1f280cae1035df0d5cbe628e91f2d0f28660df608a3fa3f7e9a71da5a13",
}
TRAINING_ONLY_PREFIX = "calibrate."


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1)


class Illumination(nn.Module):
    """The authors' `EnhanceNetwork`: (B, 3, H, W) in [0, 1] -> illumination in [1e-4, 1]."""

    def __init__(self, layers: int = 1, channels: int = 3):
        super().__init__()
        self.in_conv = nn.Sequential(_conv(3, channels), nn.ReLU())
        self.conv = nn.Sequential(_conv(channels, channels), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.ModuleList(
            [self.conv] * layers
        )  # one block applied `layers` times (shared weights)
        self.out_conv = nn.Sequential(_conv(channels, 3), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.in_conv(x)
        for block in self.blocks:
            f = f + block(f)
        return torch.clamp(self.out_conv(f) + x, 0.0001, 1)


class SCI(nn.Module):
    """The test-time SCI: the enhanced image `clamp(x / illumination(x), 0, 1)`."""

    def __init__(self, layers: int = 1, channels: int = 3):
        super().__init__()
        self.enhance = Illumination(layers, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x / self.enhance(x), 0, 1)
