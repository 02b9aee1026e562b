"""One tiling for every network run on a large image: the frozen targets (`--target-tile`) and
PTG-RM's refinement in evaluation and `restore`.

Along each axis a length is cut into tiles of `tile` px that start on multiples of `factor` and
overlap by at least `overlap` px; each output pixel is kept from the tile where it lies furthest
from a cut (cuts lie mid-overlap), so every kept pixel has at least `overlap // 2` px of context.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def pad_to(x: torch.Tensor, factor: int, mode: str = "reflect") -> torch.Tensor:
    """Pad bottom/right to a multiple of `factor`: `reflect` (replicate where the image is too
    small to reflect) or `replicate`."""
    ph, pw = -x.shape[-2] % factor, -x.shape[-1] % factor
    if not ph and not pw:
        return x
    if mode == "reflect" and not (ph < x.shape[-2] and pw < x.shape[-1]):
        mode = "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def pad_square(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad to a square whose side is max(H, W) rounded up to a multiple of `factor`, the image
    at the centre ((side - H) // 2 rows above, (side - W) // 2 columns left): Uformer's
    `expand2square`. Returns the square and (top, left), where the image lies in it."""
    h, w = x.shape[-2:]
    side = -(-max(h, w) // factor) * factor
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(x, (left, side - w - left, top, side - h - top)), (top, left)


def spans(length: int, tile: int, overlap: int, factor: int = 1) -> list[tuple[int, int, int, int]]:
    """Along one axis: (tile start, tile end, kept start, kept end). Tiles start on multiples of
    `factor` and overlap by >= `overlap`; cuts lie mid-overlap, so every kept pixel is at least
    overlap // 2 px from an inner tile edge."""
    if length <= tile:
        return [(0, length, 0, length)]
    stride = (tile - overlap) // factor * factor
    starts = list(range(0, length - tile, stride)) + [length - tile]
    cuts = [0] + [(starts[i - 1] + tile + starts[i]) // 2 for i in range(1, len(starts))] + [length]
    return [(s, s + tile, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]


def tiled(
    fn: Callable[..., torch.Tensor], inputs: tuple, tile: int, overlap: int, factor: int = 1
) -> torch.Tensor:
    """`fn(*crops)` on every tile of `inputs` (tensors (..., H, W) of one size), stitched into one
    (..., H, W) output from each tile's kept region (`spans`)."""
    h, w = inputs[0].shape[-2:]
    out = None
    for r0, r1, k0, k1 in spans(h, tile, overlap, factor):
        for c0, c1, j0, j1 in spans(w, tile, overlap, factor):
            y = fn(*(t[..., r0:r1, c0:c1] for t in inputs))  # (..., C, tile, tile)
            if out is None:
                out = y.new_zeros((*y.shape[:-2], h, w))
            out[..., k0:k1, j0:j1] = y[..., k0 - r0 : k1 - r0, j0 - c0 : j1 - c0]
    return out
