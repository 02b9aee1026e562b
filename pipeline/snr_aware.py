"""SNR-Aware low-light enhancement (Xu et al., CVPR 2022), the restorer PTG-RM's SID row refines.

`python -m pipeline features --target snr-aware --target-weights SID.pth`. Parameter names are
those of the authors' code (github.com/dvlab-research/SNR-Aware, models/archs/low_light_transformer.py,
and the same restorer inside the PTG-RM joint network, pretrain_model_boost_restoration,
models/archs/low_light_transformer648_final.py), so SNR-Aware's own checkpoints (`LOLv1.pth`,
`LOLv2_real.pth`, `sid_G.pth`) and the restorer part of PTG-RM's `SID.pth` (its `refinement11.`
keys are PTG-RM, not this network) load with `strict=True`. Published configuration: nf 64, one
residual block before and after the transformer, HR_in (three input convolutions, two of stride 2),
six transformer layers over 4x4 feature patches (d_model 1024, 8 heads of 64).

The SNR map is computed from the input, as the authors' data path does: a 5x5 box blur of the
frame (`cv2.blur(frame * 255, (5, 5)) / 255`, OpenCV's default reflect-101 border), then
luma(blur) / (|luma(frame) - luma(blur)| + 1e-4), divided by its maximum (+1e-4) over the image and
clamped to [0, 1]. The luma weights 0.299, 0.587, 0.114 apply to channels 0, 1, 2 in the order
the network is given (for SID that is BGR: see docs/networks.md). Height and width must be
multiples of 4; the transformer covers the largest multiple of 16 and, as in the authors' code, the
feature rows and columns beyond it get the convolutional branch only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PAD_FACTOR = 4  # two stride-2 convolutions, undone by two pixel shuffles
LUMA = (0.299, 0.587, 0.114)


def blurred_frame(frame: np.ndarray) -> np.ndarray:
    """The authors' blurred frame: `cv2.blur(frame * 255, (5, 5)) / 255` of a float32 (H, W, 3)
    frame in [0, 1] (5x5 mean, OpenCV's default reflect-101 border)."""
    import cv2

    return cv2.blur(np.ascontiguousarray(frame, np.float32) * 255.0, (5, 5)) / 255.0


def snr_map(img: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) SNR map, as the authors compute it (the blur with
    OpenCV on the CPU in float32, like their data loader, so the map matches theirs bit for bit)."""
    frames = img.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    light = (
        torch.from_numpy(np.stack([blurred_frame(f) for f in frames]))
        .permute(0, 3, 1, 2)
        .to(img.device)
    )
    luma = lambda t: t[:, 0:1] * LUMA[0] + t[:, 1:2] * LUMA[1] + t[:, 2:3] * LUMA[2]  # noqa: E731
    dark, light = luma(img.float()), luma(light)
    ratio = light / (torch.abs(dark - light) + 0.0001)
    peak = ratio.flatten(1).max(dim=1)[0].view(-1, 1, 1, 1)
    return torch.clamp(ratio / (peak + 0.0001), 0.0, 1.0)


class ResidualBlock(nn.Module):
    """x + conv(relu(conv(x))), 3x3 convolutions with bias."""

    def __init__(self, nf: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


def _blocks(nf: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResidualBlock(nf) for _ in range(n)])


class PatchSelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over patch tokens; keys of low-SNR patches are masked."""

    def __init__(self, d_model: int, heads: int, d_head: int):
        super().__init__()
        self.heads, self.d_head = heads, d_head
        self.w_qs = nn.Linear(d_model, heads * d_head, bias=False)
        self.w_ks = nn.Linear(d_model, heads * d_head, bias=False)
        self.w_vs = nn.Linear(d_model, heads * d_head, bias=False)
        self.fc = nn.Linear(heads * d_head, d_model, bias=False)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # x: (B, L, d_model); keep: (B, L), 0 where a key patch is masked out
        b, n, _ = x.shape
        t = self.layer_norm(x)
        split = lambda y: y.view(b, n, self.heads, self.d_head).transpose(1, 2)  # noqa: E731  (B, heads, L, d_head)
        q, k, v = split(self.w_qs(t)), split(self.w_ks(t)), split(self.w_vs(t))
        attn = (q / math.sqrt(self.d_head)) @ k.transpose(2, 3)  # (B, heads, L, L)
        attn = attn.masked_fill(keep[:, None, None, :] == 0, -1e9).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)  # (B, L, heads * d_head)
        return x + self.fc(out)


class PatchFeedForward(nn.Module):
    def __init__(self, d_model: int, d_inner: int):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_inner)
        self.w_2 = nn.Linear(d_inner, d_model)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w_2(F.relu(self.w_1(self.layer_norm(x))))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_inner: int, heads: int, d_head: int):
        super().__init__()
        self.slf_attn = PatchSelfAttention(d_model, heads, d_head)
        self.pos_ffn = PatchFeedForward(d_model, d_inner)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.pos_ffn(self.slf_attn(x, keep))


class PatchTransformer(nn.Module):
    def __init__(self, d_model: int, d_inner: int, n_layers: int, heads: int, d_head: int):
        super().__init__()
        self.layer_stack = nn.ModuleList(
            [EncoderLayer(d_model, d_inner, heads, d_head) for _ in range(n_layers)]
        )

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        for layer in self.layer_stack:
            x = layer(x, keep)
        return x


class SNRAware(nn.Module):
    """The SNR-Aware restorer: long-range (transformer over 4x4 feature patches, attending only to
    patches whose mean SNR exceeds 0.5) where the SNR is low, short-range (residual blocks) where
    it is high, mixed per pixel by the SNR map; output = input + predicted residual.

    Input (B, 3, H, W): the SNR map is computed from it; (B, 4, H, W): channel 3 is the SNR map,
    computed beforehand on the whole image (the target does so before padding or tiling).
    """

    pad_factor = PAD_FACTOR

    def __init__(
        self,
        nf: int = 64,
        front_RBs: int = 1,
        back_RBs: int = 1,
        light_RBs: int = 6,
        n_layers: int = 6,
        heads: int = 8,
        d_head: int = 64,
        patch: int = 4,
    ):
        super().__init__()
        self.patch = patch
        self.conv_first_1 = nn.Conv2d(3, nf, 3, 1, 1, bias=True)
        self.conv_first_2 = nn.Conv2d(nf, nf, 3, 2, 1, bias=True)
        self.conv_first_3 = nn.Conv2d(nf, nf, 3, 2, 1, bias=True)
        self.feature_extraction = _blocks(nf, front_RBs)
        self.recon_trunk = _blocks(nf, back_RBs)
        self.upconv1 = nn.Conv2d(nf * 2, nf * 4, 3, 1, 1, bias=True)
        self.upconv2 = nn.Conv2d(nf * 2, nf * 4, 3, 1, 1, bias=True)
        self.HRconv = nn.Conv2d(nf * 2, nf, 3, 1, 1, bias=True)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1, bias=True)
        d_model = nf * patch * patch
        self.transformer = PatchTransformer(d_model, d_model * 2, n_layers, heads, d_head)
        self.recon_trunk_light = _blocks(nf, light_RBs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = x[:, :3]  # (B, 3, H, W), H and W multiples of 4
        snr = x[:, 3:4] if x.shape[1] == 4 else snr_map(img)  # (B, 1, H, W)
        act = lambda t: F.leaky_relu(t, 0.1)  # noqa: E731
        f1 = act(self.conv_first_1(img))  # (B, nf, H, W)
        f2 = act(self.conv_first_2(f1))  # (B, nf, H/2, W/2)
        f3 = act(self.conv_first_3(f2))  # (B, nf, H/4, W/4)
        fea = self.feature_extraction(f3)
        short = self.recon_trunk_light(fea)
        h, w = fea.shape[-2:]
        mask = F.interpolate(snr, size=[h, w], mode="nearest")  # (B, 1, H/4, W/4)
        p = self.patch
        tokens = F.unfold(fea, kernel_size=p, stride=p).transpose(1, 2)  # (B, L, nf * p * p)
        keep = F.unfold(mask, kernel_size=p, stride=p).mean(dim=1)  # (B, L): mean SNR per patch
        keep = torch.where(keep <= 0.5, torch.zeros_like(keep), keep)
        tokens = self.transformer(tokens, keep)
        long = F.fold(
            tokens.transpose(1, 2), output_size=(h, w), kernel_size=p, stride=p
        )  # zeros beyond the patches
        fea = long * (1 - mask) + short * mask
        out = self.recon_trunk(fea)
        out = act(F.pixel_shuffle(self.upconv1(torch.cat([out, f3], 1)), 2))  # (B, nf, H/2, W/2)
        out = act(F.pixel_shuffle(self.upconv2(torch.cat([out, f2], 1)), 2))  # (B, nf, H, W)
        out = act(self.HRconv(torch.cat([out, f1], 1)))
        return self.conv_last(out) + img  # (B, 3, H, W)


def with_snr_map(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 4, H, W): the image and its SNR map, computed on the whole image."""
    return torch.cat([x, snr_map(x)], dim=1)
