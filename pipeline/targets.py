"""Frozen target restorers: `target(lq, meta) -> base`, float32 (H, W, 3), unclamped.

Each target has an `id` (its member name in the store) and a `spec()` that goes into the
member key. Registry: TARGETS at the bottom; `build_target(name)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
from scipy.ndimage import gaussian_filter, median_filter

from .degrade import in_strips


@dataclass(frozen=True)
class Classical:
    """A classical target: no weights; its parameters are its fields and, with `fixed`
    (settings that are not parameters), make its spec."""

    id: ClassVar[str]
    weights: ClassVar[str] = "none"
    fixed: ClassVar[dict] = {}

    def spec(self) -> dict:
        return {"target": self.id, **asdict(self), **self.fixed}


@dataclass(frozen=True)
class Identity(Classical):
    """base = lq: the refinement module alone, a baseline."""

    id = "identity"

    def __call__(self, lq: np.ndarray, meta: dict) -> np.ndarray:
        return lq.astype(np.float32)


@dataclass(frozen=True)
class Wiener(Classical):
    """Non-blind Wiener deconvolution with a Laplacian prior: classical, needs no weights.

    It is given the blur kernel that the degradation drew (recorded in `pairs/meta`), as in
    non-blind deblurring benchmarks; it stands in for a trained deblurring network on the demo
    and really restores (several dB over the blurred input), while leaving ringing and
    amplified noise for the refinement module to remove. Images without a recorded kernel
    (real blurred photos) cannot use it.
    """

    id = "wiener"
    fixed = {"prior": "laplacian"}
    lam: float = 0.02
    pad: int = 24

    def __call__(self, lq: np.ndarray, meta: dict) -> np.ndarray:
        if "kernel" not in meta:
            raise ValueError(
                "target 'wiener' is non-blind: it needs the blur kernel recorded by the "
                "deblur degradation, and this sample has none"
            )
        k = np.asarray(meta["kernel"], np.float64)
        r = self.pad
        h, w = lq.shape[0] + 2 * r, lq.shape[1] + 2 * r
        lap = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float64)
        # gain = conj(K) / (|K|^2 + lam |L|^2), built in place (the same operations, so the same bits)
        denom = self.lam * np.abs(_otf(lap, h, w)) ** 2
        gain = _otf(k, h, w)
        denom += np.abs(gain) ** 2
        np.conjugate(gain, out=gain)
        gain /= denom
        del denom
        out = np.empty(
            lq.shape, np.float32
        )  # channel by channel: one float64 plane in memory at a time
        for c in range(lq.shape[2]):
            f = np.fft.rfft2(np.pad(lq[..., c].astype(np.float64), r, mode="edge"))
            f *= gain
            out[..., c] = np.fft.irfft2(f, s=(h, w))[r:-r, r:-r]
        return out


def _otf(kernel: np.ndarray, h: int, w: int) -> np.ndarray:
    """Optical transfer function of a centred kernel on an (h, w) grid."""
    pad = np.zeros((h, w))
    kh, kw = kernel.shape
    pad[:kh, :kw] = kernel
    pad = np.roll(pad, (-(kh // 2), -(kw // 2)), axis=(0, 1))
    return np.fft.rfft2(pad)


@dataclass(frozen=True)
class GammaCorrection(Classical):
    """Blind exposure correction for low light: the gamma that lifts the mean luminance to
    `level`, then a light Gaussian smoothing of the amplified noise. Classical, no weights."""

    id = "gamma"
    level: float = 0.45
    smooth: float = 0.7

    def __call__(self, lq: np.ndarray, meta: dict) -> np.ndarray:
        mean = float(np.clip(lq.mean(), 1e-4, 0.99))
        power = np.log(self.level) / np.log(mean)
        halo = int(
            4.0 * self.smooth + 0.5
        )  # gaussian_filter's radius (truncate=4): strips with it are exact
        smooth = (self.smooth, self.smooth, 0)
        return in_strips(lambda x: gaussian_filter(np.clip(x, 0, 1) ** power, smooth), lq, halo)


@dataclass(frozen=True)
class StreakFilter(Classical):
    """Rain-streak removal: pixels brighter than their `size` x `size` median in every channel
    (bright, achromatic: streaks) are blended towards that median, softly above `thr`."""

    id = "streaks"
    size: int = 7
    thr: float = 0.03

    def __call__(self, lq: np.ndarray, meta: dict) -> np.ndarray:
        med = np.stack([median_filter(lq[..., c], size=self.size) for c in range(lq.shape[2])], -1)
        w = np.clip(((lq - med).min(-1) - self.thr) / self.thr, 0, 1)[..., None]
        return (lq * (1 - w) + med * w).astype(np.float32)


@dataclass(frozen=True)
class NonLocalMeans(Classical):
    """Blind non-local means denoising (noise sigma estimated from the image). No weights."""

    id = "nlmeans"
    fixed = {"sigma": "estimated"}
    strength: float = 0.8
    patch: int = 5
    window: int = 6

    def __call__(self, lq: np.ndarray, meta: dict) -> np.ndarray:
        from skimage.restoration import denoise_nl_means

        sigma = noise_sigma(lq)
        halo = 2 * (
            self.patch + self.window
        )  # a pixel depends on patches within window + patch // 2
        return in_strips(
            lambda x: denoise_nl_means(
                x,
                h=self.strength * sigma,
                sigma=sigma,
                fast_mode=True,
                patch_size=self.patch,
                patch_distance=self.window,
                channel_axis=-1,
            ),
            lq,
            halo,
        )  # large images strip by strip


def noise_sigma(img: np.ndarray) -> float:
    """Immerkaer's (1996) fast estimate of white-noise sigma, averaged over channels."""
    from scipy.signal import convolve2d

    m = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    h, w = img.shape[:2]
    per = [
        np.abs(convolve2d(img[..., c], m, mode="valid")).sum()
        * np.sqrt(np.pi / 2)
        / (6 * (w - 2) * (h - 2))
        for c in range(img.shape[2])
    ]
    return float(np.mean(per))


TARGETS = {
    "identity": Identity,
    "wiener": Wiener,
    "gamma": GammaCorrection,
    "streaks": StreakFilter,
    "nlmeans": NonLocalMeans,
}


def build_target(
    name: str, checkpoint=None, allow_random: bool = False, init_seed: int = 0, **params
):
    """A target by registry name, a built-in network (`restormer-<task>`, `mprnet-<task>`,
    `uformer-b`, `snr-aware`) or `module.path:factory`; networks need `checkpoint` (built-in ones
    take seeded random weights instead when `allow_random`) and take `tile`, `overlap`, `device`,
    `compile`;
    `params` override defaults."""
    from .names import is_network_target
    from .networks import NETWORK_TARGETS, build_network_target

    if is_network_target(name):
        return build_network_target(
            name, checkpoint, allow_random=allow_random, init_seed=init_seed, **params
        )
    if name not in TARGETS:
        raise ValueError(
            f"unknown target {name!r}; known: {', '.join(sorted(TARGETS) + list(NETWORK_TARGETS))}, "
            f"or module.path:factory"
        )
    if checkpoint is not None:
        raise ValueError(f"target {name!r} is classical and takes no checkpoint")
    if params.keys() & {"tile", "overlap", "device", "compile"}:
        raise ValueError(
            f"target {name!r} is classical: --target-tile, --target-overlap, --target-compile and "
            f"--device apply to network targets only (it runs on whole images on the CPU)"
        )
    return TARGETS[name](**params)
