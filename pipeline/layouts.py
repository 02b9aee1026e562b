"""Dataset folder layouts of the paper's benchmarks: detect one and list its (gt, lq) files per split.

`DATA=gopro:/data/GoPro` names the layout; `DATA=/data/GoPro` detects it (the error lists the
layouts tried and what each expected). Layouts are functions `(root, split) -> [(gt, lq|None)]`
in the LAYOUTS registry at the bottom; lq None means clean images that the task degrades. gt and
lq are image files, or MatBlock: one block of an array of image blocks in a MATLAB file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# SNR-Aware's SID data path (their data/util.py read_img_seq2; see docs/networks.md): each frame,
# low-light input and ground truth alike, as the network, CLIP and PTG-RM were trained on it.
SID_PROTOCOL = {
    "read": "np.load(allow_pickle=False) of .npy (uint8 H x W x 3, RGB as rawpy wrote it), "
    "or an image file (RGB)",
    "resize": [960, 512],
    "interpolation": "cv2.resize, INTER_LINEAR (bilinear), on uint8",
    "channels": "reversed ([..., [2, 1, 0]]): RGB files become BGR, the order the authors' "
    "networks saw in training",
    "scale": "uint8; / 255 into [0, 1] downstream",
}


class LayoutError(ValueError):
    pass


BLOCKS_EXPECTED = "uint8 image blocks of shape (B1, B2, H, W, 3) or (B, H, W, 3)"


@dataclass(frozen=True)
class MatBlock:
    """Block `index` (row-major over the leading axes) of the array `variable` in the MATLAB file
    `path`; hw is its (H, W), read from the file's header."""

    path: Path
    variable: str
    index: int
    hw: tuple


@dataclass(frozen=True)
class ProtocolFrame:
    """An image or .npy frame read by a layout's protocol (SID_PROTOCOL): resized to `size`
    (W, H), channels reversed when `reverse`."""

    path: Path
    size: tuple
    reverse: bool

    @property
    def hw(self) -> tuple:
        return self.size[1], self.size[0]


def mat_shape(path: Path, variable: str) -> tuple:
    """The shape of `variable` in a MATLAB file, from its header (no pixels read); it must hold
    BLOCKS_EXPECTED, else LayoutError naming the file."""
    from scipy.io import whosmat

    try:
        found = {name: (tuple(shape), kind) for name, shape, kind in whosmat(str(path))}
    except Exception as e:
        raise LayoutError(
            f"cannot read MATLAB file {path}: {type(e).__name__}: {e}; expected a MATLAB "
            f"(v5) .mat file with the variable {variable}"
        ) from e
    if variable not in found:
        raise LayoutError(
            f"{path}: no variable {variable!r} (it has {sorted(found)}); expected {variable} "
            f"holding {BLOCKS_EXPECTED}"
        )
    shape, kind = found[variable]
    if kind != "uint8" or len(shape) not in (4, 5) or shape[-1] != 3:
        raise LayoutError(
            f"{path}: {variable} is {kind} of shape {shape}; expected {BLOCKS_EXPECTED}"
        )
    return shape


def mat_pairs(folders: list[Path], gt_var: str, lq_var: str) -> list[tuple]:
    """(gt, lq) MatBlocks of `<gt_var>.mat` and `<lq_var>.mat` in the first folder holding both;
    [] when none holds either, LayoutError when only one is found or their shapes differ."""
    names = (f"{gt_var}.mat", f"{lq_var}.mat")
    both = [d for d in folders if all((d / n).is_file() for n in names)]
    if not both:
        one = [d / n for d in folders for n in names if (d / n).is_file()]
        if one:
            other = names[1 - names.index(one[0].name)]
            raise LayoutError(
                f"{one[0]}: {other} is missing next to it; expected both {names[0]} and "
                f"{names[1]} in one of {', '.join(str(d) for d in folders)}"
            )
        return []
    gt, lq = both[0] / names[0], both[0] / names[1]
    shape, lq_shape = mat_shape(gt, gt_var), mat_shape(lq, lq_var)
    if lq_shape != shape:
        raise LayoutError(
            f"{lq}: {lq_var} has shape {lq_shape} but {gt_var} in {gt} has {shape}; "
            f"expected the same blocks in both"
        )
    hw = shape[-3:-1]
    return [
        (MatBlock(gt, gt_var, k, hw), MatBlock(lq, lq_var, k, hw))
        for k in range(math.prod(shape[:-3]))
    ]


def images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def by_name(gt_dir: Path, lq_dir: Path) -> list[tuple]:
    """Pairs with matching file names; a gt without its lq is an error naming it."""
    lqs = {p.name: p for p in images(lq_dir)}
    gts = images(gt_dir)
    missing = [g.name for g in gts if g.name not in lqs]
    if missing:
        raise LayoutError(
            f"{lq_dir} lacks the inputs of {len(missing)} images of {gt_dir}, e.g. {missing[:3]}"
        )
    return [(g, lqs[g.name]) for g in gts]


def _split_dir(root: Path, split: str, names: dict) -> Path:
    return root / names.get(split, split)


# -- layouts -------------------------------------------------------------------------------------
def generic(root: Path, split: str) -> list[tuple]:
    """<split>/lq + <split>/gt (matching names), or clean images in <split>/gt or <split>/."""
    base = root / split
    if (base / "lq").is_dir():
        return by_name(base / "gt", base / "lq")
    return [(p, None) for p in images(base / "gt") or images(base)]


def gopro(root: Path, split: str) -> list[tuple]:
    """GoPro / HIDE-style: <split>/<sequence>/{blur,sharp}/*.png."""
    out = []
    for seq in sorted(p for p in (root / split).glob("*") if (p / "blur").is_dir()):
        out += by_name(seq / "sharp", seq / "blur")
    return out


def realblur(root: Path, split: str) -> list[tuple]:
    """RealBlur-J/R: <scene>/{blur,gt}/*, split by the official lists RealBlur_*_{train,test}_list.txt."""
    lists = sorted(root.glob(f"RealBlur_*_{split}_list.txt"))
    if not lists:
        return []
    out = []
    for line in lists[0].read_text().split("\n"):
        if line.strip():
            gt, lq = line.split()[:2]
            out.append((root / gt, root / lq))
    return out


def restormer(root: Path, split: str) -> list[tuple]:
    """Restormer's dataset folders: <split>/<Set>/{input,target}/ (deraining: train/Rain13K,
    test/Rain100H, Rain100L, Test100, Test1200, Test2800; deblurring test sets: test/GoPro,
    HIDE, RealBlur_J, RealBlur_R)."""
    sets = sorted(
        p for p in (root / split).glob("*") if (p / "input").is_dir() and (p / "target").is_dir()
    )
    out = []
    for s in sets:
        out += by_name(s / "target", s / "input")
    return out


def lol_v1(root: Path, split: str) -> list[tuple]:
    """LOL v1: our485/{low,high} (train), eval15/{low,high} (test)."""
    base = _split_dir(root, split, {"train": "our485", "test": "eval15"})
    return by_name(base / "high", base / "low") if (base / "low").is_dir() else []


def lol_v2_real(root: Path, split: str) -> list[tuple]:
    """LOL-v2 real: Real_captured/{Train,Test}/{Low,Normal} (low 'lowNNNNN.png', normal 'normalNNNNN.png')."""
    base = root / "Real_captured" / split.capitalize()
    if not (base / "Low").is_dir():
        return []
    normals = {p.name.replace("normal", "", 1): p for p in images(base / "Normal")}
    out = []
    for lq in images(base / "Low"):
        key = lq.name.replace("low", "", 1)
        if key not in normals:
            raise LayoutError(
                f"{lq}: no matching Normal image ({'normal' + key}) in {base / 'Normal'}"
            )
        out.append((normals[key], lq))
    return out


def sidd(root: Path, split: str) -> list[tuple]:
    """SIDD medium sRGB: Data/<scene>/{*_NOISY_SRGB_*, *_GT_SRGB_*} (train); test: the validation
    pairs as images in val/{input,target}, or the published ValidationNoisyBlocksSrgb.mat and
    ValidationGtBlocksSrgb.mat (1280 blocks of 256x256, read with scipy.io.loadmat, which runs no
    code) in the folder itself, val/ or test/SIDD/ (Restormer's place)."""
    if split == "test":
        if (root / "val" / "input").is_dir():
            return by_name(root / "val" / "target", root / "val" / "input")
        return mat_pairs(
            [root, root / "val", root / "test" / "SIDD"],
            "ValidationGtBlocksSrgb",
            "ValidationNoisyBlocksSrgb",
        )
    out = []
    for scene in sorted((root / "Data").glob("*")):
        for noisy in sorted(scene.glob("*NOISY_SRGB*")):
            gt = noisy.with_name(noisy.name.replace("NOISY", "GT"))
            if not gt.is_file():
                raise LayoutError(f"{noisy}: its ground truth {gt.name} is missing")
            out.append((gt, noisy))
    return out


def sid_srgb(root: Path, split: str) -> list[tuple]:
    """SID sRGB as SNR-Aware prepared it: short_sid2/<scene>/*.npy, long_sid2/<scene>/*.npy (or
    images; the first long exposure of a scene is its ground truth); scenes whose id starts with
    1 are the test split, 0 or 2 the training split. Frames are read by SID_PROTOCOL."""
    out = []
    first = "1" if split == "test" else "02"
    for scene in sorted(p for p in (root / "short_sid2").glob("*") if p.is_dir()):
        if scene.name[:1] not in first:
            continue
        longs = frames(root / "long_sid2" / scene.name)
        if not longs:
            raise LayoutError(
                f"{scene}: no long exposure (.npy or image) in {root / 'long_sid2' / scene.name}"
            )
        gt = sid_frame(longs[0])
        out += [(gt, sid_frame(short)) for short in frames(scene)]
    return out


def frames(folder: Path) -> list[Path]:
    """The .npy and image files of a folder, sorted by name (as the authors' glob)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".npy", *IMAGE_SUFFIXES))


def sid_frame(path: Path) -> ProtocolFrame:
    return ProtocolFrame(path, tuple(SID_PROTOCOL["resize"]), reverse=True)


def dpdd(root: Path, split: str) -> list[tuple]:
    """DPDD (defocus): {train,val,test}_c/{source,target}."""
    base = root / f"{split}_c"
    return by_name(base / "target", base / "source") if (base / "source").is_dir() else []


def clean(root: Path, split: str) -> list[tuple]:
    """Gaussian-denoising sets (CBSD68, Kodak24, McMaster, Set12, Urban100): clean images only,
    in <split>/ or, for a test-only set, in the folder itself; noise is added with a seed."""
    found = images(root / split)
    if not found and split == "test" and not (root / "train").is_dir():
        found = images(root)
    return [(p, None) for p in found]


def unpaired(root: Path, split: str) -> list[tuple]:
    """Training without ground truth: low-light images only in train/ (or train/lq/); the test split
    is paired, test/lq + test/gt (matching names), for evaluation. Named only (`unpaired:folder`)."""
    if split == "train":
        return [
            (p, p) for p in images(root / "train" / "lq") or images(root / "train")
        ]  # no gt: the input stands in
    return by_name(root / split / "gt", root / split / "lq")


LAYOUTS = {  # detection tries them in this order; the first that finds test images wins
    "gopro": gopro,
    "realblur": realblur,
    "restormer": restormer,
    "lol": lol_v1,
    "lolv2": lol_v2_real,
    "sidd": sidd,
    "sid": sid_srgb,
    "dpdd": dpdd,
    "generic": generic,
    "clean": clean,
    "unpaired": unpaired,
}
NAMED_ONLY = (
    "unpaired",
)  # never detected: `unpaired:folder` (its train/ would read as clean images)


PROTOCOLS = {
    "sid": SID_PROTOCOL
}  # layouts that read frames by a protocol, recorded in the pairs key


def parse_data(data: str) -> tuple[str | None, Path]:
    """'gopro:/data/GoPro' -> ('gopro', path); '/data/GoPro' -> (None, path)."""
    name, sep, rest = data.partition(":")
    if sep and name in LAYOUTS:
        return name, Path(rest)
    return None, Path(data)


def detect(root: Path) -> str:
    """The first layout that finds test (or train) images under `root`."""
    tried = []
    for name, fn in ((n, f) for n, f in LAYOUTS.items() if n not in NAMED_ONLY):
        try:
            if fn(root, "test") or fn(root, "train"):
                return name
        except LayoutError:
            return name  # it matched far enough to find a real problem: report that problem
        tried.append(f"{name} ({fn.__doc__.splitlines()[0].strip()})")
    raise LayoutError(f"{root}: no known dataset layout found; tried: " + "; ".join(tried))


def list_pairs(data: str, split: str) -> tuple[str, list[tuple]]:
    """(layout name, [(gt, lq or None)]) of one split of a dataset folder."""
    name, root = parse_data(data)
    if not root.is_dir():
        raise LayoutError(f"dataset folder {root} does not exist")
    name = name or detect(root)
    pairs = LAYOUTS[name](root, split)
    if not pairs:
        raise LayoutError(
            f"{root} ({name} layout): no {split} images; expected: {LAYOUTS[name].__doc__.strip()}"
        )
    return name, pairs
