"""Dataset layouts: each published layout is detected, paired and counted on a tiny folder."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.layouts import LAYOUTS, LayoutError, detect, list_pairs
from pipeline.sources import open_source


def img(path: Path, hw=(24, 32), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*hw, 3), value, np.uint8)).save(path)


def make_gopro(root):
    for split, seqs in (("train", ["GOPR0372_07_00", "GOPR0374_11_00"]), ("test", ["GOPR0384_11_00"])):
        for seq in seqs:
            for k in range(2):
                img(root / split / seq / "blur" / f"{k:06d}.png")
                img(root / split / seq / "sharp" / f"{k:06d}.png")
    return {"train": 4, "test": 2}


def make_restormer(root):
    for k in range(3):
        img(root / "train" / "Rain13K" / "input" / f"{k}.jpg")
        img(root / "train" / "Rain13K" / "target" / f"{k}.jpg")
    for s in ("Rain100H", "Rain100L", "Test100"):
        img(root / "test" / s / "input" / "1.png")
        img(root / "test" / s / "target" / "1.png")
    return {"train": 3, "test": 3}


def make_lol(root):
    for k in range(3):
        img(root / "our485" / "low" / f"{k}.png")
        img(root / "our485" / "high" / f"{k}.png")
    img(root / "eval15" / "low" / "1.png")
    img(root / "eval15" / "high" / "1.png")
    return {"train": 3, "test": 1}


def make_lolv2(root):
    for split, n in (("Train", 2), ("Test", 1)):
        for k in range(n):
            img(root / "Real_captured" / split / "Low" / f"low{k:05d}.png")
            img(root / "Real_captured" / split / "Normal" / f"normal{k:05d}.png")
    return {"train": 2, "test": 1}


def make_sidd(root):
    for scene in ("0001_001_S6_00100_00060_3200_L", "0002_001_S6_00100_00020_3200_N"):
        for k in range(2):
            img(root / "Data" / scene / f"NOISY_SRGB_01{k}.PNG")
            img(root / "Data" / scene / f"GT_SRGB_01{k}.PNG")
    img(root / "val" / "input" / "0.png")
    img(root / "val" / "target" / "0.png")
    return {"train": 4, "test": 1}


def make_sid(root):
    for scene, n in (("00001", 3), ("10003", 2)):
        for k in range(n):
            img(root / "short_sid2" / scene / f"{scene}_0{k}_0.1s.png")
        img(root / "long_sid2" / scene / f"{scene}_00_10s.png")
    return {"train": 3, "test": 2}


def make_dpdd(root):
    for split, n in (("train", 2), ("test", 1)):
        for k in range(n):
            img(root / f"{split}_c" / "source" / f"{k}.png")
            img(root / f"{split}_c" / "target" / f"{k}.png")
    return {"train": 2, "test": 1}


def make_realblur(root):
    for split, n in (("train", 2), ("test", 1)):
        lines = []
        for k in range(n):
            img(root / f"scene{split}{k}" / "gt" / "gt_1.png")
            img(root / f"scene{split}{k}" / "blur" / "blur_1.png")
            lines.append(f"scene{split}{k}/gt/gt_1.png scene{split}{k}/blur/blur_1.png")
        (root / f"RealBlur_J_{split}_list.txt").write_text("\n".join(lines) + "\n")
    return {"train": 2, "test": 1}


def make_generic(root):
    for split, n in (("train", 2), ("test", 2)):
        for k in range(n):
            img(root / split / "lq" / f"{k}.png")
            img(root / split / "gt" / f"{k}.png")
    return {"train": 2, "test": 2}


def make_clean(root):
    for k in range(4):
        img(root / f"{k}.png")  # e.g. CBSD68: a test-only folder of clean images
    return {"test": 4}


MAKERS = {"gopro": make_gopro, "restormer": make_restormer, "lol": make_lol, "lolv2": make_lolv2,
          "sidd": make_sidd, "sid": make_sid, "dpdd": make_dpdd, "realblur": make_realblur,
          "generic": make_generic, "clean": make_clean}


def test_every_layout_has_a_test_folder():
    assert set(MAKERS) == set(LAYOUTS)


@pytest.mark.parametrize("layout", sorted(MAKERS))
def test_layout_is_detected_paired_and_counted(layout, tmp_path):
    counts = MAKERS[layout](tmp_path)
    assert detect(tmp_path) == layout
    for split, n in counts.items():
        name, pairs = list_pairs(str(tmp_path), split)
        assert name == layout and len(pairs) == n
        for gt, lq in pairs:
            assert gt.is_file() and (lq is None or lq.is_file())
            assert lq is None or lq != gt
    named, _ = list_pairs(f"{layout}:{tmp_path}", next(iter(counts)))
    assert named == layout


def test_sid_pairs_every_short_exposure_with_its_scene_long_one(tmp_path):
    make_sid(tmp_path)
    _, pairs = list_pairs(str(tmp_path), "test")
    assert {gt.parent.name for gt, _ in pairs} == {"10003"} and all(lq.parent.name == "10003" for _, lq in pairs)


def test_unknown_layout_lists_what_was_tried(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(LayoutError, match="tried: gopro"):
        detect(tmp_path)


def test_missing_lq_is_named(tmp_path):
    make_generic(tmp_path)
    (tmp_path / "test" / "lq" / "1.png").unlink()
    with pytest.raises(LayoutError, match="1.png"):
        list_pairs(str(tmp_path), "test")


def test_source_from_a_folder_fingerprints_its_files(tmp_path):
    make_gopro(tmp_path)
    src = open_source(str(tmp_path), "test")
    assert src.paired and len(src.samples) == 2 and src.fingerprint["layout"] == "gopro"
    before = dict(src.fingerprint["files"])
    img(tmp_path / "test" / "GOPR0384_11_00" / "sharp" / "000000.png", value=9)
    assert open_source(str(tmp_path), "test").fingerprint["files"] != before
