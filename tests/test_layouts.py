"""Dataset layouts: each published layout is detected, paired and counted on a tiny folder."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from common.log import collect
from pipeline import stages
from pipeline.extract import FeaturesConfig, build_features
from pipeline.layouts import LAYOUTS, NAMED_ONLY, LayoutError, MatBlock, detect, list_pairs
from pipeline.sources import SourceError, open_source
from stores import Store


class PairIds:
    """Pixel values for the dataset makers: consecutive calls (an lq and its gt) get the same
    value, each pair another, so a layout that pairs the wrong files fails the content check."""

    def __init__(self):
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return 10 + 9 * ((self.calls - 1) // 2) % 240


pair_value = PairIds()


def img(path: Path, hw=(24, 32), value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*hw, 3), pair_value() if value is None else value, np.uint8)).save(
        path
    )


def content(path: Path) -> float:
    return float(np.asarray(Image.open(path)).mean())


def make_gopro(root):
    for split, seqs in (
        ("train", ["GOPR0372_07_00", "GOPR0374_11_00"]),
        ("test", ["GOPR0384_11_00"]),
    ):
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
            img(root / "short_sid2" / scene / f"{scene}_0{k}_0.1s.png", value=int(scene) % 200 + 20)
        img(root / "long_sid2" / scene / f"{scene}_00_10s.png", value=int(scene) % 200 + 20)
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


MAKERS = {
    "gopro": make_gopro,
    "restormer": make_restormer,
    "lol": make_lol,
    "lolv2": make_lolv2,
    "sidd": make_sidd,
    "sid": make_sid,
    "dpdd": make_dpdd,
    "realblur": make_realblur,
    "generic": make_generic,
    "clean": make_clean,
}


def test_every_layout_has_a_test_folder():
    assert set(MAKERS) == set(LAYOUTS) - set(NAMED_ONLY)  # unpaired: tests/test_no_reference.py


@pytest.mark.parametrize("layout", sorted(MAKERS))
def test_layout_is_detected_paired_and_counted(layout, tmp_path):
    pair_value.calls = 0
    counts = MAKERS[layout](tmp_path)
    assert detect(tmp_path) == layout
    for split, n in counts.items():
        name, pairs = list_pairs(str(tmp_path), split)
        assert name == layout and len(pairs) == n
        for gt, lq in pairs:
            gt, lq = (
                getattr(gt, "path", gt),
                getattr(lq, "path", lq),
            )  # a ProtocolFrame (sid) names its file
            assert gt.is_file() and (lq is None or lq.is_file())
            assert lq is None or lq != gt
            assert lq is None or abs(content(lq) - content(gt)) < 3, (
                lq,
                gt,
            )  # lq of this gt, not another's
        if any(lq is not None for _, lq in pairs):  # every pair differs in content from the others
            gts = {getattr(gt, "path", gt) for gt, _ in pairs}
            values = {round(content(gt) / 9) for gt in gts}
            assert len(values) == len(gts), (split, values)
    named, _ = list_pairs(f"{layout}:{tmp_path}", next(iter(counts)))
    assert named == layout


def test_sid_pairs_every_short_exposure_with_its_scene_long_one(tmp_path):
    make_sid(tmp_path)
    _, pairs = list_pairs(str(tmp_path), "test")
    assert {gt.path.parent.name for gt, _ in pairs} == {"10003"}
    assert all(lq.path.parent.name == "10003" for _, lq in pairs)


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
    before = src.fingerprint["sha256"]  # one digest over every file's (path, sha256)
    assert src.fingerprint["files"] == 4
    img(tmp_path / "test" / "GOPR0384_11_00" / "sharp" / "000000.png", value=9)
    assert open_source(str(tmp_path), "test").fingerprint["sha256"] != before


# -- SIDD validation as the published .mat files ---------------------------------------------------
GT_MAT, NOISY_MAT = "ValidationGtBlocksSrgb", "ValidationNoisyBlocksSrgb"


def blocks(seed, shape=(2, 3, 32, 32, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_sidd_mat(folder: Path, gt=None, noisy=None):
    """Both validation files in `folder` (tiny: 2 x 3 blocks of 32 x 32); returns (gt, noisy)."""
    folder.mkdir(parents=True, exist_ok=True)
    gt, noisy = blocks(0) if gt is None else gt, blocks(1) if noisy is None else noisy
    savemat(folder / f"{GT_MAT}.mat", {GT_MAT: gt})
    savemat(folder / f"{NOISY_MAT}.mat", {NOISY_MAT: noisy})
    return gt, noisy


@pytest.mark.parametrize("place", ["", "val", "test/SIDD"])
def test_sidd_validation_mat_files_give_one_sample_per_block(place, tmp_path):
    gt, noisy = make_sidd_mat(tmp_path / place)
    assert detect(tmp_path) == "sidd"
    name, pairs = list_pairs(str(tmp_path), "test")
    assert (
        name == "sidd"
        and len(pairs) == 6
        and all(isinstance(b, MatBlock) for pair in pairs for b in pair)
    )
    src = open_source(str(tmp_path), "test")
    prefix = f"{place}/" if place else ""
    assert [s.name for s in src.samples] == [f"{prefix}{GT_MAT}.mat#{k:04d}" for k in range(6)]
    assert src.paired and all(s.hw == (32, 32) for s in src.samples)
    for k, (i, j) in ((0, (0, 0)), (2, (0, 2)), (4, (1, 1)), (5, (1, 2))):  # row-major over (i, j)
        g, q, notes = src.samples[k].load()
        assert g.dtype == q.dtype == np.uint8 and g.shape == q.shape == (32, 32, 3) and notes == []
        assert np.array_equal(g, gt[i, j]) and np.array_equal(q, noisy[i, j])
    assert src.fingerprint["files"] == 2 and isinstance(src.fingerprint["blocks"], str)  # digests
    assert sorted(src.records["files"]) == [f"{prefix}{GT_MAT}.mat", f"{prefix}{NOISY_MAT}.mat"]


def test_sidd_val_images_come_before_mat_files_and_the_first_place_with_both_wins(tmp_path):
    make_sidd_mat(tmp_path / "test" / "SIDD")
    make_sidd_mat(
        tmp_path / "val", blocks(2, (4, 32, 32, 3)), blocks(3, (4, 32, 32, 3))
    )  # (B, H, W, 3)
    src = open_source(str(tmp_path), "test")
    assert len(src.samples) == 4 and src.samples[3].name == f"val/{GT_MAT}.mat#0003"
    assert np.array_equal(src.samples[3].load()[0], blocks(2, (4, 32, 32, 3))[3])
    make_sidd(tmp_path)
    assert len(list_pairs(str(tmp_path), "test")[1]) == 1  # val/{input,target} images


def test_sidd_mat_fingerprint_changes_with_a_file(tmp_path):
    make_sidd_mat(tmp_path / "test" / "SIDD")
    before = open_source(str(tmp_path), "test").fingerprint
    make_sidd_mat(tmp_path / "test" / "SIDD", noisy=blocks(9))
    after = open_source(str(tmp_path), "test").fingerprint
    assert after["sha256"] != before["sha256"] and after["blocks"] == before["blocks"]


def write_mat(path: Path, **variables):
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, variables)


def only_gt(root):
    write_mat(root / "test" / "SIDD" / f"{GT_MAT}.mat", **{GT_MAT: blocks(0)})


def variable_missing(root):
    make_sidd_mat(root)
    write_mat(root / f"{GT_MAT}.mat", gt=blocks(0))


def shapes_differ(root):
    make_sidd_mat(root / "val", noisy=blocks(1, (2, 2, 32, 32, 3)))


def not_uint8(root):
    make_sidd_mat(root, gt=blocks(0).astype(np.float64))


def not_rgb(root):
    make_sidd_mat(root, gt=blocks(0, (6, 32, 32)), noisy=blocks(1, (6, 32, 32)))


def unreadable(root):
    make_sidd_mat(root)
    (root / f"{NOISY_MAT}.mat").write_bytes(b"not a MATLAB file" * 20)


@pytest.mark.parametrize(
    "make, message",
    [
        (only_gt, f"{GT_MAT}.mat: {NOISY_MAT}.mat is missing next to it; expected both"),
        (variable_missing, f"{GT_MAT}.mat: no variable '{GT_MAT}'"),
        (
            shapes_differ,
            rf"{NOISY_MAT}.mat: {NOISY_MAT} has shape \(2, 2, 32, 32, 3\) but {GT_MAT} in .* has \(2, 3,",
        ),
        (not_uint8, rf"{GT_MAT}.mat: {GT_MAT} is double of shape .*; expected uint8 image blocks"),
        (
            not_rgb,
            rf"{GT_MAT}.mat: {GT_MAT} is uint8 of shape \(6, 32, 32\); expected uint8 image blocks",
        ),
        (unreadable, f"cannot read MATLAB file .*{NOISY_MAT}.mat"),
    ],
)
def test_bad_sidd_mat_files_are_named_with_what_was_expected(make, message, tmp_path):
    make(tmp_path)
    assert detect(tmp_path) == "sidd"  # it matched far enough to report the problem
    with pytest.raises(LayoutError, match=message):
        list_pairs(str(tmp_path), "test")
    with pytest.raises(SourceError, match=message):
        open_source(str(tmp_path), "test")


def test_truncated_sidd_mat_excludes_its_blocks_with_its_name(tmp_path):
    make_sidd_mat(tmp_path)
    path = tmp_path / f"{NOISY_MAT}.mat"
    path.write_bytes(path.read_bytes()[:10000])  # the header is intact, the pixels are not
    src = open_source(str(tmp_path), "test")  # listed from the header
    with pytest.raises(SourceError, match=f"cannot read MATLAB file {path}"):
        src.samples[0].load()
    (shard,) = stages.degrade(
        stages.read([stages.Shard((0, 6), 0, 6)], sample_at=lambda i: (i, src.samples[i])),
        degradation=None,
        seed=0,
    )
    excluded = shard.stats["excluded"]["pairs"]
    assert [e["name"] for e in excluded] == [s.name for s in src.samples]
    assert all(str(path) in e["reason"] for e in excluded) and not shard.data["hw"].any()


def test_features_of_sidd_mat_blocks_hold_the_blocks(tiny_clip, tmp_path):
    gt, noisy = make_sidd_mat(tmp_path / "SIDD" / "test" / "SIDD")
    cfg = FeaturesConfig(
        task="denoise",
        data=str(tmp_path / "SIDD"),
        target="identity",
        encoder=f"openclip:{tiny_clip}",
        store_root=str(tmp_path / "stores"),
        shard_len=4,
        splits=("test",),
    )
    with collect() as lines:
        store = Store(build_features(cfg)[0])
    assert (
        f"{tmp_path / 'SIDD'} (test): sidd layout, 6 pairs" in lines
    )  # the detected layout is reported
    assert store.manifest()["members"]["pairs"]["status"] == "complete"
    assert list(store.array("pairs", "names")[:]) == [
        f"test/SIDD/{GT_MAT}.mat#{k:04d}" for k in range(6)
    ]
    assert (store.array("pairs", "hw")[:] == 32).all()
    assert np.array_equal(
        np.stack([x[:32, :32] for x in store.array("pairs", "gt")[:]]), gt.reshape(6, 32, 32, 3)
    )
    assert np.array_equal(
        np.stack([x[:32, :32] for x in store.array("pairs", "lq")[:]]), noisy.reshape(6, 32, 32, 3)
    )
    from pipeline.sources import _mat_blocks

    assert (
        _mat_blocks.cache_info().currsize == 0
    )  # the arrays (500 MB for SIDD) are released after the split


def test_sid_frames_follow_the_authors_protocol(tmp_path):
    """np.load, cv2 bilinear resize to 960x512 on uint8, channels reversed; values by hand."""
    from pipeline.layouts import SID_PROTOCOL
    from pipeline.sources import read_frame

    frame = np.array(
        [[[0, 100, 200], [240, 100, 0]]] * 2, np.uint8
    )  # 2x2 RGB: left and right columns
    for scene, name in (("10003", "10003_00_0.1s.npy"), ("00001", "00001_00_0.1s.npy")):
        (tmp_path / "short_sid2" / scene).mkdir(parents=True)
        (tmp_path / "long_sid2" / scene).mkdir(parents=True)
        np.save(tmp_path / "short_sid2" / scene / name, frame)
        np.save(tmp_path / "long_sid2" / scene / f"{scene}_00_10s.npy", frame[:, ::-1])
    assert detect(tmp_path) == "sid"
    source = open_source(str(tmp_path), "test")
    assert (
        source.fingerprint["protocol"] == SID_PROTOCOL
        and [s.name for s in source.samples] == ["long_sid2/10003/10003_00_10s.npy"]
        and source.samples[0].hw == (512, 960)
    )
    gt, lq, _ = source.samples[0].load()
    assert lq.shape == gt.shape == (512, 960, 3) and lq.dtype == np.uint8
    # x = 0 and 959 clamp to the source columns; x = 480 samples source x = 480.5 / 480 - 0.5 = 0.501:
    # R 0 + 0.501 * 240 = 120.2, B 200 - 0.501 * 200 = 99.8; reversed: channel 0 is B
    for x, bgr in ((0, (200, 100, 0)), (480, (100, 100, 120)), (959, (0, 100, 240))):
        assert tuple(lq[0, x]) == tuple(lq[511, x]) == bgr
    assert tuple(gt[0, 0]) == (0, 100, 240)  # the scene's long exposure, mirrored above
    np.save(tmp_path / "short_sid2" / "10003" / "bad.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(
        SourceError, match=r"bad.npy: array of float32 \(4, 4\); expected uint8 \(H, W, 3\)"
    ):
        read_frame(list_pairs(str(tmp_path), "test")[1][1][1])  # (layout, pairs): 2nd pair, lq
    other = open_source(str(tmp_path), "train")
    assert [s.name for s in other.samples] == ["long_sid2/00001/00001_00_10s.npy"]
    assert other.fingerprint["sha256"] != source.fingerprint["sha256"]


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "train/../../x.png"])
def test_a_descriptor_that_leaves_the_dataset_folder_is_refused(tmp_path, bad):
    from pipeline.sources import SourceError, sample_of

    with pytest.raises(SourceError, match="not inside the dataset folder"):
        sample_of(tmp_path, "x", (4, 4), {"gt": {"file": bad}, "lq": None})
    assert (
        sample_of(tmp_path, "x", (4, 4), {"gt": {"file": "train/gt/a.png"}, "lq": None}).name == "x"
    )


def test_a_descriptor_cannot_name_another_kind_of_sample(tmp_path):
    from pipeline.sources import SourceError, sample_of

    with pytest.raises(SourceError, match="not a demo photo"):  # no arbitrary skimage.data function
        sample_of(None, "x", (4, 4), {"demo": "download_all", "y": 0, "x": 0})
    with pytest.raises(SourceError, match="a demo photo in a folder store"):
        sample_of(tmp_path, "x", (4, 4), {"demo": "chelsea", "y": 0, "x": 0})
    with pytest.raises(SourceError, match="a file in a demo store"):
        sample_of(None, "x", (4, 4), {"gt": {"file": "a.png"}, "lq": None})
