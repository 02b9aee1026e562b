"""Image-quality metrics as the paper reports them: PSNR and SSIM on uint8 RGB (or on Y).

SSIM: 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma), K1 0.01, K2 0.03, population
covariance, per channel then averaged, borders excluded: scikit-image's
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
PSNR and the float -> uint8 conversion are `stores.stats.psnr` / `to_uint8` (one implementation,
shared with `python -m stores info --stats`).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from common.metrics import psnr


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """uint8 RGB -> Y of YCbCr as MATLAB's `rgb2ycbcr` gives it for uint8 input (ITU-R BT.601,
    studio range, rounded half away from zero to uint8), the convention of the deraining
    evaluation scripts; float64 array of whole numbers in [16, 235]."""
    x = img.astype(np.float64) / 255
    return np.floor(16 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2] + 0.5)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM of (H, W) or (H, W, C) images; channels are averaged."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    return float(
        np.mean([_ssim_channel(a[..., c], b[..., c], data_range) for c in range(a.shape[2])])
    )


def _ssim_channel(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    blur = lambda z: gaussian_filter(z, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = 5  # (11 - 1) // 2: the window does not fit at the border
    return float(s[pad:-pad, pad:-pad].mean())


def quality(pred: np.ndarray, gt: np.ndarray, space: str = "rgb") -> dict:
    """PSNR and SSIM of uint8 images on RGB, or on Y (`space='y'`, deraining tables)."""
    if space == "y":
        p, g = rgb_to_y(pred), rgb_to_y(gt)
        return {"psnr": psnr(p, g), "ssim": ssim(p, g)}
    return {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt)}
