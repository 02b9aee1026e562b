"""Uformer (Wang et al., CVPR 2022) in plain PyTorch: `--target uformer-b` (its SIDD denoising model).

Parameter names are those of the official implementation (github.com/ZhendongWang6/Uformer,
model.py), so the published Uformer-B SIDD checkpoint (README 'Pretrained model', state dict under
`state_dict`) loads with `strict=True`, including the stored `relative_position_index` buffers.
Uformer-B: embed_dim 32, depths [1, 2, 8, 8, 2, 8, 8, 2, 1], heads [1, 2, 4, 8, 16, 16, 8, 4, 2],
8x8 windows, MLP ratio 4, LeFF feed-forward, linear token projection, learnable modulators in the
decoder, shifted windows in every second block. As in the official code, a level shifts its
windows only when its resolution at the training patch size (`img_size`, 128 for SIDD) exceeds
the window, so the bottleneck (128 / 16 = 8) never shifts.

The official code reshapes tokens to square images; this one keeps height and width apart, which
is the same on square inputs (SIDD's 256x256 blocks) and also runs rectangular ones. Height and
width must be multiples of 16 * window (128): four 2x downsamplings, then whole windows.
"""

from __future__ import annotations

import torch
from torch import nn

UFORMER_B = {
    "img_size": 128,
    "in_chans": 3,
    "dd_in": 3,
    "embed_dim": 32,
    "depths": [1, 2, 8, 8, 2, 8, 8, 2, 1],
    "num_heads": [1, 2, 4, 8, 16, 16, 8, 4, 2],
    "win_size": 8,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "modulator": True,
    "shift_flag": True,
}


def relative_position_index(win: int) -> torch.Tensor:
    """(win^2, win^2) index into the (2 win - 1)^2 table of relative offsets (Swin's layout)."""
    ys, xs = torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, win^2)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (
        win - 1
    )  # (win^2, win^2, 2), >= 0
    return rel[..., 0] * (2 * win - 1) + rel[..., 1]


def to_windows(x: torch.Tensor, win: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, win * win, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // win, win, w // win, win, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, win * win, c)


def from_windows(x: torch.Tensor, win: int, h: int, w: int) -> torch.Tensor:
    """Inverse of to_windows: (B * nW, win * win, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    x = x.view(-1, h // win, w // win, win, win, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shift_mask(h: int, w: int, win: int, shift: int, device) -> torch.Tensor:
    """(nW, win^2, win^2): -100 between positions that the cyclic shift brought together from
    different image regions, 0 elsewhere."""
    region = torch.zeros((1, h, w, 1), device=device)
    cuts = (slice(0, -win), slice(-win, -shift), slice(-shift, None))
    for i, rows in enumerate(cuts):
        for j, cols in enumerate(cuts):
            region[:, rows, cols, :] = i * 3 + j
    ids = to_windows(region, win)[..., 0]  # (nW, win^2)
    diff = ids[:, None, :] - ids[:, :, None]
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class LinearProjection(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_kv = nn.Linear(dim, dim * 2, bias=bias)

    def forward(self, x: torch.Tensor):
        b, n, c = x.shape
        q = (
            self.to_q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        )  # (B', heads, N, C/heads)
        kv = self.to_kv(x).reshape(b, n, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return q, kv[0], kv[1]


class WindowAttention(nn.Module):
    def __init__(self, dim: int, win: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads, self.win = heads, win
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * win - 1) ** 2, heads))
        self.register_buffer(
            "relative_position_index", relative_position_index(win)
        )  # in the checkpoints
        self.qkv = LinearProjection(dim, heads, qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape  # (B * nW, win^2, C)
        q, k, v = self.qkv(x)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B * nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            n, n, -1
        )
        attn = attn + bias.permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(b // nw, nw, self.heads, n, n) + mask[None, :, None]).view(
                -1, self.heads, n, n
            )
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class LeFF(nn.Module):
    """Locally-enhanced feed-forward: linear, GELU, depth-wise 3x3 conv, GELU, linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Sequential(nn.Linear(dim, hidden), nn.GELU())
        self.dwconv = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden), nn.GELU())
        self.linear2 = nn.Sequential(nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C)
        y = self.dwconv(self.linear1(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.linear2(y)


class LeWinBlock(nn.Module):
    """Window attention (shifted by `shift` when > 0) plus LeFF, pre-norm, both residual; the
    modulator (a learned per-window-position bias) is added to the attention input."""

    def __init__(
        self,
        dim: int,
        heads: int,
        win: int,
        shift: int,
        mlp_ratio: float,
        qkv_bias: bool,
        modulator: bool,
    ):
        super().__init__()
        self.win, self.shift = win, shift
        if modulator:
            self.modulator = nn.Embedding(win * win, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, win, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = LeFF(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C), H and W multiples of the window
        _, h, w, _ = x.shape
        s = self.shift
        y = self.norm1(x)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        windows = to_windows(y, self.win)  # (B * nW, win^2, C)
        if hasattr(self, "modulator"):
            windows = windows + self.modulator.weight
        mask = shift_mask(h, w, self.win, s, x.device) if s else None
        y = from_windows(self.attn(windows, mask), self.win, h, w)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class UformerLayer(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        win: int,
        shifts: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        modulator: bool,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                LeWinBlock(
                    dim,
                    heads,
                    win,
                    win // 2 if shifts and i % 2 else 0,
                    mlp_ratio,
                    qkv_bias,
                    modulator,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class _Conv(nn.Module):
    """A convolution on (B, H, W, C) tokens, stored as `<attr>.0` as the official code does."""

    def __init__(self, attr: str, conv: nn.Module, act: nn.Module | None = None):
        super().__init__()
        self.attr = attr
        setattr(self, attr, nn.Sequential(conv, *([act] if act is not None else [])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.attr)(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Uformer(nn.Module):
    """Encoder (4 levels, 4x4 stride-2 convolutions down), bottleneck, decoder (2x2 transposed
    convolutions up, skip concatenation); output = input + predicted residual (dd_in 3)."""

    def __init__(
        self,
        img_size: int = 128,
        in_chans: int = 3,
        dd_in: int = 3,
        embed_dim: int = 32,
        depths=(1, 2, 8, 8, 2, 8, 8, 2, 1),
        num_heads=(1, 2, 4, 8, 16, 16, 8, 4, 2),
        win_size: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        modulator: bool = True,
        shift_flag: bool = True,
    ):
        super().__init__()
        if img_size >> 4 < win_size:
            raise ValueError(
                f"img_size {img_size} / 16 must be at least win_size {win_size} (the official code "
                f"then shrinks the windows, which this implementation does not)"
            )
        self.pad_factor = 16 * win_size
        self.dd_in = dd_in
        d = embed_dim

        def layer(level: int, dim: int, i: int, mod: bool = False) -> UformerLayer:
            shifts = shift_flag and (img_size >> level) > win_size
            return UformerLayer(
                dim, depths[i], num_heads[i], win_size, shifts, mlp_ratio, qkv_bias, mod
            )

        self.input_proj = _Conv("proj", nn.Conv2d(dd_in, d, 3, 1, 1), nn.LeakyReLU())
        self.output_proj = _Conv("proj", nn.Conv2d(2 * d, in_chans, 3, 1, 1))
        for lv in range(4):
            setattr(self, f"encoderlayer_{lv}", layer(lv, d << lv, lv))
            setattr(
                self, f"dowsample_{lv}", _Conv("conv", nn.Conv2d(d << lv, d << (lv + 1), 4, 2, 1))
            )
        self.conv = layer(4, d * 16, 4)
        for i, lv in enumerate(
            (3, 2, 1, 0)
        ):  # decoder i works at level lv with twice its encoder width
            cin = d * 16 if i == 0 else d << (lv + 2)
            setattr(self, f"upsample_{i}", _Conv("deconv", nn.ConvTranspose2d(cin, d << lv, 2, 2)))
            setattr(self, f"decoderlayer_{i}", layer(lv, d << (lv + 1), 5 + i, modulator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, H, W), H and W multiples of 16 * win_size
        y = self.input_proj(x.permute(0, 2, 3, 1))  # (B, H, W, C)
        skips = []
        for lv in range(4):
            y = getattr(self, f"encoderlayer_{lv}")(y)
            skips.append(y)
            y = getattr(self, f"dowsample_{lv}")(y)  # (B, H/2, W/2, 2C)
        y = self.conv(y)
        for i in range(4):
            y = torch.cat([getattr(self, f"upsample_{i}")(y), skips[3 - i]], -1)
            y = getattr(self, f"decoderlayer_{i}")(y)
        out = self.output_proj(y).permute(0, 3, 1, 2)  # (B, 3, H, W)
        return x + out if self.dd_in == 3 else out
