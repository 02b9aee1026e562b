"""Synthetic degradations: pure functions `f(img, rng, **params) -> (lq, drawn)`, seeded per sample.

`img` is float32 (H, W, 3) in [0, 1]; `lq` is returned the same way (the store quantises it to
uint8); `drawn` is a JSON-able dict of what the generator drew, stored in `pairs/meta`.

Large images are processed in horizontal strips of about STRIP_PX pixels, so memory follows the
strip, not the photo (a 12 MP image needs its uint8/float32 copies plus one strip of float64
work, instead of several full float64 copies). Noise is drawn strip after strip from the same
generator, which gives the very same numbers as one draw of the whole image; an image of at most
STRIP_PX pixels is one strip and goes through exactly the whole-image computation.
"""

from __future__ import annotations

import numpy as np


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index`: independent of order, workers and task boundaries."""
    return np.random.default_rng([seed, index])


def motion_kernel(
    rng: np.random.Generator, size: int = 19, length=(5.0, 15.0), inertia: float = 0.7
) -> np.ndarray:
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
    for dx, dy, wgt in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        np.add.at(k, (y0 + dy, x0 + dx), wgt)
    k = np.round(k / k.sum(), 5)  # rounded so the recorded kernel is exactly the one applied
    return k / k.sum()


STRIP_PX = 1 << 21  # pixels per strip of work (about 50 MB of float64 per full-image temporary)


def strips(h: int, w: int, px: int | None = None) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) covering an (h, w) image, about `px` (STRIP_PX) pixels each (one when it is small)."""
    rows = max(1, (px or STRIP_PX) // max(w, 1))
    return [(r0, min(h, r0 + rows)) for r0 in range(0, h, rows)]


def in_strips(fn, img: np.ndarray, halo: int) -> np.ndarray:
    """fn (an image -> same-size float image filter whose output pixel depends on input rows within
    `halo`) applied strip by strip, each strip with `halo` rows of context: the same values as
    fn(img) at a strip's memory, as float32."""
    out = np.empty(img.shape, np.float32)
    for r0, r1 in strips(*img.shape[:2]):
        a0, a1 = max(0, r0 - halo), min(img.shape[0], r1 + halo)
        out[r0:r1] = fn(img[a0:a1])[r0 - a0 : r1 - a0]
    return out


def blur_noise(
    img: np.ndarray, kernel: np.ndarray, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """clip(img * kernel + N(0, sigma)) as float32: per-channel 2-D convolution with reflected
    borders (output the input's size), computed strip by strip with the kernel's halo."""
    from scipy.signal import (
        fftconvolve,  # here, not at import: `make features` with nothing to do needs no scipy
    )

    r = kernel.shape[0] // 2
    rows = np.pad(
        np.arange(img.shape[0]), r, mode="reflect"
    )  # the rows np.pad(mode="reflect") of the whole takes
    out = np.empty(img.shape, np.float32)
    for r0, r1 in strips(*img.shape[:2]):
        part = np.pad(img[rows[r0 : r1 + 2 * r]], ((0, 0), (r, r), (0, 0)), mode="reflect")
        conv = np.stack(
            [fftconvolve(part[..., c], kernel, mode="valid") for c in range(img.shape[2])], -1
        )
        out[r0:r1] = np.clip(conv + rng.normal(0.0, sigma, conv.shape), 0, 1)
    return out


def deblur(
    img: np.ndarray,
    rng: np.random.Generator,
    kernel_size: int = 19,
    length=(5.0, 15.0),
    noise=(0.5, 2.0),
) -> tuple[np.ndarray, dict]:
    """Motion blur with a random trajectory kernel plus mild Gaussian noise (sigma in /255)."""
    k = motion_kernel(rng, kernel_size, length)
    sigma = rng.uniform(*noise) / 255.0
    return blur_noise(img, k, sigma, rng), {"kernel": k.tolist(), "noise_sigma": sigma}


def defocus(
    img: np.ndarray, rng: np.random.Generator, radius=(2.0, 5.0), noise=(0.5, 2.0)
) -> tuple[np.ndarray, dict]:
    """Defocus blur: a uniform disk of random radius (px, anti-aliased edge) plus mild noise."""
    r = rng.uniform(*radius)
    size = 2 * int(np.ceil(r)) + 3
    yy, xx = np.mgrid[:size, :size] - size // 2
    k = np.clip(r + 0.5 - np.hypot(yy, xx), 0, 1)
    k = np.round(k / k.sum(), 5)
    k /= k.sum()
    sigma = rng.uniform(*noise) / 255.0
    return blur_noise(img, k, sigma, rng), {"kernel": k.tolist(), "radius": r, "noise_sigma": sigma}


def lowlight(
    img: np.ndarray,
    rng: np.random.Generator,
    exposure=(0.08, 0.25),
    gamma=(1.2, 1.8),
    shot=(0.002, 0.01),
    read=(1.0, 3.0),
) -> tuple[np.ndarray, dict]:
    """Under-exposure: scale by `exposure`, raise to `gamma`, then signal-dependent (shot) and
    constant (read, /255) Gaussian noise, as a dark sensor image rendered to sRGB."""
    a, g = rng.uniform(*exposure), rng.uniform(*gamma)
    k, r = rng.uniform(*shot), rng.uniform(*read) / 255.0
    out = np.empty(img.shape, np.float32)
    for r0, r1 in strips(*img.shape[:2]):
        x = (img[r0:r1] * a) ** g
        out[r0:r1] = np.clip(x + rng.normal(0.0, 1.0, x.shape) * np.sqrt(k * x + r * r), 0, 1)
    return out, {"exposure": a, "gamma": g, "shot": k, "read_sigma": r}


def rain(
    img: np.ndarray,
    rng: np.random.Generator,
    density=(0.004, 0.01),
    length=(8, 20),
    angle=(-25.0, 25.0),
    strength=(0.5, 0.8),
) -> tuple[np.ndarray, dict]:
    """Synthetic rain: sparse drops smeared into streaks along one direction near vertical,
    softened, and screen-blended onto the image (bright, achromatic)."""
    from scipy.ndimage import gaussian_filter
    from scipy.signal import fftconvolve

    h, w = img.shape[:2]
    d, n = rng.uniform(*density), int(rng.integers(length[0], length[1] + 1))
    theta, amount = np.deg2rad(rng.uniform(*angle)), rng.uniform(*strength)
    drops = (rng.random((h, w)) < d) * rng.uniform(0.4, 1.0, (h, w))
    k = np.zeros((2 * n + 1, 2 * n + 1))
    for t in np.linspace(
        -n, n, 4 * n + 1
    ):  # a line through the centre at angle theta from vertical
        k[int(round(n + t * np.cos(theta))), int(round(n + t * np.sin(theta)))] = 1
    streaks = gaussian_filter(np.clip(fftconvolve(drops, k, mode="same"), 0, None), 0.7)
    del drops
    out = np.empty(img.shape, np.float32)
    for r0, r1 in strips(h, w):
        s = np.clip(streaks[r0:r1] * amount, 0, 1)[..., None]
        out[r0:r1] = np.clip(img[r0:r1] + s * (1 - img[r0:r1]), 0, 1)
    return out, {
        "density": d,
        "length": n,
        "angle_deg": float(np.rad2deg(theta)),
        "strength": amount,
    }


def gaussian_noise(
    img: np.ndarray, rng: np.random.Generator, sigma: float = 25.0
) -> tuple[np.ndarray, dict]:
    """Additive white Gaussian noise of `sigma` (on the 0-255 scale), as in the paper's tables."""
    out = np.empty(img.shape, np.float32)
    for r0, r1 in strips(*img.shape[:2]):
        out[r0:r1] = np.clip(
            img[r0:r1] + rng.normal(0.0, sigma / 255.0, (r1 - r0, *img.shape[1:])), 0, 1
        )
    return out, {"sigma": sigma}


DEGRADATIONS = {  # name -> (function, default parameters recorded in the pairs key)
    "deblur": (deblur, {"kernel_size": 19, "length": [5.0, 15.0], "noise": [0.5, 2.0]}),
    "defocus": (defocus, {"radius": [2.0, 5.0], "noise": [0.5, 2.0]}),
    "lowlight": (
        lowlight,
        {"exposure": [0.08, 0.25], "gamma": [1.2, 1.8], "shot": [0.002, 0.01], "read": [1.0, 3.0]},
    ),
    "derain": (
        rain,
        {
            "density": [0.004, 0.01],
            "length": [8, 20],
            "angle": [-25.0, 25.0],
            "strength": [0.5, 0.8],
        },
    ),
    "denoise15": (gaussian_noise, {"sigma": 15.0}),
    "denoise25": (gaussian_noise, {"sigma": 25.0}),
    "denoise50": (gaussian_noise, {"sigma": 50.0}),
}
