"""Image conversions both stages share: uint8 images to tensors, PNG files, and the flip encoding
of g. (float -> uint8 and PSNR are `stores.stats.to_uint8` / `psnr`: the store's `info --stats`
computes PSNR without torch.)

The flip encoding: g is stored for 4 flip variants of lq, `variant = h + 2 * v` in FLIPS order,
where `h` flips the width and `v` the height. Encoders compute g of each variant; the loaders crop
and flip lq/base/gt the same way and take g of that variant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stores import atomic_path

FLIPS = ("none", "h", "v", "hv")  # h flips width, v flips height; index = h + 2 * v
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def flip(x, variant: int):
    """`x` seen in flip `variant` (FLIPS order): a numpy image (H, W, ...) is flipped on its first
    two axes (views, no copy), a torch tensor (..., H, W) on its last two."""
    if isinstance(x, np.ndarray):
        x = x[:, ::-1] if variant & 1 else x
        return x[::-1] if variant & 2 else x
    x = x.flip(-1) if variant & 1 else x
    return x.flip(-2) if variant & 2 else x


def image_tensor(img: np.ndarray, device=None) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W) float32 in [0, 1] on `device`."""
    x = torch.from_numpy(np.require(img, requirements=("C", "W"))).to(device)
    return x.permute(2, 0, 1)[None].float() / 255


def flip_views(
    img: np.ndarray, size: tuple[int, int], device, interpolation: str = "bicubic"
) -> torch.Tensor:
    """uint8 (H, W, 3) -> (4, 3, *size) float in [0, 1]: the whole image resized (antialiased, no
    crop), then its flips in FLIPS order."""
    return batch_views([img], size, device, interpolation)


UPLOAD_PIXELS = 1 << 25  # at most this many source pixels go up and are resized in one call


def batch_views(
    images: list[np.ndarray], size: tuple[int, int], device, interpolation: str = "bicubic"
) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (4N, 3, *size) float in [0, 1], the 4 flips of each image in turn
    (image-major, FLIPS order): `flip_views` of every image, computed per size bucket. The images
    of one size go to the device as one uint8 upload, are resized in one call and flipped as one
    batch (at most UPLOAD_PIXELS source pixels at a time); every view equals the one image's
    `flip_views` bit for bit (tests/test_encoders.py)."""
    out = torch.empty(len(images), len(FLIPS), 3, *size, device=device)
    buckets: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        buckets.setdefault(img.shape, []).append(i)
    for shape, idx in buckets.items():
        step = max(1, UPLOAD_PIXELS // max(1, shape[0] * shape[1]))
        for k in range(0, len(idx), step):
            part = idx[k : k + step]
            stack = np.stack([np.require(images[i], requirements="C") for i in part])
            x = torch.from_numpy(stack).to(device).permute(0, 3, 1, 2).float() / 255
            x = F.interpolate(
                x, size=tuple(size), mode=interpolation, antialias=True, align_corners=False
            ).clamp(0, 1)
            # flipping after the resize equals resizing the flipped image (the resize is symmetric)
            out[part] = torch.stack([flip(x, v) for v in range(len(FLIPS))], dim=1)
    return out.flatten(0, 1)


def save_png(path: Path, img: np.ndarray) -> Path:
    """uint8 (h, w, 3) -> PNG, written atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")
    return path
