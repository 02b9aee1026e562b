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

VGG_LAYERS = {
    1: 1 / 32,
    6: 1 / 16,
    11: 1 / 8,
    20: 1 / 4,
    29: 1.0,
}  # relu1_1 .. relu5_1 of vgg19.features


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
            raise FileNotFoundError(
                f"--vgg-weights {path}: no such file; the perceptual loss needs "
                f"torchvision VGG19 ImageNet weights (vgg19-dcbb9e9d.pth) given by path"
            )
        features = make_layers(cfgs["E"])[: max(VGG_LAYERS) + 1]  # VGG19's conv part up to relu5_1
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            raise ValueError(f"--vgg-weights: {e}") from e
        wanted = {
            k: v
            for k, v in state.items()
            if k.startswith("features.") and int(k.split(".")[1]) <= max(VGG_LAYERS)
        }
        try:
            features.load_state_dict({k.removeprefix("features."): v for k, v in wanted.items()})
        except RuntimeError as e:
            raise ValueError(
                f"--vgg-weights {path}: not a torchvision VGG19 state dict ({str(e)[:200]})"
            ) from e
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


# -- no-reference low-light losses: training without ground truth (--loss) ----------------------------------
SCI_FIDELITY = 1.5  # alpha of SCI's total loss (beta = 1 for the smoothness term)
SCI_SIGMA = 10.0  # sigma of SCI's smoothness weights
# BT.601 RGB -> YCbCr on [0, 1] values (the 16/255 and 128/255 offsets cancel in differences)
YCBCR = ((0.257, 0.504, 0.098), (-0.148, -0.291, 0.439), (0.439, -0.368, -0.071))
NEIGHBOURS = tuple(
    (dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)
)  # 5x5 window


def _pairs(t: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t at p, t at p + (dy, dx)) over every p where both lie inside the image."""
    h, w = t.shape[-2:]
    y0, y1, x0, x1 = max(0, -dy), h - max(0, dy), max(0, -dx), w - max(0, dx)
    return t[..., y0:y1, x0:x1], t[..., y0 + dy : y1 + dy, x0 + dx : x1 + dx]


def sci_loss(
    refined: torch.Tensor, lq: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """SCI's unsupervised loss (Ma et al., CVPR 2022, Sec. 3.3) on the illumination that PTG-RM's
    output implies, per pixel and summed (as `charbonnier`): needs no ground truth.

    SCI models a low-light image as x = y * u (Retinex: enhanced image y, illumination u) and
    trains on `alpha * ||u - x||^2 + sum_i sum_{j in N(i)} w_ij |u_i - u_j|`, N(i) the 24
    neighbours of i in its 5x5 window, w_ij = exp(-sum_c (x_ic - x_jc)^2 / (2 sigma^2)) with x in
    YCbCr, alpha 1.5, sigma 10 (the authors' code). Applied to PTG-RM: u = clamp(x / y, 1e-4, 1)
    with y PTG-RM's refined output clamped to [1e-3, 1], i.e. the illumination under which the
    refined image explains the input. Clamping y to at most 1 keeps u >= x, as SCI's own
    parametrisation (u = sigmoid(.) + x) does; without it an output growing without bound drives u
    to its floor and the loss to ~0 (measured: a white image). The fidelity term is a mean over
    pixels and channels, each smoothness term a mean over the pixels that have that neighbour, as theirs.
    `base` is not read. Its minimum is a white output (docs/training.md): prefer --loss zerodce."""
    x = lq.float()
    u = torch.clamp(x / refined.float().clamp(1e-3, 1), 1e-4, 1)
    fidelity = torch.mean((u - x) ** 2)
    ycc = torch.einsum("oc,bchw->bohw", x.new_tensor(YCBCR), x)
    smooth = x.new_zeros(())
    for dy, dx in NEIGHBOURS:
        (a, b), (ua, ub) = _pairs(ycc, dy, dx), _pairs(u, dy, dx)
        weight = torch.exp(-((a - b) ** 2).sum(1) / (2 * SCI_SIGMA**2))
        smooth = smooth + torch.mean(weight * (ua - ub).abs().sum(1))
    return (SCI_FIDELITY * fidelity + smooth) * refined.numel()


# ZeroDCE (Guo et al., CVPR 2020): weights of its authors' training code (lowlight_train.py)
ZERODCE_WEIGHTS = {"spatial": 1.0, "exposure": 10.0, "colour": 5.0, "smoothness": 200.0}
ZERODCE_E = 0.6  # exposure target: mean intensity of each 16x16 patch
ZERODCE_PATCH = 16
ZERODCE_REGION = 4  # spatial consistency compares 4x4 region means with their 4 neighbours
FOUR_NEIGHBOURS = ((0, -1), (0, 1), (-1, 0), (1, 0))


def spatial_consistency(enhanced: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """L_spa = 1/K sum_i sum_{j in 4-neighbours(i)} ((Y_i - Y_j) - (I_i - I_j))^2 over the K 4x4
    regions of the channel mean, Y of the enhanced image, I of the input: the enhanced image keeps
    the input's local contrasts. Neighbours outside the image are left out (the authors' code
    zero-pads, which pulls the border regions towards the input itself)."""
    y = F.avg_pool2d(enhanced.mean(1, keepdim=True), ZERODCE_REGION)
    i = F.avg_pool2d(lq.mean(1, keepdim=True), ZERODCE_REGION)
    total = enhanced.new_zeros(())
    for dy, dx in FOUR_NEIGHBOURS:
        (ya, yb), (ia, ib) = _pairs(y, dy, dx), _pairs(i, dy, dx)
        total = total + (((ya - yb) - (ia - ib)) ** 2).sum()
    return total / y.numel()


def exposure_control(enhanced: torch.Tensor, e: float = ZERODCE_E) -> torch.Tensor:
    """L_exp = 1/M sum_k (Y_k - E)^2 over the M non-overlapping 16x16 patches of the channel mean
    (squared as in the authors' code; their paper writes |Y_k - E|)."""
    return torch.mean((F.avg_pool2d(enhanced.mean(1, keepdim=True), ZERODCE_PATCH) - e) ** 2)


def colour_constancy(enhanced: torch.Tensor) -> torch.Tensor:
    """L_col: the grey-world assumption on each image's channel means J^R, J^G, J^B,
    sqrt(sum_{(p,q)} ((J^p - J^q)^2)^2) over the pairs RG, RB, GB, as the authors' code; the
    mean over the batch."""
    r, g, b = enhanced.mean((2, 3)).unbind(1)
    return torch.sqrt(((r - g) ** 2) ** 2 + ((r - b) ** 2) ** 2 + ((g - b) ** 2) ** 2).mean()


def illumination_smoothness(a: torch.Tensor) -> torch.Tensor:
    """L_tvA of the authors' code: per image, 2 (sum (A_{y+1,x} - A_{y,x})^2 / ((H-1) W)
    + sum (A_{y,x+1} - A_{y,x})^2 / (H (W-1))), summed over channels; the mean over the batch."""
    h, w = a.shape[-2:]
    dh = ((a[..., 1:, :] - a[..., :-1, :]) ** 2).sum() / ((h - 1) * w)
    dw = ((a[..., :, 1:] - a[..., :, :-1]) ** 2).sum() / (h * (w - 1))
    return 2 * (dh + dw) / a.shape[0]


def zerodce_terms(
    refined: torch.Tensor, lq: torch.Tensor, base: torch.Tensor, e: float = ZERODCE_E
) -> dict:
    """The four ZeroDCE terms of PTG-RM's refined output (unclamped, so that an output beyond
    [0, 1] is pulled back), its smoothness term on PTG-RM's correction refined - clamp(base, 0, 1),
    which plays the role of ZeroDCE's curve maps A (the correction, not the image, is smooth)."""
    y = refined.float()
    return {
        "spatial": spatial_consistency(y, lq.float()),
        "exposure": exposure_control(y, e),
        "colour": colour_constancy(y),
        "smoothness": illumination_smoothness(y - base.float().clamp(0, 1)),
    }


def zerodce_loss(
    refined: torch.Tensor, lq: torch.Tensor, base: torch.Tensor, e: float = ZERODCE_E
) -> torch.Tensor:
    """ZeroDCE's no-reference loss, 1 L_spa + 10 L_exp + 5 L_col + 200 L_tvA (weights of the
    authors' training code; exposure target `e`), times the number of output values (summed, as
    `charbonnier`)."""
    terms = zerodce_terms(refined, lq, base, e)
    return sum(ZERODCE_WEIGHTS[k] * v for k, v in terms.items()) * refined.numel()


LOSSES = {
    "charbonnier": None,
    "sci": sci_loss,
    "zerodce": zerodce_loss,
}  # None: supervised Charbonnier on ground truth
NO_REFERENCE = (
    "zerodce",
    "sci",
)  # losses that read the input (and the base), never the ground truth
