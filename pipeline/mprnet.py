"""MPRNet (Zamir et al., CVPR 2021) in plain PyTorch: `--target mprnet-deblur|mprnet-derain|mprnet-denoise`.

Parameter names are those of the official implementation (github.com/swz30/MPRNet,
{Deblurring,Deraining,Denoising}/MPRNet.py), so the published checkpoints
(`model_deblurring.pth`, `model_deraining.pth`, `model_denoising.pth`, state dict under
`state_dict`) load with `strict=True`. The three published models differ only in width:
n_feat / scale_unetfeats / scale_orsnetfeats = 96/48/32 (deblurring), 40/20/16 (deraining),
80/48/32 (denoising); 8 channel-attention blocks per ORB, reduction 4, no biases.

As in the official code, one PReLU (a single learned slope) is shared by every block, so its
parameter appears in the state dict under the name of every block that uses it. Stage 1 sees
the image as four quadrants, stage 2 as two halves; the output is stage 3's. The official test
scripts reflect-pad to a multiple of 8 and crop back.
"""

from __future__ import annotations

import torch
from torch import nn

PAD_FACTOR = 8

# task -> (n_feat, scale_unetfeats, scale_orsnetfeats), the official checkpoint file
MPRNET_TASKS = {
    "deblur": ((96, 48, 32), "model_deblurring.pth"),
    "derain": ((40, 20, 16), "model_deraining.pth"),
    "denoise": ((80, 48, 32), "model_denoising.pth"),
}


def conv(cin: int, cout: int, k: int, bias: bool = False, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias, stride=stride)


class CALayer(nn.Module):
    """Channel attention: x * sigmoid(MLP(global mean of x))."""

    def __init__(self, channels: int, reduction: int, bias: bool):
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=bias),
            nn.ReLU(),
            nn.Conv2d(channels // reduction, channels, 1, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv_du(x.mean(dim=(2, 3), keepdim=True))


class CAB(nn.Module):
    """Channel attention block: x + CA(conv(act(conv(x))))."""

    def __init__(self, n: int, k: int, reduction: int, bias: bool, act: nn.Module):
        super().__init__()
        self.CA = CALayer(n, reduction, bias)
        self.body = nn.Sequential(conv(n, n, k, bias), act, conv(n, n, k, bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.CA(self.body(x))


class SAM(nn.Module):
    """Supervised attention: an image estimate from the features, and the features gated by it."""

    def __init__(self, n: int, k: int, bias: bool):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (
            conv(n, n, k, bias),
            conv(n, 3, k, bias),
            conv(3, n, k, bias),
        )

    def forward(self, x: torch.Tensor, x_img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.conv2(x) + x_img
        return self.conv1(x) * torch.sigmoid(self.conv3(img)) + x, img


class Resample(nn.Module):
    """Bilinear x`scale` (align_corners=False), then a 1x1 convolution cin -> cout. Used as
    DownSample (down), UpSample (up) and SkipUpSample (up, then + skip) under the attribute name
    the official code gives it."""

    def __init__(self, cin: int, cout: int, scale: float, attr: str):
        super().__init__()
        self.scale, self.attr = scale, attr
        setattr(
            self,
            attr,
            nn.Sequential(
                nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False),
                nn.Conv2d(cin, cout, 1, bias=False),
            ),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        y = getattr(self, self.attr)(x)
        return y if skip is None else y + skip


def _cabs(n: int, count: int, k, reduction, bias, act) -> nn.Sequential:
    return nn.Sequential(*[CAB(n, k, reduction, bias, act) for _ in range(count)])


class Encoder(nn.Module):
    """Three-level U-Net encoder; with `csff`, the previous stage's encoder and decoder features
    are added at each level (cross-stage feature fusion)."""

    def __init__(self, n: int, k: int, reduction: int, act, bias: bool, s: int, csff: bool):
        super().__init__()
        widths = (n, n + s, n + 2 * s)
        for i, c in enumerate(widths, 1):
            setattr(self, f"encoder_level{i}", _cabs(c, 2, k, reduction, bias, act))
        self.down12 = Resample(widths[0], widths[1], 0.5, "down")
        self.down23 = Resample(widths[1], widths[2], 0.5, "down")
        self.csff = csff
        if csff:
            for kind in ("enc", "dec"):
                for i, c in enumerate(widths, 1):
                    setattr(self, f"csff_{kind}{i}", nn.Conv2d(c, c, 1, bias=bias))

    def forward(self, x: torch.Tensor, enc=None, dec=None) -> list[torch.Tensor]:
        outs = []
        for i in (1, 2, 3):
            if i > 1:
                x = getattr(self, f"down{i - 1}{i}")(x)
            x = getattr(self, f"encoder_level{i}")(x)
            if self.csff and enc is not None and dec is not None:
                x = (
                    x
                    + getattr(self, f"csff_enc{i}")(enc[i - 1])
                    + getattr(self, f"csff_dec{i}")(dec[i - 1])
                )
            outs.append(x)
        return outs  # full, 1/2, 1/4 resolution


class Decoder(nn.Module):
    def __init__(self, n: int, k: int, reduction: int, act, bias: bool, s: int):
        super().__init__()
        widths = (n, n + s, n + 2 * s)
        for i, c in enumerate(widths, 1):
            setattr(self, f"decoder_level{i}", _cabs(c, 2, k, reduction, bias, act))
        self.skip_attn1 = CAB(widths[0], k, reduction, bias, act)
        self.skip_attn2 = CAB(widths[1], k, reduction, bias, act)
        self.up21 = Resample(widths[1], widths[0], 2, "up")
        self.up32 = Resample(widths[2], widths[1], 2, "up")

    def forward(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        enc1, enc2, enc3 = outs
        dec3 = self.decoder_level3(enc3)
        dec2 = self.decoder_level2(self.up32(dec3, self.skip_attn2(enc2)))
        dec1 = self.decoder_level1(self.up21(dec2, self.skip_attn1(enc1)))
        return [dec1, dec2, dec3]


class ORB(nn.Module):
    """Original-resolution block: x + conv(CABs(x))."""

    def __init__(self, n: int, k: int, reduction: int, act, bias: bool, num_cab: int):
        super().__init__()
        self.body = nn.Sequential(
            *[CAB(n, k, reduction, bias, act) for _ in range(num_cab)], conv(n, n, k)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ORSNet(nn.Module):
    """Stage 3: three ORBs at full resolution, each followed by stage 2's encoder and decoder
    features of one level (upsampled to full resolution)."""

    def __init__(
        self, n: int, s_ors: int, k: int, reduction: int, act, bias: bool, s: int, num_cab: int
    ):
        super().__init__()
        c = n + s_ors
        for i in (1, 2, 3):
            setattr(self, f"orb{i}", ORB(c, k, reduction, act, bias, num_cab))
        self.up_enc1 = Resample(n + s, n, 2, "up")
        self.up_dec1 = Resample(n + s, n, 2, "up")
        self.up_enc2 = nn.Sequential(
            Resample(n + 2 * s, n + s, 2, "up"), Resample(n + s, n, 2, "up")
        )
        self.up_dec2 = nn.Sequential(
            Resample(n + 2 * s, n + s, 2, "up"), Resample(n + s, n, 2, "up")
        )
        for kind in ("enc", "dec"):
            for i in (1, 2, 3):
                setattr(self, f"conv_{kind}{i}", nn.Conv2d(n, c, 1, bias=bias))

    def forward(self, x: torch.Tensor, enc: list, dec: list) -> torch.Tensor:
        ups = [
            (lambda t: t, lambda t: t),
            (self.up_enc1, self.up_dec1),
            (self.up_enc2, self.up_dec2),
        ]
        for i, (up_e, up_d) in enumerate(ups, 1):
            x = getattr(self, f"orb{i}")(x)
            x = (
                x
                + getattr(self, f"conv_enc{i}")(up_e(enc[i - 1]))
                + getattr(self, f"conv_dec{i}")(up_d(dec[i - 1]))
            )
        return x


class MPRNet(nn.Module):
    """Three stages: U-Net on quadrants, U-Net on halves (fed stage 1's features), then full
    resolution; output = input + stage 3's residual."""

    pad_factor = PAD_FACTOR

    def __init__(
        self,
        in_c: int = 3,
        out_c: int = 3,
        n_feat: int = 96,
        scale_unetfeats: int = 48,
        scale_orsnetfeats: int = 32,
        num_cab: int = 8,
        kernel_size: int = 3,
        reduction: int = 4,
        bias: bool = False,
    ):
        super().__init__()
        n, s, k, r = n_feat, scale_unetfeats, kernel_size, reduction
        act = nn.PReLU()  # one slope, shared by every block (as in the official code)
        for i in (1, 2, 3):
            setattr(
                self,
                f"shallow_feat{i}",
                nn.Sequential(conv(in_c, n, k, bias), CAB(n, k, r, bias, act)),
            )
        self.stage1_encoder = Encoder(n, k, r, act, bias, s, csff=False)
        self.stage1_decoder = Decoder(n, k, r, act, bias, s)
        self.stage2_encoder = Encoder(n, k, r, act, bias, s, csff=True)
        self.stage2_decoder = Decoder(n, k, r, act, bias, s)
        self.stage3_orsnet = ORSNet(n, scale_orsnetfeats, k, r, act, bias, s, num_cab)
        self.sam12 = SAM(n, 1, bias)
        self.sam23 = SAM(n, 1, bias)
        self.concat12 = conv(n * 2, n, k, bias)
        self.concat23 = conv(n * 2, n + scale_orsnetfeats, k, bias)
        self.tail = conv(n + scale_orsnetfeats, out_c, k, bias)

    def forward(self, x3_img: torch.Tensor) -> torch.Tensor:
        # x3_img: (B, 3, H, W), H and W multiples of 8
        h, w = x3_img.shape[-2:]
        halves = [x3_img[..., : h // 2, :], x3_img[..., h // 2 :, :]]  # top, bottom
        cat = lambda a, b, d: [torch.cat(p, d) for p in zip(a, b)]  # noqa: E731

        # stage 1: the four quadrants, features joined into halves
        feats = [
            [
                self.stage1_encoder(self.shallow_feat1(q))
                for q in (half[..., : w // 2], half[..., w // 2 :])
            ]
            for half in halves
        ]
        feat1 = [cat(left, right, 3) for left, right in feats]  # per half: 3 levels
        res1 = [self.stage1_decoder(f) for f in feat1]
        sam1 = [
            self.sam12(r[0], half) for r, half in zip(res1, halves)
        ]  # (features, image) per half

        # stage 2: the two halves, joined into the whole image
        feat2 = [
            self.stage2_encoder(self.concat12(torch.cat([self.shallow_feat2(half), s[0]], 1)), f, r)
            for half, s, f, r in zip(halves, sam1, feat1, res1)
        ]
        feat2 = cat(feat2[0], feat2[1], 2)
        res2 = self.stage2_decoder(feat2)
        x3_sam, _ = self.sam23(res2[0], x3_img)

        # stage 3: full resolution
        x3 = self.concat23(torch.cat([self.shallow_feat3(x3_img), x3_sam], 1))
        return self.tail(self.stage3_orsnet(x3, feat2, res2)) + x3_img


def mprnet_config(task: str, **overrides) -> dict:
    """The published MPRNet configuration of a task; `overrides` change it (tests, variants)."""
    if task not in MPRNET_TASKS:
        raise ValueError(f"unknown MPRNet task {task!r}; known: {', '.join(MPRNET_TASKS)}")
    n, s, s_ors = MPRNET_TASKS[task][0]
    base = {
        "in_c": 3,
        "out_c": 3,
        "n_feat": n,
        "scale_unetfeats": s,
        "scale_orsnetfeats": s_ors,
        "num_cab": 8,
        "kernel_size": 3,
        "reduction": 4,
        "bias": False,
    }
    return {**base, **overrides}
