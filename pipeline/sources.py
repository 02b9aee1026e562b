"""Image sources: the built-in `demo` photos and paired or clean image folders, split by image.

`open_source("demo", "train", patch=192)` lists samples without loading pixels; each sample's
`load()` returns (gt, lq) as uint8 (H, W, 3) arrays, lq being None when the task degrades gt.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from stores import dataset_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Demo: real colour photos shipped inside the scikit-image wheel, split by image (the stereo
# pair stays together so no scene is in both splits).
DEMO_SPLITS = {
    "train": ["astronaut", "motorcycle_left", "motorcycle_right", "hubble_deep_field",
              "immunohistochemistry", "retina"],
    "test": ["chelsea", "coffee", "rocket"],
}


class SourceError(ValueError):
    """A dataset folder or image that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Sample:
    name: str
    load: Callable[[], tuple]  # () -> (gt uint8 (H,W,3), lq uint8 (H,W,3) or None)
    hw: tuple  # (H, W) of the valid image


@dataclass(frozen=True)
class Source:
    dataset: str  # short name used in store names: "demo" or the folder's name
    split: str
    samples: list
    fingerprint: dict = field(repr=False)  # everything that determines the pixels
    paired: bool  # True: lq comes from the data; False: the task's degradation makes it

    @property
    def is_demo(self) -> bool:
        return self.dataset == "demo"


def open_source(data: str, split: str, patch: int = 192, stride: int = 64, cap: int = 48) -> Source:
    """`data` is `demo` or a folder. Demo training photos are cut into patch x patch tiles every
    `stride` px (overlapping: more samples, each with its own degradation), at most `cap` evenly
    spread tiles per photo so that the large, mostly dark ones do not dominate."""
    if data == "demo":
        return _demo(split, patch, stride, cap)
    return _folder(Path(data), split)


# -- demo -----------------------------------------------------------------------------------
def _demo_image(name: str) -> np.ndarray:
    import skimage.data as skd

    if name.startswith("motorcycle_"):
        left, right, _ = skd.stereo_motorcycle()
        img = left if name.endswith("left") else right
    else:
        img = getattr(skd, name)()
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _demo(split: str, patch: int, stride: int, cap: int) -> Source:
    if split not in DEMO_SPLITS:
        raise SourceError(f"demo has splits {sorted(DEMO_SPLITS)}, not {split!r}")
    samples, prints = [], {}
    for name in DEMO_SPLITS[split]:
        img = _demo_image(name)
        prints[name] = hashlib.sha256(img.tobytes()).hexdigest()
        h, w = img.shape[:2]
        if split == "test":  # evaluation uses the full photos
            samples.append(Sample(name, _const(img), (h, w)))
            continue
        corners = [(y, x) for y in range(0, h - patch + 1, stride) for x in range(0, w - patch + 1, stride)]
        keep = np.unique(np.linspace(0, len(corners) - 1, min(cap, len(corners))).round().astype(int))
        for y, x in (corners[k] for k in keep):
            tile = img[y:y + patch, x:x + patch]
            samples.append(Sample(f"{name}@{y}_{x}", _const(tile), (patch, patch)))
    fingerprint = {"dataset": "demo", "images": prints, "split": split,
                   "tiles": [patch, stride, cap] if split == "train" else None}
    return Source("demo", split, samples, fingerprint, paired=False)


def _const(img):
    return lambda: (img, None)


# -- folders --------------------------------------------------------------------------------
def _folder(root: Path, split: str) -> Source:
    """Layouts: `<root>/<split>/{lq,gt}/` (real pairs) or `<root>/<split>/gt/` or images in
    `<root>/<split>/` (clean images that the task degrades)."""
    base = root / split
    tried = [f"{base}/lq + {base}/gt (pairs)", f"{base}/gt (clean)", f"{base}/*.png|jpg (clean)"]
    if not root.is_dir():
        raise SourceError(f"dataset folder {root} does not exist")
    if (base / "lq").is_dir() and (base / "gt").is_dir():
        gts = _images(base / "gt")
        lqs = {p.name: p for p in _images(base / "lq")}
        missing = [p.name for p in gts if p.name not in lqs]
        if missing:
            raise SourceError(f"{base}/lq lacks the inputs for {len(missing)} gt images, e.g. {missing[:3]}")
        pairs = [(g, lqs[g.name]) for g in gts]
        paired = True
    else:
        folder = base / "gt" if (base / "gt").is_dir() else base
        pairs = [(g, None) for g in _images(folder)] if folder.is_dir() else []
        paired = False
    if not pairs:
        raise SourceError(f"no images for split {split!r} in {root}; layouts tried: " + "; ".join(tried))
    samples = [Sample(g.name, _file_loader(g, q), _image_size(g)) for g, q in pairs]
    for g, q in pairs:
        if q is not None and _image_size(q) != _image_size(g):
            raise SourceError(f"{q}: size {_image_size(q)} differs from its gt {g} {_image_size(g)}")
    files = {str(p.relative_to(root)): _sha256(p) for pair in pairs for p in pair if p is not None}
    return Source(dataset_name(str(root)), split, samples, {"dataset": dataset_name(str(root)), "files": files,
                                                        "split": split}, paired=paired)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _image_size(path: Path) -> tuple:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception as e:
        raise SourceError(f"cannot read image {path}: {e}; expected an RGB image file "
                          f"({', '.join(IMAGE_SUFFIXES)})") from e


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3); any failure names the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated files fail here with their name
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:
        raise SourceError(f"cannot read image {path}: {e}; expected an RGB image file "
                          f"({', '.join(IMAGE_SUFFIXES)})") from e
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _file_loader(gt: Path, lq: Path | None):
    return lambda: (read_image(gt), read_image(lq) if lq is not None else None)
