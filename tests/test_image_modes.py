"""Every image mode a dataset may hold is read as the 8-bit RGB a reference conversion gives, with
notes that say what was converted; values whose meaning is ambiguous are refused naming the file.

Each case writes one file with PIL (OpenCV for 16-bit colour), puts it on both sides of a generic
pair (test/gt, test/lq) and reads it through open_source's sample loader, the path extraction takes.
The references are computed here from the arrays written, independently of pipeline/sources.py.
"""

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.sources import SourceError, open_source

H, W = 6, 7
GREY = "grayscale converted to RGB"
ALPHA = "alpha channel dropped"
DEEP = "16-bit reduced to 8 bit"


def rng(seed=0):
    return np.random.default_rng(seed)


def grey3(v):
    return np.repeat(np.asarray(v, np.uint8)[..., None], 3, axis=2)


def from16(v):  # the reference 16 -> 8 bit reduction
    return np.round(np.asarray(v, np.float64) / 257).astype(np.uint8)


def palette_image(transparency: bool):
    pal = rng(1).integers(0, 256, (256, 3), dtype=np.uint8)
    idx = rng(2).integers(0, 256, (H, W), dtype=np.uint8)
    im = Image.fromarray(idx, "L").convert("P")  # mode P with the indices as they are
    im.putpalette(pal.tobytes())
    return im, pal[idx], ({"transparency": int(idx[0, 0])} if transparency else {})


def case(name):
    """(write(path) -> None, file suffix, reference uint8 (H, W, 3), expected notes)."""
    r = rng(3)
    rgb8 = r.integers(0, 256, (H, W, 3), dtype=np.uint8)
    a8 = r.integers(0, 256, (H, W), dtype=np.uint8)
    g8 = r.integers(0, 256, (H, W), dtype=np.uint8)
    g16 = r.integers(0, 65536, (H, W), dtype=np.uint16)
    rgb16 = r.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    rgb16[0, 0] = [200 * 257, 100 * 257, 30 * 257]  # the pixel
    a16 = r.integers(0, 65536, (H, W), dtype=np.uint16)
    if name == "1":
        bits = r.integers(0, 2, (H, W)).astype(bool)
        return (
            lambda p: Image.fromarray(bits).save(p),
            ".png",
            grey3(bits * 255),
            ["1-bit expanded to 8 bit", GREY],
        )
    if name == "L":
        return lambda p: Image.fromarray(g8).save(p), ".png", grey3(g8), [GREY]
    if name == "LA":
        return (
            lambda p: Image.fromarray(np.dstack([g8, a8]), "LA").save(p),
            ".png",
            grey3(g8),
            [GREY, ALPHA],
        )
    if name in ("P", "P-transparency"):
        im, ref, extra = palette_image(name != "P")
        notes = ["palette expanded to RGB"] + ([ALPHA] if extra else [])
        return lambda p: im.save(p, **extra), ".png", ref, notes
    if name == "RGB":
        return lambda p: Image.fromarray(rgb8).save(p), ".png", rgb8, []
    if name == "RGBA":
        return lambda p: Image.fromarray(np.dstack([rgb8, a8])).save(p), ".png", rgb8, [ALPHA]
    if name == "CMYK-tiff":  # lossless: the reference is PIL's conversion of the array written
        cmyk = Image.fromarray(np.dstack([rgb8, a8]), "CMYK")
        return (
            lambda p: cmyk.save(p),
            ".tif",
            np.asarray(cmyk.convert("RGB")),
            ["CMYK converted to RGB"],
        )
    if (
        name == "CMYK-jpeg"
    ):  # lossy: the reference is PIL's conversion of the decoded file (see test)
        cmyk = Image.fromarray(np.dstack([rgb8, a8]), "CMYK")
        return lambda p: cmyk.save(p, quality=95), ".jpg", None, ["CMYK converted to RGB"]
    if name == "YCbCr":
        ycc = Image.fromarray(rgb8, "YCbCr")
        return (
            lambda p: ycc.save(p),
            ".tif",
            np.asarray(ycc.convert("RGB")),
            ["YCbCr converted to RGB"],
        )
    if name == "I;16":
        return lambda p: Image.fromarray(g16).save(p), ".png", grey3(from16(g16)), [DEEP, GREY]
    if name == "I;16-dark":  # a dark 16-bit image is still 16-bit: not read as 8-bit values
        dark = (g16 % 250).astype(np.uint16)
        return lambda p: Image.fromarray(dark).save(p), ".png", grey3(from16(dark)), [DEEP, GREY]
    if name == "I;16B":
        im = Image.frombytes("I;16B", (W, H), g16.astype(">u2").tobytes())
        return lambda p: im.save(p), ".tif", grey3(from16(g16)), [DEEP, GREY]
    if name == "I":  # 32-bit integers: read as 16-bit values (0..65535)
        i32 = g16.astype(np.int32)
        return (
            lambda p: Image.fromarray(i32, "I").save(p),
            ".tif",
            grey3(from16(i32)),
            ["32-bit integers read as 16-bit, reduced to 8 bit", GREY],
        )
    if name == "F":  # 32-bit floats: read as [0, 1]
        f = (g16 / 65535).astype(np.float32)
        return (
            lambda p: Image.fromarray(f, "F").save(p),
            ".tif",
            grey3(np.round(f.astype(np.float64) * 255)),
            ["32-bit floats in [0, 1] scaled to 8 bit", GREY],
        )
    if name.startswith("RGB16") or name.startswith("RGBA16"):
        alpha = name.startswith("RGBA")
        bgr = rgb16[..., ::-1]
        arr = np.dstack([bgr, a16]) if alpha else bgr
        return (
            lambda p: cv2.imwrite(str(p), arr),
            ".tif" if name.endswith("tiff") else ".png",
            from16(rgb16),
            [DEEP] + ([ALPHA] if alpha else []),
        )
    raise KeyError(name)


MODES = [
    "1",
    "L",
    "LA",
    "P",
    "P-transparency",
    "RGB",
    "RGBA",
    "CMYK-tiff",
    "CMYK-jpeg",
    "YCbCr",
    "I;16",
    "I;16-dark",
    "I;16B",
    "I",
    "F",
    "RGB16-png",
    "RGBA16-png",
    "RGB16-tiff",
    "RGBA16-tiff",
]


def read_pair(root, write, suffix):
    for side in ("gt", "lq"):
        (root / "test" / side).mkdir(parents=True, exist_ok=True)
        write(root / "test" / side / f"img{suffix}")
    (sample,) = open_source(str(root), "test").samples
    return sample, sample.load()


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_reads_as_the_reference_rgb_with_its_notes(mode, tmp_path):
    write, suffix, ref, notes = case(mode)
    sample, (gt, lq, got_notes) = read_pair(tmp_path, write, suffix)
    if ref is None:  # lossy file: PIL's own conversion of what the file decodes to
        ref = np.asarray(Image.open(tmp_path / "test" / "gt" / f"img{suffix}").convert("RGB"))
    assert gt.dtype == np.uint8 and gt.shape == (H, W, 3) and sample.hw == (H, W)
    np.testing.assert_array_equal(gt, ref, err_msg=mode)
    np.testing.assert_array_equal(lq, ref, err_msg=mode)
    assert got_notes == notes + [f"lq: {n}" for n in notes]


@pytest.mark.parametrize(
    "mode,values,expected",
    [
        ("I", np.array([[0, 70000]], np.int32), "0..65535"),
        ("I", np.array([[-1, 3]], np.int32), "0..65535"),
        ("F", np.array([[0.0, 1.5]], np.float32), "[0, 1]"),
        ("F", np.array([[0.0, np.nan]], np.float32), "[0, 1]"),
    ],
)
def test_ambiguous_integer_or_float_images_are_refused_naming_the_file(
    mode, values, expected, tmp_path
):
    _, (gt, _, _) = read_pair(
        tmp_path, lambda p: Image.fromarray(np.zeros((H, W), values.dtype), mode).save(p), ".tif"
    )  # a valid pair first: the rule accepts in-range values
    bad = tmp_path / "test" / "lq" / "img.tif"
    full = np.zeros((H, W), values.dtype)
    full[:1, :2] = values
    Image.fromarray(full, mode).save(bad)
    with pytest.raises(SourceError) as e:
        open_source(str(tmp_path), "test").samples[0].load()
    assert str(bad) in str(e.value) and expected in str(e.value)


def test_exif_orientation_is_ignored_alike_for_gt_and_lq_and_noted(tmp_path):
    """Pixels are read as stored on both sides (a pair stays aligned when only one side has the
    tag, as when lq was made from gt's pixels), and the note says so."""
    rgb = rng(5).integers(0, 256, (H, W, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    for side, tagged in (("gt", True), ("lq", False)):
        (tmp_path / "test" / side).mkdir(parents=True)
        Image.fromarray(rgb).save(
            tmp_path / "test" / side / "img.png", **({"exif": exif} if tagged else {})
        )
    (sample,) = open_source(str(tmp_path), "test").samples
    gt, lq, notes = sample.load()
    assert sample.hw == (H, W) and np.array_equal(gt, rgb) and np.array_equal(lq, rgb)
    assert notes == ["EXIF orientation 6 ignored: pixels read as stored"]
