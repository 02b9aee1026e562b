"""Synthetic degradations: pure functions `f(img, rng, **params) -> (lq, drawn)`, seeded per sample.

`img` is float32 (H, W, 3) in [0, 1]; `lq` is returned the same way (the store quantises it to
uint8); `drawn` is a JSON-able dict of what the generator drew, stored in `pairs/meta`.
"""
from __future__ import annotations

import numpy as np
from scipy.signal import fftconvolve


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index`: independent of order, workers and task boundaries."""
    return np.random.default_rng([seed, index])


def motion_kernel(rng: np.random.Generator, size: int = 19, length=(5.0, 15.0),
                  inertia: float = 0.7) -> np.ndarray:
    """A random camera-shake trajectory rasterised into a (size, size) kernel summing to 1.

    As in motion-deblur practice (Boracchi & Foi style trajectories): a random walk whose
    direction keeps `inertia` of its previous heading, scaled to a total path `length` in px,
    splatted bilinearly at sub-pixel steps and centred on its centroid.
    """
    steps = 96
    total = rng.uniform(*length)
    heading = rng.uniform(0, 2 * np.pi)
    turns = rng.normal(0, 1 - inertia, steps)
    angles = heading + np.cumsum(turns)
    path = np.cumsum(np.stack([np.cos(angles), np.sin(angles)], 1) * total / steps, axis=0)
    path -= path.mean(0)
    path = np.clip(path, -(size // 2) + 1, size // 2 - 1) + size // 2
    k = np.zeros((size, size))
    x0, y0 = np.floor(path[:, 0]).astype(int), np.floor(path[:, 1]).astype(int)
    fx, fy = path[:, 0] - x0, path[:, 1] - y0
    for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                        (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(k, (y0 + dy, x0 + dx), wgt)
    k = np.round(k / k.sum(), 5)  # rounded so the recorded kernel is exactly the one applied
    return k / k.sum()


def convolve(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Per-channel 2-D convolution with reflected borders; output has the input's size."""
    r = kernel.shape[0] // 2
    padded = np.pad(img, ((r, r), (r, r), (0, 0)), mode="reflect")
    return np.stack([fftconvolve(padded[..., c], kernel, mode="valid") for c in range(img.shape[2])], -1)


def deblur(img: np.ndarray, rng: np.random.Generator, kernel_size: int = 19, length=(5.0, 15.0),
           noise=(0.5, 2.0)) -> tuple[np.ndarray, dict]:
    """Motion blur with a random trajectory kernel plus mild Gaussian noise (sigma in /255)."""
    k = motion_kernel(rng, kernel_size, length)
    sigma = rng.uniform(*noise) / 255.0
    lq = convolve(img, k) + rng.normal(0.0, sigma, img.shape)
    return np.clip(lq, 0, 1).astype(np.float32), {"kernel": k.tolist(), "noise_sigma": sigma}


DEGRADATIONS = {
    "deblur": (deblur, {"kernel_size": 19, "length": [5.0, 15.0], "noise": [0.5, 2.0]}),
}
