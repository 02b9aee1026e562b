"""Image metrics without torch: uint8 conversion and PSNR (`stores info --stats`, evaluation)."""

from __future__ import annotations

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (any range) -> uint8, clamped and rounded as when saving a PNG. The
    project's one conversion: evaluation, reports and `restore` use it too."""
    return np.clip(np.round(np.asarray(x, np.float64) * 255), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """PSNR in dB (infinite for identical images); the project's one implementation
    (`training.metrics.quality` uses it on RGB and on Y)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))
