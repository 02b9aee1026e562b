"""Bad input never loses the rest of the run: each case gets a message naming the sample."""

import os

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.extract import FeaturesConfig, build_features
from pipeline.sources import SourceError
from pipeline.targets import TARGETS, Identity
from stores import Store


def rgb(seed, hw=(40, 48)):
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def write_pair(root, split, name, gt, lq):
    for kind, arr in (("gt", gt), ("lq", lq)):
        (root / split / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / split / kind / name)


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    for k in range(6):
        write_pair(root, "train", f"good{k}.png", rgb(k), rgb(100 + k))
        write_pair(root, "test", f"good{k}.png", rgb(k), rgb(100 + k))
    write_pair(root, "test", "mismatch.png", rgb(7), rgb(8, (40, 40)))
    write_pair(root, "test", "truncated.png", rgb(9), rgb(10))
    data = (root / "test" / "lq" / "truncated.png").read_bytes()
    (root / "test" / "lq" / "truncated.png").write_bytes(data[: len(data) // 2])
    write_pair(root, "test", "gray.png", rgb(11), rgb(12))
    Image.fromarray(rgb(12)[..., 0]).save(root / "test" / "lq" / "gray.png")
    write_pair(root, "test", "rgba.png", rgb(13), rgb(14))
    Image.fromarray(np.dstack([rgb(14), np.full((40, 48), 255, np.uint8)])).save(
        root / "test" / "lq" / "rgba.png"
    )
    write_pair(root, "test", "deep.png", rgb(15), rgb(16))
    cv2.imwrite(
        str(root / "test" / "gt" / "deep.png"), (rgb(15)[..., ::-1].astype(np.uint16) * 257)
    )
    return root


def features(root, tiny_clip, stores, **kw):
    cfg = FeaturesConfig(
        task="deblur",
        data=str(root),
        target="identity",
        encoder=f"openclip:{tiny_clip}",
        store_root=str(stores),
        shard_len=4,
        splits=("test",),
        **kw,
    )
    return build_features(cfg)[0]


def test_bad_samples_are_excluded_and_named_and_the_rest_is_kept(dataset, tiny_clip, tmp_path):
    store = Store(features(dataset, tiny_clip, tmp_path / "stores", max_bad=0.5))
    pairs = store.manifest()["members"]["pairs"]
    assert pairs["status"] == "complete"
    records = store.records("pairs")  # per-sample records live beside the manifest, not in it
    assert pairs["n_excluded"] == 2 and "excluded" not in pairs
    reasons = {e["name"]: e["reason"] for e in records["excluded"]}
    assert set(reasons) == {"test/gt/mismatch.png", "test/gt/truncated.png"}
    assert "differ in size" in reasons["test/gt/mismatch.png"]
    assert "truncated.png" in reasons["test/gt/truncated.png"]
    notes = {(n["name"], n["note"]) for n in records["notes"]}
    assert ("test/gt/gray.png", "lq: grayscale converted to RGB") in notes
    assert ("test/gt/rgba.png", "lq: alpha channel dropped") in notes
    assert ("test/gt/deep.png", "16-bit reduced to 8 bit") in notes
    names = list(store.array("pairs", "names")[:])
    hw = store.array("pairs", "hw")[:]
    gt = store.array("pairs", "gt")
    for k in range(6):  # the good samples are intact
        i = names.index(f"test/gt/good{k}.png")
        assert tuple(hw[i]) == (40, 48) and np.array_equal(gt[i, :40, :48], rgb(k))
    assert tuple(hw[names.index("test/gt/truncated.png")]) == (0, 0)
    deep = names.index("test/gt/deep.png")
    assert np.abs(gt[deep, :40, :48].astype(int) - rgb(15)).max() <= 1  # 16-bit scaled to 8-bit
    gray = names.index("test/gt/gray.png")
    lq = store.array("pairs", "lq")[gray, :40, :48]
    assert np.array_equal(lq[..., 0], lq[..., 2])


def test_too_many_bad_samples_stop_the_run_with_nothing_marked_complete(
    dataset, tiny_clip, tmp_path
):
    with pytest.raises(SourceError, match="excluded"):
        features(dataset, tiny_clip, tmp_path / "stores")  # 2 of 11 > 5 %
    store = Store(next((tmp_path / "stores").glob("*")))
    assert all(m["status"] != "complete" for m in store.manifest()["members"].values())


class NaNOnSecond(Identity):
    id = "nan-second"

    def __call__(self, lq, meta):
        out = lq.copy()
        if abs(float(lq.mean()) - float(rgb(101).mean() / 255)) < 1e-6:
            out[0, 0, 0] = np.nan
        return out


class HugeOnSecond(NaNOnSecond):
    """Finite in float32, but beyond float16's range (65504): inf once stored as float16."""

    id = "huge-second"

    def __call__(self, lq, meta):
        out = super().__call__(lq, meta)
        out[np.isnan(out)] = 7e4
        return out


@pytest.mark.parametrize(
    "target,reason", [(NaNOnSecond, "non-finite"), (HugeOnSecond, "float16 range")]
)
def test_non_finite_target_output_excludes_only_that_sample(
    dataset, tiny_clip, tmp_path, monkeypatch, target, reason
):
    monkeypatch.setitem(TARGETS, target.id, target)
    cfg = FeaturesConfig(
        task="deblur",
        data=str(dataset),
        target=target.id,
        encoder=f"openclip:{tiny_clip}",
        store_root=str(tmp_path / "stores"),
        shard_len=4,
        splits=("train",),
        max_bad=0.5,
    )
    store = Store(build_features(cfg)[0])
    member = next(m for m in store.manifest()["members"] if m.startswith("targets/"))
    info = store.member_info(member)
    assert info["status"] == "complete"
    excluded = store.records(member)["excluded"]
    assert [e["name"] for e in excluded] == ["train/gt/good1.png"]
    assert reason in excluded[0]["reason"]
    assert np.isfinite(store.array(member, "base")[:]).all()  # no inf stored (float16 overflow)

    from training.data import Split

    split = Split.open(store.path, None, None)
    assert tuple(split.hw[1]) == (0, 0) and tuple(split.hw[0]) == (40, 48)


def test_samples_smaller_than_the_crop_are_skipped_with_a_warning(tmp_path):
    from toys import make_store

    from training.data import CropBatches, Split

    path = make_store(tmp_path, "train", 4, (40, 40))
    split = Split.open(path, None, None)
    split.arrays()
    split._hw[1] = (20, 20)  # as if one sample were small
    with pytest.warns(UserWarning, match="smaller than the 32px crop"):
        batches = CropBatches(split, 32, 4, 0, 10)
    assert 1 not in batches.pool
    with pytest.raises(ValueError, match="no sample"):
        CropBatches(split, 48, 4, 0, 10)


def test_a_file_name_that_is_not_utf8_stops_the_split_naming_the_file(dataset, tiny_clip, tmp_path):
    """Sample names are stored as UTF-8 text: a name the file system holds as other bytes (here
    b'img_\\xff.png', Latin-1 from an old archive) is refused before anything is computed, its
    bytes and the fix in the message, instead of a UnicodeEncodeError deep in planning."""
    name = b"img_\xff.png"
    for side, seed in (("gt", 20), ("lq", 21)):
        Image.fromarray(rgb(seed)).save(
            os.fsdecode(os.fsencode(dataset / "test" / side) + b"/" + name), format="PNG"
        )
    with pytest.raises(SourceError) as e:
        features(dataset, tiny_clip, tmp_path / "stores", max_bad=0.5)
    message = str(e.value)
    assert repr(os.fsencode(dataset / "test" / "gt") + b"/" + name) in message
    assert "UTF-8" in message and "rename" in message
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())
