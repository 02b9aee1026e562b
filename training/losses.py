"""Training losses: Charbonnier (summed, as the official code) and the optional VGG19 perceptual term.

The perceptual term needs ImageNet VGG19 weights given by path (`--vgg-weights`); nothing is
downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ptgrm.images import IMAGENET_MEAN, IMAGENET_STD

VGG_LAYERS = {1: 1 / 32, 6: 1 / 16, 11: 1 / 8, 20: 1 / 4, 29: 1.0}  # relu1_1 .. relu5_1 of vgg19.features


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """sum(sqrt((pred - target)^2 + eps)): the official code's Charbonnier loss (summed)."""
    diff = pred - target
    return torch.sqrt(diff * diff + eps).sum()


class VGGPerceptual(nn.Module):
    """L1 between VGG19 features (relu1_1..relu5_1, weights 1/32 .. 1) of ImageNet-normalised inputs.

    `weights_path`: torchvision's VGG19 ImageNet state dict (vgg19-dcbb9e9d.pth) or any checkpoint
    holding its `features.*` tensors (the classifier is not used), read with the safe reader.
    """

    def __init__(self, weights_path: str):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        from ptgrm.checkpoints import CheckpointError, load_checkpoint

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"--vgg-weights {path}: no such file; the perceptual loss needs "
                                    f"torchvision VGG19 ImageNet weights (vgg19-dcbb9e9d.pth) given by path")
        features = make_layers(cfgs["E"])[:max(VGG_LAYERS) + 1]  # VGG19's conv part up to relu5_1
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            raise ValueError(f"--vgg-weights: {e}") from e
        wanted = {k: v for k, v in state.items() if k.startswith("features.")
                  and int(k.split(".")[1]) <= max(VGG_LAYERS)}
        try:
            features.load_state_dict({k.removeprefix("features."): v for k, v in wanted.items()})
        except RuntimeError as e:
            raise ValueError(f"--vgg-weights {path}: not a torchvision VGG19 state dict "
                             f"({str(e)[:200]})") from e
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, y = (pred - self.mean) / self.std, (target - self.mean) / self.std
        loss = pred.new_zeros(())
        for i, layer in enumerate(self.features):
            x, y = layer(x), layer(y)
            if i in VGG_LAYERS:
                loss = loss + VGG_LAYERS[i] * F.l1_loss(x, y)
        return loss

