"""Image sources: the built-in `demo` photos and paired or clean image folders, split by image.

`open_source("demo", "train", patch=192)` lists samples without loading pixels; each sample's
`load()` returns (gt, lq) as uint8 (H, W, 3) arrays, lq being None when the task degrades gt.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from stores import canonical_json, dataset_name, sha256_file
from stores.keys import sha256_bytes

from .layouts import (
    BLOCKS_EXPECTED,
    IMAGE_SUFFIXES,
    PROTOCOLS,
    LayoutError,
    MatBlock,
    ProtocolFrame,
    list_pairs,
    parse_data,
)

# Demo: real colour photos shipped inside the scikit-image wheel, split by image (the stereo
# pair stays together so no scene is in both splits).
DEMO_SPLITS = {
    "train": [
        "astronaut",
        "motorcycle_left",
        "motorcycle_right",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
    ],
    "test": ["chelsea", "coffee", "rocket"],
}
# The test photos are cut into 33 non-overlapping tiles of this size (6 + 12 + 15), so that the
# bootstrap interval of a gain rests on more than 3 samples.
DEMO_TEST_TILE = 128


class SourceError(ValueError):
    """A dataset folder or image that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Sample:
    name: str
    load: Callable[[], tuple]  # () -> (gt uint8 (H,W,3), lq uint8 (H,W,3) or None, notes)
    hw: tuple  # (H, W) of the valid image
    ref: dict | None = field(
        default=None, compare=False
    )  # where its pixels are (pipeline/descriptors.py)


@dataclass(frozen=True)
class Source:
    dataset: str  # short name used in store names: "demo" or the folder's name
    split: str
    samples: list
    fingerprint: dict = field(repr=False)  # everything that determines the pixels
    paired: bool  # True: lq comes from the data; False: the task's degradation makes it
    records: dict | None = field(default=None, repr=False)  # folders: the stat cache (see _folder)


def open_source(
    data: str,
    split: str,
    patch: int = 192,
    stride: int = 64,
    cap: int = 48,
    known: dict | None = None,
) -> Source:
    """`data` is `demo` or a folder. Demo training photos are cut into patch x patch tiles every
    `stride` px (overlapping: more samples, each with its own degradation), at most `cap` evenly
    spread tiles per photo so that the large, mostly dark ones do not dominate. Demo test photos
    are cut into non-overlapping DEMO_TEST_TILE tiles (33 samples). `known`: the records of an
    earlier run (`Source.records`) whose hashes and sizes are trusted for files of unchanged
    (size, mtime)."""
    if data == "demo":
        return _demo(split, patch, stride, cap)
    try:
        return _folder(data, split, known)
    except LayoutError as e:
        raise SourceError(str(e)) from e


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
        if (
            split == "test"
        ):  # non-overlapping tiles of the held-out photos: enough samples for an interval
            for y in range(0, h - DEMO_TEST_TILE + 1, DEMO_TEST_TILE):
                for x in range(0, w - DEMO_TEST_TILE + 1, DEMO_TEST_TILE):
                    samples.append(_demo_tile(name, y, x, (DEMO_TEST_TILE, DEMO_TEST_TILE)))
            continue
        corners = [
            (y, x) for y in range(0, h - patch + 1, stride) for x in range(0, w - patch + 1, stride)
        ]
        keep = np.unique(
            np.linspace(0, len(corners) - 1, min(cap, len(corners))).round().astype(int)
        )
        for y, x in (corners[k] for k in keep):
            samples.append(_demo_tile(name, y, x, (patch, patch)))
    fingerprint = {
        "dataset": "demo",
        "images": prints,
        "split": split,
        "tiles": [patch, stride, cap]
        if split == "train"
        else [DEMO_TEST_TILE, DEMO_TEST_TILE, None],
    }
    return Source("demo", split, samples, fingerprint, paired=False)


@lru_cache(maxsize=4)  # the tiles of one photo are read one after another
def _demo_photo(name: str) -> np.ndarray:
    return _demo_image(name)


def _demo_tile(photo: str, y: int, x: int, hw: tuple) -> Sample:
    def load():
        return _demo_photo(photo)[y : y + hw[0], x : x + hw[1]].copy(), None, []

    return Sample(f"{photo}@{y}_{x}", load, tuple(hw), {"demo": photo, "y": y, "x": x})


# -- folders ---------------------------------------------------------------------------------
def _folder(data: str, split: str, known: dict | None = None) -> Source:
    """A dataset folder in one of the layouts of pipeline.layouts (named or detected).

    Each file is hashed (sha256) unless `known` has it with the same (size, mtime): a re-run costs a
    stat per file, not a read. `records` holds what the next run needs to trust: per file (size,
    mtime_ns, sha256), per sample its size, and which files changed (content differs) or were only
    touched since `known`."""
    layout, pairs = list_pairs(data, split)
    root = parse_data(data)[1]
    old = (known or {}).get("files", {})
    files, blocks, changed, touched = {}, {}, [], []
    for p in (p for pair in pairs for p in pair if p is not None):
        path = _utf8(p.path if isinstance(p, (MatBlock, ProtocolFrame)) else p)
        if (
            key := str(path.relative_to(root))
        ) not in files:  # hashed once, however many samples use it
            st = path.stat()
            was = old.get(key)
            if was is not None and was[:2] == [st.st_size, st.st_mtime_ns]:
                files[key] = was
            else:
                files[key] = [st.st_size, st.st_mtime_ns, sha256_file(path)]
                if was is not None:
                    (changed if was[2] != files[key][2] else touched).append(key)
        if isinstance(p, MatBlock):
            blocks.setdefault(f"{key}#{p.variable}", []).append(p.index)
    trusted = {k for k, v in files.items() if old.get(k) == v}
    old_hw = (known or {}).get("hw", {})
    samples = [
        _sample(
            root,
            g,
            q,
            old_hw if all(str(f.relative_to(root)) in trusted for f in _files(g, q)) else {},
        )
        for g, q in pairs
    ]
    name = dataset_name(str(root))
    fingerprint = {
        "dataset": name,
        "layout": layout,
        "split": split,
        "files": len(files),
        "sha256": sha256_bytes(
            canonical_json(sorted([k, v[2]] for k, v in files.items())).encode()
        ),
    }
    if (
        blocks
    ):  # which blocks of which arrays (absent for image files: their fingerprints are unchanged)
        fingerprint["blocks"] = sha256_bytes(canonical_json(blocks).encode())
    if all(
        g is q for g, q in pairs
    ):  # inputs only (`unpaired` train split): the stored gt is the input
        fingerprint["ground_truth"] = False
    if layout in PROTOCOLS:  # how frames are read (resize, channel order): part of the pairs key
        fingerprint["protocol"] = PROTOCOLS[layout]
    records = {
        "root": str(root.resolve()),
        "split": split,
        "files": files,
        "hw": {s.name: list(s.hw) for s in samples},
        "changed": changed,
        "touched": touched,
    }
    return Source(
        name, split, samples, fingerprint, paired=pairs[0][1] is not None, records=records
    )


def _utf8(path: Path) -> Path:
    """`path`, when it is valid UTF-8 text: sample names, records and keys hold it as text. A name
    the file system holds as other bytes (decoded to surrogates) is refused, naming its bytes."""
    try:
        str(path).encode()
    except UnicodeEncodeError:
        raise SourceError(
            f"file name {os.fsencode(path)!r} is not valid UTF-8 (sample names are stored as UTF-8 "
            f"text); rename it, e.g. `convmv -f latin1 -t utf8 -r --notest <dataset folder>`, "
            f"and run again"
        ) from None
    return path


def _files(gt, lq) -> list[Path]:
    return [
        p.path if isinstance(p, (MatBlock, ProtocolFrame)) else p for p in (gt, lq) if p is not None
    ]


def _sample(root: Path, gt, lq, known_hw: dict) -> Sample:
    """A sample; its size from `known_hw` (by name) when its files are unchanged, else the header."""
    ref = {"gt": _ref(root, gt), "lq": None if lq is None else _ref(root, lq)}
    if isinstance(gt, MatBlock):  # named e.g. test/SIDD/ValidationGtBlocksSrgb.mat#0007
        return Sample(
            f"{gt.path.relative_to(root)}#{gt.index:04d}", _block_loader(gt, lq), tuple(gt.hw), ref
        )
    if isinstance(gt, ProtocolFrame):
        return Sample(str(gt.path.relative_to(root)), _frame_loader(gt, lq), gt.hw, ref)
    name = str(gt.relative_to(root))
    hw = known_hw.get(name)
    return Sample(name, _file_loader(gt, lq), tuple(hw) if hw else _image_size(gt), ref)


def _ref(root: Path, p) -> dict:
    """Where one side of a pair is, relative to the dataset folder (JSON)."""
    if isinstance(p, MatBlock):
        return {"mat": str(p.path.relative_to(root)), "variable": p.variable, "block": p.index}
    if isinstance(p, ProtocolFrame):
        return {"frame": str(p.path.relative_to(root)), "size": list(p.size), "reverse": p.reverse}
    return {"file": str(p.relative_to(root))}


def _inside(root: Path, rel) -> Path:
    """root / rel for a descriptor's relative path; one that is absolute or climbs out of the
    dataset folder (`..`) is refused: a store never makes a task read files outside its data."""
    rel = Path(str(rel))
    if rel.is_absolute() or ".." in rel.parts:
        raise SourceError(
            f"sample descriptor path {str(rel)!r} is not inside the dataset folder {root}; "
            f"the store's _sources/samples was altered"
        )
    return root / rel


def _unref(root: Path, ref: dict | None, hw: tuple):
    if ref is None:
        return None
    if "mat" in ref:
        return MatBlock(_inside(root, ref["mat"]), ref["variable"], ref["block"], tuple(hw))
    if "frame" in ref:
        return ProtocolFrame(_inside(root, ref["frame"]), tuple(ref["size"]), ref["reverse"])
    return _inside(root, ref["file"])


def sample_of(root: Path | None, name: str, hw, ref: dict) -> Sample:
    """The Sample a descriptor (name, size, `Sample.ref`) describes, read with the same loaders as
    open_source's; nothing is listed or opened until it is loaded. `root`: the dataset folder."""
    hw = tuple(int(v) for v in hw)
    if ("demo" in ref) != (
        root is None
    ):  # a demo store's rows name demo photos, a folder's name files
        raise SourceError(
            f"sample descriptor {name!r}: {'a demo photo' if 'demo' in ref else 'a file'} in a "
            f"{'folder' if root is not None else 'demo'} store; the store's _sources/samples was altered"
        )
    if "demo" in ref:
        if not any(ref["demo"] in names for names in DEMO_SPLITS.values()):
            raise SourceError(
                f"sample descriptor {name!r}: {ref['demo']!r} is not a demo photo "
                f"({sorted(n for v in DEMO_SPLITS.values() for n in v)})"
            )
        return _demo_tile(ref["demo"], ref["y"], ref["x"], hw)
    gt, lq = _unref(root, ref["gt"], hw), _unref(root, ref["lq"], hw)
    loader = (
        _block_loader
        if isinstance(gt, MatBlock)
        else _frame_loader
        if isinstance(gt, ProtocolFrame)
        else _file_loader
    )
    return Sample(name, loader(gt, lq), hw, ref)


def _image_size(path: Path) -> tuple:
    """(H, W) from the header; (0, 0) when unreadable (the sample is excluded when loaded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:
        return 0, 0


# Modes Pillow decodes, and what each needs to become 8-bit RGB (docs: docs/usage.md, image modes).
GREY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
DEEP = "16-bit reduced to 8 bit"


def _rawmode(im) -> str:
    """How the file stores its samples ("RGB;16B" for 16-bit colour, which Pillow cuts to 8 bits);
    read before `load()`, which empties `tile`."""
    args = im.tile[0].args if im.tile else ""
    return str(args[0] if isinstance(args, tuple) and args else args)


def _from16(arr: np.ndarray) -> np.ndarray:
    return np.round(arr.astype(np.float64) / 257).astype(np.uint8)


def _to_rgb8(im, rawmode: str, data: bytes) -> tuple[np.ndarray, list[str]]:
    """A loaded image's pixels as uint8 (H, W, 3) and notes naming each conversion, in the order
    depth, colour, grayscale, alpha. Alpha and transparency are dropped (colours stay as stored,
    never composited); 16-bit values v become round(v / 257); "I" (32-bit integers) must hold
    16-bit values (0..65535) and "F" (32-bit floats) values in [0, 1] (x 255): any other range is
    ambiguous and raises ValueError."""
    mode = im.mode
    depth = colour = None
    if (
        mode in ("RGB", "RGBA", "LA") and ";16" in rawmode
    ):  # 16-bit colour: Pillow keeps 8 bits, OpenCV 16
        import cv2

        full = cv2.imdecode(
            np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED
        )  # ignores EXIF orientation too
        if full is None or full.dtype != np.uint16 or full.shape[:2] != (im.height, im.width):
            raise ValueError(f"OpenCV cannot decode its 16-bit {mode} pixels")
        depth, arr = (
            DEEP,
            _from16(full[..., 2::-1] if full.ndim == 3 and full.shape[2] >= 3 else full),
        )
    elif mode == "1":
        depth, arr = "1-bit expanded to 8 bit", np.asarray(im).astype(np.uint8) * 255
    elif mode.startswith("I;16"):
        depth, arr = DEEP, _from16(np.asarray(im))
    elif mode == "I":
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(
                f"32-bit integer pixels in {arr.min()}..{arr.max()}; expected 16-bit values 0..65535"
            )
        depth, arr = "32-bit integers read as 16-bit, reduced to 8 bit", _from16(arr)
    elif mode == "F":
        arr = np.asarray(im)
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
            raise ValueError(
                f"32-bit float pixels in {np.nanmin(arr)}..{np.nanmax(arr)} (or not finite); "
                f"expected values in [0, 1]"
            )
        depth, arr = (
            "32-bit floats in [0, 1] scaled to 8 bit",
            np.round(arr.astype(np.float64) * 255).astype(np.uint8),
        )
    elif mode in ("L", "LA", "RGB", "RGBA", "RGBX"):
        arr = np.asarray(im)
    else:  # palette, CMYK, YCbCr, ...: Pillow's own conversion
        colour = "palette expanded to RGB" if mode in ("P", "PA") else f"{mode} converted to RGB"
        arr = np.asarray(im.convert("RGB"))
    grey = mode in GREY_MODES
    if grey:
        arr = np.repeat((arr[..., 0] if arr.ndim == 3 else arr)[..., None], 3, axis=2)
    alpha = "A" in mode or "a" in mode or "transparency" in im.info
    notes = [
        depth,
        colour,
        "grayscale converted to RGB" if grey else None,
        "alpha channel dropped" if alpha else None,
    ]
    return arr[..., :3], [n for n in notes if n]


def read_image(path: Path) -> tuple[np.ndarray, list[str]]:
    """An image file as uint8 (H, W, 3) plus notes on conversions (_to_rgb8: 16-bit, palette,
    CMYK, grayscale, alpha, ...). EXIF orientation is ignored on every side of a pair: pixels are
    read as stored, as OpenCV and the (H, W) from the header see them (noted when the tag is set).

    Any failure (unreadable, truncated, unknown format, ambiguous range) raises SourceError naming the file.
    """
    from PIL import Image

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            rawmode = _rawmode(im)
            im.load()  # decode now, so truncated files fail here with their name
            arr, notes = _to_rgb8(im, rawmode, data)
            orientation = im.getexif().get(0x0112, 1)
    except Exception as e:
        raise SourceError(
            f"cannot read image {path}: {e}; expected an RGB image file "
            f"({', '.join(IMAGE_SUFFIXES)})"
        ) from e
    if orientation not in (1, None):
        notes.append(f"EXIF orientation {orientation} ignored: pixels read as stored")
    return np.ascontiguousarray(arr, dtype=np.uint8), notes


def _file_loader(gt: Path, lq: Path | None):
    def load():
        g, notes = read_image(gt)
        if lq is None:
            return g, None, notes
        q, lq_notes = read_image(lq)
        return g, q, notes + [f"lq: {n}" for n in lq_notes]

    return load


def read_frame(frame: ProtocolFrame) -> np.ndarray:
    """A frame by its layout's protocol (SID: np.load or image, cv2 bilinear resize of the uint8
    array, channels reversed) as uint8 (H, W, 3); SourceError naming the file when unusable."""
    import cv2

    if frame.path.suffix.lower() == ".npy":
        try:
            arr = np.load(frame.path, allow_pickle=False)  # never unpickles: no code runs
        except Exception as e:
            raise SourceError(
                f"cannot read {frame.path}: {type(e).__name__}: {e}; expected a .npy array of "
                f"uint8 (H, W, 3)"
            ) from e
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise SourceError(
                f"{frame.path}: array of {arr.dtype} {arr.shape}; expected uint8 (H, W, 3), as "
                f"SNR-Aware's SID files hold"
            )
    else:
        arr, _ = read_image(frame.path)
    arr = cv2.resize(
        np.ascontiguousarray(arr[..., :3]), tuple(frame.size)
    )  # (W, H); bilinear by default
    return np.ascontiguousarray(arr[..., ::-1] if frame.reverse else arr)


def _frame_loader(gt: ProtocolFrame, lq: ProtocolFrame):
    def load():
        return read_frame(gt), read_frame(lq), []

    return load


# -- image blocks in MATLAB files (SIDD validation) -------------------------------------------
@lru_cache(
    maxsize=2
)  # SIDD's noisy and GT arrays (250 MB each): read once per process, not per block
def _mat_blocks(path: Path, variable: str, stamp: tuple) -> np.ndarray | str:
    """All blocks of `variable` as one C-ordered (N, H, W, 3) uint8 array, or the reason it cannot
    be read (cached too, so that a broken file is read once and each of its blocks is excluded).
    `stamp` (mtime, size) makes a changed file a new entry."""
    from scipy.io import loadmat

    try:
        arr = loadmat(str(path), variable_names=[variable]).get(variable)
    except Exception as e:
        return (
            f"cannot read MATLAB file {path}: {type(e).__name__}: {e}; expected {variable} holding "
            f"{BLOCKS_EXPECTED}"
        )
    if arr is None:
        return f"{path}: no variable {variable!r}; expected {variable} holding {BLOCKS_EXPECTED}"
    if arr.dtype != np.uint8 or arr.ndim not in (4, 5) or arr.shape[-1] != 3:
        return f"{path}: {variable} is {arr.dtype} of shape {arr.shape}; expected {BLOCKS_EXPECTED}"
    return np.ascontiguousarray(arr).reshape(
        -1, *arr.shape[-3:]
    )  # MATLAB order: one copy here, not per block


def in_order(samples: list, order) -> Callable[[int], tuple]:
    """`sample_at` of a listed source: sample i of the storage order -> (source index, Sample)."""
    return lambda i: (int(order[i]), samples[int(order[i])])


def release_caches() -> None:
    """Drop the cached MATLAB arrays (about 500 MB for SIDD) once a split is extracted."""
    _mat_blocks.cache_clear()
    _demo_photo.cache_clear()


def _read_block(block: MatBlock) -> np.ndarray:
    """One block as uint8 (H, W, 3); SourceError naming the file when it cannot be read."""
    try:
        st = block.path.stat()
    except OSError as e:
        raise SourceError(f"cannot read MATLAB file {block.path}: {e}") from e
    blocks = _mat_blocks(block.path, block.variable, (st.st_mtime_ns, st.st_size))
    if isinstance(blocks, str):
        raise SourceError(blocks)
    if block.index >= len(blocks):
        raise SourceError(
            f"{block.path}: {block.variable} has {len(blocks)} blocks; expected block {block.index}"
        )
    return blocks[block.index].copy()  # the cached array stays untouched


def _block_loader(gt: MatBlock, lq: MatBlock | None):
    def load():
        return _read_block(gt), None if lq is None else _read_block(lq), []

    return load
