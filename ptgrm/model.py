"""PTG-RM: the refinement module that turns a frozen restorer's output into a refined image.

Plain-PyTorch re-implementation of the Pre-Train-Guided Refinement Module of
"Boosting Image Restoration via Priors from Pre-trained Models" (CVPR 2024).
Inputs: `base` (the target model's unclamped output), `lq` (the degraded input)
and `g` (the off-the-shelf-feature, OSF, vector of a pre-trained model).

Layout (latent resolution h = H/4, w = W/4, width c = 16):
  encoder R_e -> f -> SVE (mask R_m mixing long-range R_l and short-range R_s)
  -> f_hat -> CSA (channel attention R_c, per-pixel-filter spatial attention
  R_p/R_o) -> fusion R_f -> f_bar -> decoder R_d -> I_r.
With all switches on and osf_dim=512 the module has exactly 671,735 parameters.
"""

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

SLOPE = 0.1  # LeakyReLU negative slope used everywhere


@dataclass(frozen=True)
class PTGRMConfig:
    osf_dim: int = 512
    width: int = 16
    n_blocks: int = 4
    output: str = "code"  # "code": clamp(base)+I_r ; "eq1": Eq.1 of the paper
    sve: bool = True
    channel_attention: bool = True
    spatial_attention: bool = True
    position_embedding: bool = True
    osf_mapping: bool = True  # False: tile g itself instead of the T_m / T_c MLPs
    use_g: bool = True  # False: no OSF at all, g is ignored

    def __post_init__(self):
        if self.output not in ("code", "eq1"):
            raise ValueError(f"output must be 'code' or 'eq1', got {self.output!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PTGRMConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PTGRMConfig keys: {sorted(unknown)}")
        return cls(**d)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def replicate_pad1(x: torch.Tensor) -> torch.Tensor:
    """Replicate padding of 1 px. Under torch.compile as edge indexing (the same values): the
    compiled backward of replication_pad2d fails on a CPU (torch 2.14: its meta kernel's strides);
    eager keeps F.pad, so eager results stay bit for bit what they were."""
    if not torch.compiler.is_compiling():
        return F.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[-2:]
    rows = torch.arange(-1, h + 1, device=x.device).clamp(0, h - 1)
    cols = torch.arange(-1, w + 1, device=x.device).clamp(0, w - 1)
    return x[..., rows, :][..., cols]


def per_pixel_filter(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """out[b,c,y,x] = sum_{i,j<3} pad(x)[b,c,y+i,x+j] * kernels[b,c*9+i*3+j,y,x].

    x: (B,C,H,W); kernels: (B,C*9,H,W); replicate padding of 1.
    """
    b, c, h, w = x.shape
    patches = F.unfold(replicate_pad1(x), kernel_size=3)
    # unfold's channel index is c*9 + i*3 + j, matching the kernel layout
    prod = patches * kernels.reshape(b, c * 9, h * w)  # (B, C*9, HW)
    return prod.view(b, c, 9, h, w).sum(dim=2)  # (B, C, H, W)


def conv3(cin, cout, stride=1, bias=False):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def conv1(cin, cout, bias=False):
    return nn.Conv2d(cin, cout, 1, bias=bias)


def lrelu():
    return nn.LeakyReLU(SLOPE)


def tile(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return v[:, :, None, None].expand(-1, -1, h, w)  # (B,D) -> (B,D,h,w)


def coord_grid(b, h, w, like: torch.Tensor) -> torch.Tensor:
    # channel 0 varies along height, channel 1 along width
    ys = torch.linspace(-1, 1, h, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1, 1, w, device=like.device, dtype=like.dtype)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # (2, h, w)
    return grid.unsqueeze(0).expand(b, -1, -1, -1)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels of a (B,C,H,W) map, per pixel, with bias."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=False)
        x = (x - mu) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class MDTA(nn.Module):
    """Restormer multi-Dconv-head transposed attention (attention over channels)."""

    def __init__(self, dim, heads=1):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = conv1(dim, dim * 3)
        self.qkv_dw = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=False)
        self.proj = conv1(dim, dim)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv_dw(self.qkv(x)).chunk(3, dim=1)  # 3 x (B,C,h,w)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature  # (B,heads,C',C')
        out = attn.softmax(dim=-1) @ v  # (B,heads,C',hw)
        return self.proj(out.reshape(b, c, h, w))


class GDFN(nn.Module):
    """Restormer gated-Dconv feed-forward network."""

    def __init__(self, dim, expansion=2.66):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = conv1(dim, hidden * 2)
        self.dw = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = conv1(hidden, dim)

    def forward(self, x):
        x1, x2 = self.dw(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = MDTA(dim)
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = GDFN(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class ResBlock(nn.Module):
    """Residual block without BN: conv(bias) -> ReLU -> conv(bias) + identity."""

    def __init__(self, dim):
        super().__init__()
        self.conv1 = conv3(dim, dim, bias=True)
        self.conv2 = conv3(dim, dim, bias=True)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


def pos_embed(c):
    return nn.Sequential(conv3(2, c), lrelu(), conv1(c, c))  # P_m / P_c


def osf_mlp(d):
    return nn.Sequential(nn.Linear(d, 256, bias=False), lrelu(), nn.Linear(256, 64, bias=False))


class PTGRM(nn.Module):
    def __init__(self, cfg: PTGRMConfig = PTGRMConfig()):
        super().__init__()
        self.cfg = cfg
        c, d = cfg.width, cfg.osf_dim
        # channels contributed by g: T(g) (64), raw g (D) or nothing
        g_ch = (64 if cfg.osf_mapping else d) if cfg.use_g else 0
        s_ch = c if cfg.position_embedding else 0
        mlp = cfg.use_g and cfg.osf_mapping

        # encoder R_e: conv -> IN -> LReLU -> conv s2 -> IN -> conv s2
        self.enc_conv1 = conv3(6, c)
        self.enc_norm1 = nn.InstanceNorm2d(c, affine=True)
        self.enc_conv2 = conv3(c, c, stride=2)
        self.enc_norm2 = nn.InstanceNorm2d(c, affine=True)
        self.enc_conv3 = conv3(c, c, stride=2)

        # SVE: mask R_m mixes long-range R_l and short-range R_s
        if cfg.sve:
            self.pos_m = pos_embed(c) if cfg.position_embedding else None
            self.osf_m = osf_mlp(d) if mlp else None
            self.mask = nn.Sequential(conv3(c + g_ch + s_ch, c), lrelu(), conv3(c, 1))
            self.short = ResBlock(c)
        self.blocks = nn.Sequential(*[TransformerBlock(c) for _ in range(cfg.n_blocks)])

        # CSA: T_c is shared by channel attention and the kernel predictor
        csa = cfg.channel_attention or cfg.spatial_attention
        self.osf_c = osf_mlp(d) if (mlp and csa) else None
        if cfg.channel_attention:
            self.chan_att = nn.Sequential(
                nn.Linear(c + g_ch, c, bias=False), lrelu(), nn.Linear(c, c, bias=False)
            )
        if cfg.spatial_attention:
            self.pos_c = pos_embed(c) if cfg.position_embedding else None
            self.kernel_pred = nn.Sequential(
                conv3(c + g_ch + s_ch, c * 9), lrelu(), conv3(c * 9, c * 9)
            )
            self.spat_out = nn.Sequential(lrelu(), conv3(c, 1))  # R_o
        self.fuse = conv1(2 * c, c)  # R_f

        # decoder R_d: two x2 PixelShuffle stages back to H x W
        self.dec_up1 = conv3(c, 4 * c)
        self.dec_up2 = conv3(c, 4 * c)
        self.dec_conv = conv3(c, c, bias=True)
        out_ch = 3 if cfg.output == "code" else 4
        self.dec_out = conv3(c, out_ch, bias=True)
        # Design decision: the last conv starts at zero (weight and bias), so at
        # init I_r == 0 (and m_raw == 0 for eq1) and refined == clamp(base, 0, 1):
        # training starts exactly from the target model's output.
        nn.init.zeros_(self.dec_out.weight)
        nn.init.zeros_(self.dec_out.bias)

    def _osf(self, g, mlp, h, w):
        """g (B,D) -> tiled OSF channels (B,64 or D,h,w), or None without g."""
        if not self.cfg.use_g:
            return None
        v = mlp(g) if self.cfg.osf_mapping else g
        return tile(v, h, w)

    def _encode(self, base, lq):
        x = self.enc_conv1(torch.cat([base, lq], dim=1))  # (B,c,H,W)
        x = F.leaky_relu(self.enc_norm1(x), SLOPE)
        x = self.enc_norm2(self.enc_conv2(x))  # (B,c,H/2,W/2)
        return self.enc_conv3(x)  # (B,c,H/4,W/4)

    def _sve(self, f, g, grid):
        if not self.cfg.sve:
            return self.blocks(f)
        h, w = f.shape[-2:]
        parts = [f, self._osf(g, self.osf_m, h, w)]
        parts.append(self.pos_m(grid) if self.pos_m is not None else None)  # S_m
        m = torch.sigmoid(self.mask(torch.cat([p for p in parts if p is not None], 1)))  # (B,1,h,w)
        return m * self.blocks(f) + (1 - m) * self.short(f)

    def _channel_att(self, f_hat, g):
        if not self.cfg.channel_attention:
            return f_hat
        pooled = f_hat.mean(dim=(2, 3))  # (B,c)
        if self.cfg.use_g:
            t = self.osf_c(g) if self.cfg.osf_mapping else g  # (B,64 or D)
            pooled = torch.cat([pooled, t], dim=1)
        m_c = torch.sigmoid(self.chan_att(pooled))  # (B,c)
        return m_c[:, :, None, None] * f_hat

    def _spatial_att(self, f_hat, g, grid):
        if not self.cfg.spatial_attention:
            return f_hat
        h, w = f_hat.shape[-2:]
        parts = [f_hat, self._osf(g, self.osf_c, h, w)]
        parts.append(self.pos_c(grid) if self.pos_c is not None else None)  # S_c
        kp = self.kernel_pred(torch.cat([p for p in parts if p is not None], 1))  # (B,9c,h,w)
        m_hat_s = per_pixel_filter(f_hat, kp)  # (B,c,h,w)
        m_s = torch.sigmoid(self.spat_out(m_hat_s))  # (B,1,h,w)
        return m_s * f_hat

    def _decode(self, x):
        x = F.leaky_relu(F.pixel_shuffle(self.dec_up1(x), 2), SLOPE)  # (B,c,H/2,W/2)
        x = F.leaky_relu(F.pixel_shuffle(self.dec_up2(x), 2), SLOPE)  # (B,c,H,W)
        x = F.leaky_relu(self.dec_conv(x), SLOPE)
        return self.dec_out(x)  # (B,3 or 4,H,W)

    def forward(self, base, lq, g):
        b, _, H, W = base.shape
        if H % 4 or W % 4:
            raise ValueError(f"H and W must be divisible by 4, got H={H}, W={W}")
        if self.cfg.use_g and g.shape[-1] != self.cfg.osf_dim:
            raise ValueError(f"g has dim {g.shape[-1]}, expected {self.cfg.osf_dim}")

        f = self._encode(base, lq)  # (B,c,h,w), h=H/4, w=W/4
        grid = coord_grid(b, H // 4, W // 4, f) if self.cfg.position_embedding else None
        f_hat = self._sve(f, g, grid)  # (B,c,h,w)
        f_c = self._channel_att(f_hat, g)  # (B,c,h,w)
        f_s = self._spatial_att(f_hat, g, grid)  # (B,c,h,w)
        f_bar = self.fuse(torch.cat([f_c, f_s], dim=1)) + f_hat  # (B,c,h,w)
        out = self._decode(f_bar)  # (B,3 or 4,H,W)

        base_c = base.clamp(0, 1)
        if self.cfg.output == "code":
            return base_c + out  # refined = clamp(base) + I_r
        # Eq.1: refined = lq + (clamp(base) - lq) * I_m + I_r. Design decision:
        # I_m = 1 + m_raw (no squashing), with m_raw the zero-initialised first
        # output channel, so I_m == 1 at init. Computed in the algebraically equal
        # form clamp(base) + (clamp(base) - lq) * m_raw + I_r, which makes
        # refined == clamp(base) bit-exactly at init (lq + (b - lq) can round).
        m_raw, i_r = out[:, :1], out[:, 1:]  # (B,1,H,W), (B,3,H,W)
        return base_c + (base_c - lq) * m_raw + i_r
