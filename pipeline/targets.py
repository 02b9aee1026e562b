"""Frozen target restorers: `target(lq, meta) -> base`, float32 (H, W, 3), unclamped.

Each target has an `id` (its member name in the store) and a `spec()` that goes into the
member key. Registry: TARGETS at the bottom; `build_target(name)`.
"""
from __future__ import annotations

import numpy as np



class Identity:
    """base = lq: the refinement module alone, a baseline."""

    id = "identity"
    weights = "none"

    def spec(self) -> dict:
        return {"target": self.id}

    def __call__(self, lq: np.ndarray, meta: dict) -> np.ndarray:
        return lq.astype(np.float32)


class Wiener:
    """Non-blind Wiener deconvolution with a Laplacian prior: classical, needs no weights.

    It is given the blur kernel that the degradation drew (recorded in `pairs/meta`), as in
    non-blind deblurring benchmarks; it stands in for a trained deblurring network on the demo
    and really restores (several dB over the blurred input), while leaving ringing and
    amplified noise for the refinement module to remove. Images without a recorded kernel
    (real blurred photos) cannot use it.
    """

    id = "wiener"
    weights = "none"

    def __init__(self, lam: float = 0.02, pad: int = 24):
        self.lam, self.pad = lam, pad

    def spec(self) -> dict:
        return {"target": self.id, "lam": self.lam, "pad": self.pad, "prior": "laplacian"}

    def __call__(self, lq: np.ndarray, meta: dict) -> np.ndarray:
        if "kernel" not in meta:
            raise ValueError("target 'wiener' is non-blind: it needs the blur kernel recorded by the "
                             "deblur degradation, and this sample has none")
        k = np.asarray(meta["kernel"], np.float64)
        r = self.pad
        x = np.pad(lq.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="edge")
        h, w = x.shape[:2]
        lap = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float64)
        otf_k, otf_l = _otf(k, h, w), _otf(lap, h, w)
        gain = np.conj(otf_k) / (np.abs(otf_k) ** 2 + self.lam * np.abs(otf_l) ** 2)
        out = np.stack([np.fft.irfft2(np.fft.rfft2(x[..., c]) * gain, s=(h, w)) for c in range(3)], -1)
        return out[r:-r, r:-r].astype(np.float32)


def _otf(kernel: np.ndarray, h: int, w: int) -> np.ndarray:
    """Optical transfer function of a centred kernel on an (h, w) grid."""
    pad = np.zeros((h, w))
    kh, kw = kernel.shape
    pad[:kh, :kw] = kernel
    pad = np.roll(pad, (-(kh // 2), -(kw // 2)), axis=(0, 1))
    return np.fft.rfft2(pad)


TARGETS = {"identity": Identity, "wiener": Wiener}


def build_target(name: str, **params):
    """A target by registry name; `params` (e.g. from a stored spec) override its defaults."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(sorted(TARGETS))}")
    return TARGETS[name](**params)
