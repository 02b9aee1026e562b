"""Restormer (Zamir et al., CVPR 2022) in plain PyTorch, for `python -m pipeline features --target restormer-<task>`.

Parameter names are those of the official implementation (github.com/swz30/Restormer,
basicsr/models/archs/restormer_arch.py), so the published checkpoints (`motion_deblurring.pth`,
`deraining.pth`, `real_denoising.pth`, `gaussian_color_denoising_*.pth`, ...; state dict under
`params`) load with `strict=True`. Published configuration: dim 48, num_blocks [4, 6, 6, 8],
4 refinement blocks, heads [1, 2, 4, 8], FFN expansion 2.66, no conv biases; LayerNorm
'WithBias' (deblurring, deraining, defocus) or 'BiasFree' (all denoising models). 26,126,644
parameters with 'WithBias'. Input height and width must be multiples of 8 (three 2x
downsamplings); the official test scripts reflect-pad to a multiple of 8 and crop back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAD_FACTOR = 8  # 2 ** (number of downsamplings)


class _ChannelNorm(nn.Module):
    """LayerNorm over the channels of every pixel; BiasFree scales without centring the output."""

    def __init__(self, dim: int, with_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if with_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W); statistics over C in place, no permute or copy (the official to_3d
        # permutes to (B, HW, C)): the same bits as the permuting form that made stored bases
        var = x.var(1, keepdim=True, unbiased=False)  # (B, 1, H, W)
        weight = self.weight[:, None, None]  # (C, 1, 1)
        if self.bias is None:
            return x / torch.sqrt(var + 1e-5) * weight
        bias = self.bias[:, None, None]
        return (x - x.mean(1, keepdim=True)) / torch.sqrt(var + 1e-5) * weight + bias


class LayerNorm(nn.Module):
    def __init__(self, dim: int, layer_norm_type: str):
        super().__init__()
        if layer_norm_type not in ("WithBias", "BiasFree"):
            raise ValueError(
                f"LayerNorm_type must be 'WithBias' or 'BiasFree', not {layer_norm_type!r}"
            )
        self.body = _ChannelNorm(dim, with_bias=layer_norm_type == "WithBias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class FeedForward(nn.Module):
    """Gated-Dconv feed-forward network (GDFN)."""

    def __init__(self, dim: int, expansion: float, bias: bool):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)  # 2 x (B, hidden, H, W)
        return self.project_out(F.gelu(gate) * value)  # (B, dim, H, W)


class Attention(nn.Module):
    """Multi-Dconv head transposed attention (MDTA): attention across channels, not pixels."""

    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)  # 3 x (B, C, H, W)
        q, k, v = (
            t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v)
        )  # (B, heads, C/heads, HW)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(
            dim=-1
        )  # (B, heads, C/heads, C/heads)
        out = (attn @ v).reshape(b, c, h, w)
        return self.project_out(out)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, expansion: float, bias: bool, layer_norm_type: str):
        super().__init__()
        self.norm1 = LayerNorm(dim, layer_norm_type)
        self.attn = Attention(dim, heads, bias)
        self.norm2 = LayerNorm(dim, layer_norm_type)
        self.ffn = FeedForward(dim, expansion, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, 2C, H/2, W/2): conv to C/2 channels, then pixel-unshuffle."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C/2, 2H, 2W): conv to 2C channels, then pixel-shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False), nn.PixelShuffle(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Restormer(nn.Module):
    """Four-level encoder-decoder of transformer blocks; output = input + predicted residual
    (dual-pixel defocus: 6 input channels, a skip convolution and no global residual)."""

    def __init__(
        self,
        inp_channels: int = 3,
        out_channels: int = 3,
        dim: int = 48,
        num_blocks=(4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads=(1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        LayerNorm_type: str = "WithBias",
        dual_pixel_task: bool = False,
    ):
        super().__init__()

        def stage(width: int, n: int, n_heads: int) -> nn.Sequential:
            return nn.Sequential(
                *[
                    TransformerBlock(width, n_heads, ffn_expansion_factor, bias, LayerNorm_type)
                    for _ in range(n)
                ]
            )

        d1, d2, d3, d4 = dim, dim * 2, dim * 4, dim * 8
        self.patch_embed = OverlapPatchEmbed(inp_channels, d1)
        self.encoder_level1 = stage(d1, num_blocks[0], heads[0])
        self.down1_2 = Downsample(d1)
        self.encoder_level2 = stage(d2, num_blocks[1], heads[1])
        self.down2_3 = Downsample(d2)
        self.encoder_level3 = stage(d3, num_blocks[2], heads[2])
        self.down3_4 = Downsample(d3)
        self.latent = stage(d4, num_blocks[3], heads[3])
        self.up4_3 = Upsample(d4)
        self.reduce_chan_level3 = nn.Conv2d(d4, d3, 1, bias=bias)
        self.decoder_level3 = stage(d3, num_blocks[2], heads[2])
        self.up3_2 = Upsample(d3)
        self.reduce_chan_level2 = nn.Conv2d(d3, d2, 1, bias=bias)
        self.decoder_level2 = stage(d2, num_blocks[1], heads[1])
        self.up2_1 = Upsample(d2)  # no channel reduction at level 1: the decoder runs at 2 * dim
        self.decoder_level1 = stage(d2, num_blocks[0], heads[0])
        self.refinement = stage(d2, num_refinement_blocks, heads[0])
        self.dual_pixel_task = dual_pixel_task
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(d1, d2, 1, bias=bias)
        self.output = nn.Conv2d(d2, out_channels, 3, padding=1, bias=bias)

    def forward(self, inp_img: torch.Tensor) -> torch.Tensor:
        # inp_img: (B, Cin, H, W), H and W multiples of 8; dim = C below
        emb = self.patch_embed(inp_img)  # (B, C, H, W)
        enc1 = self.encoder_level1(emb)  # (B, C, H, W)
        enc2 = self.encoder_level2(self.down1_2(enc1))  # (B, 2C, H/2, W/2)
        enc3 = self.encoder_level3(self.down2_3(enc2))  # (B, 4C, H/4, W/4)
        latent = self.latent(self.down3_4(enc3))  # (B, 8C, H/8, W/8)

        dec3 = torch.cat([self.up4_3(latent), enc3], 1)  # (B, 8C, H/4, W/4)
        dec3 = self.decoder_level3(self.reduce_chan_level3(dec3))  # (B, 4C, H/4, W/4)
        dec2 = torch.cat([self.up3_2(dec3), enc2], 1)  # (B, 4C, H/2, W/2)
        dec2 = self.decoder_level2(self.reduce_chan_level2(dec2))  # (B, 2C, H/2, W/2)
        dec1 = torch.cat([self.up2_1(dec2), enc1], 1)  # (B, 2C, H, W)
        dec1 = self.refinement(self.decoder_level1(dec1))  # (B, 2C, H, W)

        if self.dual_pixel_task:
            return self.output(dec1 + self.skip_conv(emb))  # (B, Cout, H, W)
        return self.output(dec1) + inp_img  # (B, Cout, H, W): global residual
