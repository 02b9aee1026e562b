"""WebDataset export and reader: round trip, shard layout, ranks, batches equal to Zarr's, stats."""
import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stores import Store, key_of, make_layout, store_name
from stores.wds import export_wds, png_bytes
from training.data import CropBatches, Split
from toys import fill_member, pipeline_members
from training.wds_data import WdsError, WdsSplit, decode_png

ROOT = Path(__file__).resolve().parents[1]
N, H, W, D = 11, 44, 52, 8
SOURCE_HW = [(44 - 4 * (i % 3), 52 - 4 * (i % 4)) for i in range(N)]  # valid sizes differ per sample
LAYOUT, ORDER = make_layout(SOURCE_HW, 16, shard_len=4)  # two size buckets
HW = [SOURCE_HW[j] for j in ORDER]  # in storage order, which is the sample index


def build_store(root) -> Path:
    """A complete store with the pipeline's members (pairs, targets/<id>, osf/<id>), samples of
    several sizes in two buckets."""
    rng = np.random.default_rng(0)
    gt, lq = np.zeros((2, N, H, W, 3), np.uint8)
    base = np.zeros((N, H, W, 3), np.float16)
    for i, (h, w) in enumerate(HW):
        gt[i, :h, :w] = rng.integers(0, 256, (h, w, 3))
        lq[i, :h, :w] = np.clip(gt[i, :h, :w] + rng.normal(0, 20, (h, w, 3)), 0, 255)
        base[i, :h, :w] = gt[i, :h, :w] / 255 + rng.normal(0, 0.05, (h, w, 3))  # some outside [0, 1]
    g = rng.normal(size=(N, 4, D)).astype(np.float32)
    pairs_key = key_of({"wds": "toy"})
    path = Path(root) / store_name("toy", "train", "deblur", pairs_key)
    store = Store.open_or_create(path, {"dataset": "toy", "split": "train", "task": "deblur",
                                        "pairs_key": pairs_key}, LAYOUT)
    crop = lambda a: [x[:h, :w] for x, (h, w) in zip(a, HW)]  # noqa: E731  each sample at its own size
    members = pipeline_members(pairs_key, crop(lq), crop(gt), HW, crop(base), g, [f"im{i}.png" for i in range(N)],
                               [json.dumps({"sigma": i / 10}) for i in range(N)])
    for member, (arrays, info) in members.items():
        fill_member(store, member, key_of({"m": member}), arrays, info)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    store = build_store(tmp_path_factory.mktemp("wds"))
    return store, export_wds(store, min_shards=4, log=lambda *_: None)


def test_png_is_standard_and_round_trips():
    img = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    data = png_bytes(img)
    assert np.array_equal(decode_png(data, "x"), img)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), img)
    other = io.BytesIO()
    Image.fromarray(img).save(other, format="PNG")  # PIL's own filters: None/Sub/Up read, others refused
    try:
        assert np.array_equal(decode_png(other.getvalue(), "pil"), img)
    except WdsError as e:
        assert "not supported" in str(e)


def test_every_sample_round_trips_at_its_valid_size(exported):
    path, folder = exported
    index = json.loads((folder / "index.json").read_text())
    assert index["complete"] and len(index["shards"]) >= 4 and index["samples"] == N
    store = Store(path)
    target, osf = store.members("targets")[0], store.members("osf")[0]
    assert index["keys"][target] == store.member_info(target)["key"]
    seen = []
    for shard in index["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for i in range(shard["first"], shard["first"] + shard["samples"]):
            h, w = HW[i]
            k = f"{i:08d}"
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(files[f"{k}.lq.png"]))),
                                  store.array("pairs", "lq")[i, :h, :w])
            assert np.array_equal(decode_png(files[f"{k}.gt.png"], k), store.array("pairs", "gt")[i, :h, :w])
            base = np.load(io.BytesIO(files[f"{k}.base.npy"]))
            assert base.dtype == np.float16 and np.array_equal(base, store.array(target, "base")[i, :h, :w])
            g = np.load(io.BytesIO(files[f"{k}.osf.{osf.split('/')[1]}.npy"]))
            assert g.shape == (4, D) and g.dtype == np.float32 and np.array_equal(g, store.array(osf, "g")[i])
            meta = json.loads(files[f"{k}.meta.json"])
            assert meta["hw"] == [h, w] and meta["meta"] == {"sigma": i / 10} and meta["name"] == f"im{i}.png"
            assert meta["target"]["member"] == target and meta["store"] == path.name
            seen.append(i)
    assert seen == list(range(N))


def test_ranks_get_whole_disjoint_shards_and_equal_sample_counts(exported):
    path, folder = exported
    ranks = [WdsSplit.open(folder, rank=r, world=2) for r in (0, 1)]
    names = [{s["name"] for s in split.shards} for split in ranks]
    assert names[0].isdisjoint(names[1]) and all(names)
    assert len(ranks[0].hw) == len(ranks[1].hw) == min(sum(s["samples"] for s in r.shards) for r in ranks)
    for split in ranks:  # each rank's samples are its shards' samples, in order
        first = [i for s in split.shards for i in range(s["first"], s["first"] + s["samples"])][:len(split.hw)]
        assert split.names == [f"im{i}.png" for i in first]
        assert np.array_equal(split.arrays()["gt"][len(first) - 1], Store(path).array("pairs", "gt")[
            first[-1], :HW[first[-1]][0], :HW[first[-1]][1]])
        batch = CropBatches(split, 32, 4, seed=0, steps=3, rank=split.rank, world=2)[1]
        assert batch["lq"].shape == (2, 3, 32, 32) and batch["g"].shape == (2, D)
    with pytest.raises(WdsError, match="shards for 99 processes"):
        WdsSplit.open(folder, rank=0, world=99)


def test_wds_split_gives_the_zarr_split_batches_images_and_info(exported):
    path, _ = exported
    zarr_split, wds_split = Split.open(path, None, None), WdsSplit.open(path, None, ["clip-vit-b32"], 0, 1)
    for step in (0, 3, 7):
        a = CropBatches(zarr_split, 32, 6, seed=5, steps=10)[step]
        b = CropBatches(wds_split, 32, 6, seed=5, steps=10)[step]
        assert all(torch.equal(a[k], b[k]) for k in ("lq", "gt", "base", "g"))
    clone = pickle.loads(pickle.dumps(wds_split))  # as a spawned loader worker gets it: no samples
    assert clone._arrays is None and torch.equal(CropBatches(clone, 32, 6, 5, 10)[3]["lq"],
                                                 CropBatches(zarr_split, 32, 6, 5, 10)[3]["lq"])
    for i in (0, N - 1):
        za, wa = zarr_split.image(i), wds_split.image(i)
        assert all(np.array_equal(za[k], wa[k]) for k in za)
    assert {k: v for k, v in wds_split.info().items() if k != "format"} == zarr_split.info()
    assert wds_split.names == zarr_split.names and wds_split.metric_space == zarr_split.metric_space


def test_cli_export_min_shards_and_rerun_is_a_no_op(exported, tmp_path):
    path, _ = exported
    args = [sys.executable, "-m", "stores", "export-wds", str(path), "--out", str(tmp_path), "--min-shards", "6"]
    first = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=True)
    index = json.loads((tmp_path / f"{path.name}-wds" / "index.json").read_text())
    assert len(index["shards"]) == 6 and "6 shards" in first.stdout
    assert "up to date" in subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=True).stdout


def test_reader_refuses_a_damaged_shard(exported, tmp_path):
    _, folder = exported
    copy = tmp_path / folder.name
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    shard = copy / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(WdsError, match="shard-000000.tar: sha256 differs"):
        WdsSplit.open(copy, rank=0, world=1).arrays()


def test_wds_reader_imports_no_frozen_networks():
    code = ("import sys, training.wds_data; bad = {'pipeline', 'open_clip', 'diffusers'}"
            " & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_info_stats_json_gives_psnr_and_norms_per_sample(exported):
    path, _ = exported
    out = subprocess.run([sys.executable, "-m", "stores", "info", str(path), "--stats", "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    members = json.loads(out.stdout)["members"]
    store = Store(path)
    target, osf = store.members("targets")[0], store.members("osf")[0]
    want, want_in = [], []
    for i, (h, w) in enumerate(HW):
        gt = store.array("pairs", "gt")[i, :h, :w].astype(np.float64)
        base = np.clip(np.round(store.array(target, "base")[i, :h, :w].astype(np.float64) * 255), 0, 255)
        lq = store.array("pairs", "lq")[i, :h, :w].astype(np.float64)
        want.append(10 * np.log10(255 ** 2 / np.mean((base.astype(np.uint8) - gt) ** 2)))
        want_in.append(10 * np.log10(255 ** 2 / np.mean((lq - gt) ** 2)))
    stats = members[target]["stats"]
    assert np.allclose(stats["psnr_base"]["per_sample"], want, rtol=0, atol=1e-9)
    assert np.isclose(stats["psnr_base"]["mean"], np.mean(want))
    assert np.allclose(members["pairs"]["stats"]["psnr_input"]["per_sample"], want_in, atol=1e-9)
    norms = np.linalg.norm(store.array(osf, "g")[:].astype(np.float64), axis=-1)
    assert np.allclose(members[osf]["stats"]["g_norm_mean"]["per_sample"], norms.mean(1))
    assert np.isclose(members[osf]["stats"]["g_norm_max"]["max"], norms.max())
    assert members[target]["stats"]["arrays"]["base"]["bytes_per_sample"] > 0


def test_samples_excluded_at_extraction_never_reach_a_batch_in_either_format(tmp_path):
    from stores.store import RECORDS_DIR, write_json_atomic

    path = build_store(tmp_path)
    target = Store(path).members("targets")[0]
    write_json_atomic(path / RECORDS_DIR / f"{target.replace('/', '__')}.json",  # as a non-finite output leaves it
                      {"excluded": [{"index": 2, "name": "im2.png", "reason": "non-finite"}], "notes": []})
    folder = export_wds(path, out=tmp_path / "wds", min_shards=2, log=lambda *_: None)
    index = json.loads((folder / "index.json").read_text())
    assert [hw for s in index["shards"] for hw in s["hw"]][2] == [0, 0]
    for split in (Split.open(path, None, None), WdsSplit.open(folder, rank=0, world=1)):
        assert tuple(split.hw[2]) == (0, 0)
        batches = CropBatches(split, 32, 8, seed=0, steps=200)
        assert all(i != 2 for s in range(200) for i, *_ in batches.draw(s))
        batches[5]  # reads fine around the excluded sample
    with tarfile.open(folder / index["shards"][0]["name"]) as tar:
        assert not any(m.name.startswith("00000002.") for m in tar)
