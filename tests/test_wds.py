"""WebDataset export and streaming reader: round trip, disjoint shards per rank and stream, deterministic
and resumable batches, bounded memory, S3 streaming, damaged shards, excluded samples, stats."""

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_remote import BUCKET, s3  # noqa: F401  the real SeaweedFS S3 server of the session
from toys import fill_member, pipeline_members

from stores import Store, key_of, make_layout, store_name
from stores.wds import VERSION, export_wds, index_digest, png_bytes
from training.data import CropBatches, Split, to_tensor
from training.wds_data import WdsBatches, WdsError, WdsSplit, decode_png

ROOT = Path(__file__).resolve().parents[1]
N, H, W, D = 11, 44, 52, 8
SOURCE_HW = [
    (44 - 4 * (i % 3), 52 - 4 * (i % 4)) for i in range(N)
]  # valid sizes differ per sample
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
        base[i, :h, :w] = gt[i, :h, :w] / 255 + rng.normal(
            0, 0.05, (h, w, 3)
        )  # some outside [0, 1]
    g = rng.normal(size=(N, 4, D)).astype(np.float32)
    pairs_key = key_of({"wds": "toy"})
    path = Path(root) / store_name("toy", "train", "deblur", pairs_key)
    store = Store.open_or_create(
        path, {"dataset": "toy", "split": "train", "task": "deblur", "pairs_key": pairs_key}, LAYOUT
    )
    crop = lambda a: [x[:h, :w] for x, (h, w) in zip(a, HW)]  # noqa: E731  each sample at its own size
    members = pipeline_members(
        pairs_key,
        crop(lq),
        crop(gt),
        HW,
        crop(base),
        g,
        [f"im{i}.png" for i in range(N)],
        [json.dumps({"sigma": i / 10}) for i in range(N)],
    )
    for member, (arrays, info) in members.items():
        fill_member(store, member, key_of({"m": member}), arrays, info)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    store = build_store(tmp_path_factory.mktemp("wds"))
    return store, export_wds(store, min_shards=4)


@pytest.fixture(scope="module")
def exported_png(exported, tmp_path_factory):
    store, _ = exported
    return store, export_wds(store, tmp_path_factory.mktemp("wds-png"), min_shards=4, codec="png")


def unzstd(data: bytes) -> np.ndarray:
    """A zstd-compressed .npy entry, read with numcodecs and numpy alone (no project code)."""
    from numcodecs import Zstd

    return np.load(io.BytesIO(Zstd().decode(data)), allow_pickle=False)


def test_png_is_standard_and_round_trips():
    img = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    data = png_bytes(img)
    assert np.array_equal(decode_png(data, "x"), img)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), img)
    with pytest.raises(WdsError, match="bad.png: not a readable PNG"):
        decode_png(data[:40], "bad.png")


def test_every_sample_round_trips_at_its_valid_size(exported):
    path, folder = exported
    index = json.loads((folder / "index.json").read_text())
    assert index["complete"] and len(index["shards"]) >= 4 and index["samples"] == N
    assert (
        index["version"] == 4 and index["codec"] == "zstd"
    )  # lq/gt: uint8 .npy compressed with zstd
    store = Store(path)
    target, osf = store.members("targets")[0], store.members("osf")[0]
    assert index["keys"][target] == store.member_info(target)["key"]
    seen = []
    for shard in index["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for i in range(shard["first"], shard["first"] + shard["samples"]):
            h, w = HW[i]
            k = f"{i:08d}_0000"  # smaller than the tile: one tile each
            for f in ("lq", "gt"):
                img = unzstd(files[f"{k}.{f}.npy.zst"])
                assert img.dtype == np.uint8 and np.array_equal(
                    img, store.array("pairs", f)[i, :h, :w]
                )
            base = np.load(io.BytesIO(files[f"{k}.base.npy"]))
            assert base.dtype == np.float16 and np.array_equal(
                base, store.array(target, "base")[i, :h, :w]
            )
            g = np.load(io.BytesIO(files[f"{k}.osf.{osf.split('/')[1]}.npy"]))
            assert (
                g.shape == (4, D)
                and g.dtype == np.float32
                and np.array_equal(g, store.array(osf, "g")[i])
            )
            meta = json.loads(files[f"{k}.meta.json"])
            assert (
                meta["hw"] == [h, w]
                and meta["meta"] == {"sigma": i / 10}
                and meta["name"] == f"im{i}.png"
            )
            assert meta["tile"] == [0, 0, h, w]
            assert meta["target"]["member"] == target and meta["store"] == path.name
            seen.append(i)
    assert seen == list(range(N))


def batches(split, steps=range(0, 12), seed=3, rank=0, world=1, workers=0, **kw):
    kw = {"streams": 2, "buffer": 3, **kw}
    data = WdsBatches(split, 32, 4, seed, steps.start, steps.stop, rank, world, **kw)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers)
    return list(loader)


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_ranks_and_streams_read_disjoint_shards_every_epoch(exported):
    _, folder = exported
    split = WdsSplit.open(folder)
    for epoch in (0, 1, 5):
        seen = [
            s["name"]
            for r in (0, 1)
            for k in (0, 1)
            for s in WdsBatches(split, 32, 4, 0, 0, 1, r, 2, streams=2).shards_of(k, epoch)
        ]
        assert len(seen) == len(set(seen)) == len(split.shards)
    with pytest.raises(
        WdsError, match="shards for 99 processes x 2 streams; export with --min-shards 198"
    ):
        WdsBatches(split, 32, 99, 0, 0, 1, 0, 99, streams=2)


def test_batches_are_crops_of_the_stored_samples_and_deterministic(exported):
    path, folder = exported
    store, split = Split.open(path, None, None), WdsSplit.open(folder, None, ["clip-vit-b32"])
    first = batches(split)
    assert same_batches(first, batches(split))  # same seed, same batches
    assert same_batches(first, batches(split, workers=2))  # whatever the loader workers
    assert not same_batches(first, batches(split, seed=4))
    used = torch.cat([b["index"] for b in first]).tolist()
    assert set(used) == set(range(N))  # 48 samples: every one, several epochs
    for step, b in enumerate(first):  # each crop is the stored sample's, with its flip and its g
        rng = np.random.default_rng([3, step, 0])
        for j, i in enumerate(b["index"].tolist()):
            h, w = HW[i]
            y, x = rng.integers(0, h - 32 + 1), rng.integers(0, w - 32 + 1)
            fh, fv = rng.integers(0, 2, 2)
            want = store.image(i)["lq"][y : y + 32, x : x + 32]
            want = want[:, ::-1] if fh else want
            want = want[::-1] if fv else want
            assert torch.equal(b["lq"][j], to_tensor(want[None].copy())[0])
            assert torch.equal(b["g"][j], torch.from_numpy(store.g(i, fh + 2 * fv)))
    assert {k: v for k, v in split.info().items() if k != "format"} == store.info()
    assert split.names == store.names and split.metric_space == store.metric_space


def test_every_split_reads_alike_through_one_protocol(exported):
    """Split, WdsSplit and PredictedG are SplitLike: evaluation reads whole samples by index from each."""
    from ptgrm.predictor import OSFPredictor
    from training.data import SplitLike
    from training.distill import PredictedG

    path, folder = exported
    store, split = Split.open(path, None, None), WdsSplit.open(folder)
    predicted = PredictedG(store, OSFPredictor(D, width=8))
    assert all(isinstance(s, SplitLike) for s in (store, split, predicted))
    for i in (0, N - 1):
        a, b, c = store.image(i), split.image(i), predicted.image(i)
        for k in ("lq", "gt", "base"):
            assert np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k])
        assert np.array_equal(a["g"], b["g"]) and c["g"].shape == a["g"].shape
    assert predicted.names == store.names and predicted.info() == store.info()
    assert np.array_equal(predicted.hw, store.hw) and predicted.metric_space == store.metric_space


def test_a_resumed_run_gets_the_batches_of_an_uninterrupted_one(exported):
    _, folder = exported
    split = WdsSplit.open(folder)
    whole = batches(split, range(0, 15))
    for start in (5, 6, 9):
        assert same_batches(batches(split, range(start, 15)), whole[start:])
        assert same_batches(batches(split, range(start, 15), workers=2), whole[start:])


def test_reader_memory_is_bounded_by_the_shuffle_buffer(exported):
    _, folder = exported
    split = WdsSplit.open(folder)
    data = WdsBatches(split, 32, 2, 0, 0, 40, streams=1, buffer=3)  # 80 samples from 11: 7 epochs
    out = list(data)
    assert len(out) == 40 and data.peak_held <= 3 + 1 < N
    bigger = WdsBatches(split, 32, 2, 0, 0, 40, streams=1, buffer=8)
    list(bigger)
    assert 3 < bigger.peak_held <= 8 + 1


def test_two_ranks_stream_from_s3_without_a_local_copy(exported, s3, monkeypatch):
    _, folder = exported
    fs = s3.filesystem()
    url = f"s3://{BUCKET}/wds-test/{folder.name}"
    fs.put(str(folder), f"{BUCKET}/wds-test/{folder.name}", recursive=True)
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    remote, local = WdsSplit.open(url), WdsSplit.open(folder)
    assert remote.loc.url == url and remote.names == local.names
    got = [batches(remote, rank=r, world=2) for r in (0, 1)]
    for r in (0, 1):
        assert same_batches(got[r], batches(local, rank=r, world=2))
    assert not same_batches(got[0], got[1])


WORKER_READS = """
import sys, torch
from training.wds_data import WdsBatches, WdsSplit
data = WdsBatches(WdsSplit.open(sys.argv[1]), 32, 4, 3, 0, 12, streams=2, buffer=3)
for b in torch.utils.data.DataLoader(data, batch_size=None, num_workers=1):
    print(float(b["gt"].double().sum()))
"""


def test_a_loader_worker_streams_from_s3_as_the_trainer_reads_it(exported, s3):
    """The trainer opens the export in its own process and streams it in a forked loader worker
    (`--workers`, 1 by default for wds): the worker gets an S3 client of its own (fsspec's is not
    fork-safe), quietly (the parent's is left alone), and reads the batches read in one process."""
    _, folder = exported
    url = f"s3://{BUCKET}/wds-worker/{folder.name}"
    s3.filesystem().put(str(folder), f"{BUCKET}/wds-worker/{folder.name}", recursive=True)
    out = subprocess.run(
        [sys.executable, "-c", WORKER_READS, url],
        cwd=ROOT,
        env=s3.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and not out.stderr, out.stderr[-3000:]
    local = batches(WdsSplit.open(folder), seed=3)
    assert out.stdout.split() == [str(float(b["gt"].double().sum())) for b in local]


def test_cli_export_min_shards_and_rerun_is_a_no_op(exported, tmp_path):
    path, _ = exported
    args = [
        sys.executable,
        "-m",
        "stores",
        "export-wds",
        str(path),
        "--out",
        str(tmp_path),
        "--min-shards",
        "6",
    ]
    first = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=True)
    index = json.loads((tmp_path / f"{path.name}-wds" / "index.json").read_text())
    assert len(index["shards"]) == 6 and "6 shards" in first.stdout
    assert (
        "up to date"
        in subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    )
    png = subprocess.run(
        [*args, "--codec", "png"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert (
        "up to date" not in png.stdout and "lq/gt png" in png.stdout
    )  # another codec: every shard rewritten
    index = json.loads((tmp_path / f"{path.name}-wds" / "index.json").read_text())
    with tarfile.open(tmp_path / f"{path.name}-wds" / index["shards"][0]["name"]) as tar:
        assert index["codec"] == "png" and any(m.name.endswith(".lq.png") for m in tar)


def test_png_exports_and_version_3_exports_give_the_same_batches(exported, exported_png, tmp_path):
    """PNG stays selectable (`--codec png`), and exports made before the codec was recorded (version
    3: PNG tiles) are still read: every codec gives the same tiles, hence the same batches."""
    _, folder = exported
    _, png = exported_png
    index = json.loads((png / "index.json").read_text())
    assert index["codec"] == "png" and index["version"] == VERSION
    want = batches(WdsSplit.open(folder))
    assert same_batches(batches(WdsSplit.open(png)), want)
    old = tmp_path / png.name  # as version 3 wrote it: no codec recorded
    shutil.copytree(png, old)
    v3 = {k: v for k, v in index.items() if k not in ("codec", "sha256")} | {"version": 3}
    v3["settings"] = {k: v for k, v in v3["settings"].items() if k != "codec"}
    (old / "index.json").write_text(json.dumps({**v3, "sha256": index_digest(v3)}))
    split = WdsSplit.open(old)
    assert same_batches(batches(split), want)
    assert np.array_equal(split.image(3)["lq"], WdsSplit.open(folder).image(3)["lq"])
    jpeg = {k: v for k, v in index.items() if k != "sha256"} | {"codec": "jpeg"}
    (old / "index.json").write_text(json.dumps({**jpeg, "sha256": index_digest(jpeg)}))
    with pytest.raises(WdsError, match="codec 'jpeg'.*reads png, zstd.*export-wds"):
        WdsSplit.open(old)


def test_zstd_tiles_of_photos_stay_within_1_5x_their_png_and_round_trip():
    """The default codec on natural photos (512 px tiles of scikit-image's, clean and noisy as lq
    tiles are): at most 1.5x the bytes of the PNG it replaces."""
    import skimage.data as skd

    from stores.wds import image_bytes
    from training.wds_data import decode_image

    rng = np.random.default_rng(0)
    tiles = [
        np.ascontiguousarray(getattr(skd, n)()[:512, :512, :3])
        for n in ("astronaut", "hubble_deep_field")
    ]
    tiles += [np.clip(t + rng.normal(0, 15, t.shape), 0, 255).astype(np.uint8) for t in tiles]
    for t in tiles:
        data = image_bytes(t, "zstd")
        assert len(data) <= 1.5 * len(png_bytes(t)), (len(data), len(png_bytes(t)))
        assert np.array_equal(decode_image(data, "zstd", "x"), t) and np.array_equal(
            unzstd(data), t
        )
    with pytest.raises(WdsError, match="bad.npy.zst: not a zstd-compressed"):
        decode_image(image_bytes(tiles[0], "zstd")[:100], "zstd", "bad.npy.zst")
    with pytest.raises(
        WdsError, match=r"f.npy.zst: expected an \(H, W, 3\) uint8 image, got \(4, 3\) float32"
    ):
        from numcodecs import Zstd

        from stores.wds import npy_bytes

        decode_image(Zstd().encode(npy_bytes(np.zeros((4, 3), np.float32))), "zstd", "f.npy.zst")


def test_reader_refuses_a_damaged_shard(exported, tmp_path):
    _, folder = exported
    copy = tmp_path / folder.name
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    for k, where in enumerate((2 / 3, 1 / 3)):  # in a member's bytes (sha256), in a tar header
        shard = copy / f"shard-00000{k}.tar"
        data = bytearray(shard.read_bytes())
        data[int(len(data) * where) // 512 * 512 + (0 if k else 700)] ^= 0xFF
        shard.write_bytes(bytes(data))
    split = WdsSplit.open(copy)
    for k in (0, 1):
        with pytest.raises(WdsError, match=f"shard-00000{k}.tar: "):
            list(split.samples(split.shards[k], {(i, 0) for i in range(N)}))


def damaged_copy(folder, dest, entry):
    """A copy of the export with one byte flipped inside `entry` of the first usable tile of
    shard 1 (tar headers untouched: a valid tar); returns (shard name, sample index)."""
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    shard = json.loads((folder / "index.json").read_text())["shards"][1]
    i = shard["first"]
    with tarfile.open(dest / shard["name"]) as tar:
        m = tar.getmember(f"{i:08d}_0000.{entry}")
    data = bytearray((dest / shard["name"]).read_bytes())
    data[m.offset_data + m.size - 2] ^= 0x5A  # in the array's last value, in the PNG's last chunk
    (dest / shard["name"]).write_bytes(bytes(data))
    return shard["name"], i


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("entry", ["base.npy", "lq.npy.zst", "gt.png"])
def test_a_flipped_byte_is_caught_before_its_sample_reaches_a_batch(
    exported, tmp_path, entry, where, request, monkeypatch
):
    _, folder = request.getfixturevalue("exported_png" if entry.endswith(".png") else "exported")
    name, bad = damaged_copy(folder, tmp_path / folder.name, entry)
    url = tmp_path / folder.name
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        url = f"s3://{BUCKET}/wds-damaged-{entry}/{folder.name}"
        s3.filesystem().put(str(tmp_path / folder.name), url[5:], recursive=True)
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
    split = WdsSplit.open(url)
    received = []  # what a run that stops at any step before the error got
    with pytest.raises(WdsError) as err:  # buffer 1: a sample is in a batch soon after it is read
        for b in WdsBatches(split, 32, 1, 0, 0, 40, streams=1, buffer=1):
            received.append(b["index"].item())
    assert bad not in received and len(received) >= 2, received
    assert re.search(
        rf"{name}: sample {bad:08d}_0000 {entry}: sha256 differs.*export-wds", str(err.value)
    )
    with pytest.raises(WdsError, match=rf"{name}: sample {bad:08d}_0000 {entry}: sha256 differs"):
        split.image(bad)


def test_wds_reader_imports_no_frozen_networks():
    code = (
        "import sys, training.wds_data; bad = {'pipeline', 'open_clip', 'diffusers'}"
        " & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_info_stats_json_gives_psnr_and_norms_per_sample(exported):
    path, _ = exported
    out = subprocess.run(
        [sys.executable, "-m", "stores", "info", str(path), "--stats", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    members = json.loads(out.stdout)["members"]
    store = Store(path)
    target, osf = store.members("targets")[0], store.members("osf")[0]
    want, want_in = [], []
    for i, (h, w) in enumerate(HW):
        gt = store.array("pairs", "gt")[i, :h, :w].astype(np.float64)
        base = np.clip(
            np.round(store.array(target, "base")[i, :h, :w].astype(np.float64) * 255), 0, 255
        )
        lq = store.array("pairs", "lq")[i, :h, :w].astype(np.float64)
        want.append(10 * np.log10(255**2 / np.mean((base.astype(np.uint8) - gt) ** 2)))
        want_in.append(10 * np.log10(255**2 / np.mean((lq - gt) ** 2)))
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
    write_json_atomic(
        path
        / RECORDS_DIR
        / f"{target.replace('/', '__')}.json",  # as a non-finite output leaves it
        {"excluded": [{"index": 2, "name": "im2.png", "reason": "non-finite"}], "notes": []},
    )
    folder = export_wds(path, out=tmp_path / "wds", min_shards=2)
    index = json.loads((folder / "index.json").read_text())
    assert [hw for s in index["shards"] for hw in s["hw"]][2] == [0, 0]
    zarr_split, wds_split = Split.open(path, None, None), WdsSplit.open(folder)
    assert tuple(zarr_split.hw[2]) == tuple(wds_split.hw[2]) == (0, 0)
    crops = CropBatches(zarr_split, 32, 8, seed=0, steps=200)
    assert all(i != 2 for s in range(200) for i, *_ in crops.draw(s))
    crops[5]  # reads fine around the excluded sample
    streamed = torch.cat([b["index"] for b in batches(wds_split, range(0, 60), streams=1)]).tolist()
    assert 2 not in streamed and set(streamed) == set(range(N)) - {2}
    with tarfile.open(folder / index["shards"][0]["name"]) as tar:
        assert not any(m.name.startswith("00000002_") for m in tar)


def test_the_shuffle_buffers_are_bounded_in_bytes_not_only_in_samples():
    """Large samples (a 1280x720 pair is ~8 MB encoded) get shorter buffers, so a loader's memory
    does not grow with the samples' size; small ones keep --wds-buffer."""
    from types import SimpleNamespace

    from training.wds_data import buffer_samples

    big = SimpleNamespace(shards=[{"bytes": 100 * 2**20, "tiles": 10}] * 4)  # 10 MB per sample
    assert buffer_samples(big, 4, 256, 256.0) == 6  # 256 MB / (4 streams x 10 MB)
    assert buffer_samples(big, 4, 3, 256.0) == 3
    assert buffer_samples(big, 4, 256, 1.0) == 1  # a 12 MP sample: one per stream (read, then used)
    assert (
        buffer_samples(SimpleNamespace(shards=[{"bytes": 2**20, "tiles": 100}]), 4, 256, 256.0)
        == 256
    )


def test_tiles_cut_large_samples_and_put_them_back_together(exported, tmp_path):
    """A tiled export: each sample's tiles cover it (no overlap asked: a px at most), every crop lies
    inside one tile with the stored pixels, batches stay deterministic and resumable, and `image`
    puts the tiles back together."""
    from stores.wds import axis_tiles, tile_grid

    assert axis_tiles(720, 512) == [(0, 360), (360, 360)] and len(tile_grid(3000, 4000, 512)) == 48
    spans = axis_tiles(1280, 512, 96)
    assert (
        len(spans) == 3
        and spans[0][0] == 0
        and sum(spans[-1]) == 1280
        and all(n <= 512 for _, n in spans)
    )
    assert all(
        a + n - b >= 96 for (a, n), (b, _) in zip(spans, spans[1:])
    )  # neighbours overlap by >= 96
    assert axis_tiles(300, 512) == [(0, 300)] and axis_tiles(300, 0) == [(0, 300)]
    path, _ = exported
    folder = export_wds(path, out=tmp_path, min_shards=4, tile=20)
    index = json.loads((folder / "index.json").read_text())
    assert index["tiling"] == {"tile": 20, "overlap": 0} and index["version"] == VERSION
    assert sum(s["tiles"] for s in index["shards"]) == sum(len(tile_grid(h, w, 20)) for h, w in HW)
    store, split = Split.open(path, None, None), WdsSplit.open(folder)
    for i, (h, w) in enumerate(HW):
        cover = np.zeros((h, w), int)
        for y, x, th, tw in split.tiles(i):
            assert th <= 20 and tw <= 20 and min(th, tw) >= 12
            cover[y : y + th, x : x + tw] += 1
        assert (
            cover.min() == 1 and cover.sum() <= 1.1 * h * w
        )  # covered; equal sizes overlap by a px at most
        a, b = store.image(i), split.image(i)
        assert all(np.array_equal(a[k], b[k]) for k in ("lq", "gt", "base", "g"))
    crop = 12

    def run(steps, workers=0):
        return list(
            torch.utils.data.DataLoader(  # noqa: E731
                WdsBatches(split, crop, 4, 3, steps.start, steps.stop, streams=2, buffer=5),
                batch_size=None,
                num_workers=workers,
            )
        )

    first = run(range(0, 30))
    assert same_batches(first, run(range(0, 30), workers=2)) and same_batches(
        run(range(11, 30)), first[11:]
    )
    for b in first:  # every crop is a window of its stored sample inside one of its tiles
        for j, i in enumerate(b["index"].tolist()):
            lq = store.image(i)["lq"]
            found = [
                (y, x)
                for ty, tx, th, tw in split.tiles(i)
                for y in range(ty, ty + th - crop + 1)
                for x in range(tx, tx + tw - crop + 1)
                if any(
                    torch.equal(b["lq"][j], to_tensor(v[None].copy())[0])
                    for v in (
                        lq[y : y + crop, x : x + crop],
                        lq[y : y + crop, x : x + crop][:, ::-1],
                        lq[y : y + crop, x : x + crop][::-1],
                        lq[y : y + crop, x : x + crop][::-1, ::-1],
                    )
                )
            ]
            assert found, (i, j)
    assert set(torch.cat([b["index"] for b in first]).tolist()) == set(range(N))
    with pytest.warns(
        UserWarning,
        match="tiles .at most 20 px. are smaller than the 16px crop in [1-9]+ samples.*--tile 32",
    ):
        WdsBatches(split, 16, 4, 0, 0, 1, streams=1)
    with pytest.raises(ValueError, match="or tile of at most 20 px.*larger --tile"):
        WdsBatches(split, 24, 4, 0, 0, 1, streams=1)


def test_an_export_of_an_older_format_is_refused_with_how_to_rebuild_it(exported, tmp_path):
    """Versions 1 (whole samples) and 2 (no per-entry sha256) are refused; export again rewrites the
    shards an older version left (not reused: they lack the digests)."""
    path, folder = exported
    old = tmp_path / folder.name
    old.mkdir()
    index = json.loads((folder / "index.json").read_text())
    for version in (1, 2):
        (old / "index.json").write_text(json.dumps({**index, "version": version}))
        with pytest.raises(
            WdsError, match=f"format version {version}.*reads versions 3 and 4.*export-wds STORE"
        ):
            WdsSplit.open(old)
    again = export_wds(path, out=tmp_path / "again", min_shards=4)
    side = json.loads((again / "shard-000000.json").read_text())
    (again / "shard-000000.json").write_text(
        json.dumps({k: v for k, v in side.items() if k != "version"})
    )
    (
        again / "index.json"
    ).unlink()  # as version 2 left an interrupted export: its tars are not reused
    export_wds(path, out=tmp_path / "again", min_shards=4)
    assert json.loads((again / "shard-000000.json").read_text())["version"] == VERSION


def test_renamed_tile_keys_and_damaged_shards_are_caught_and_export_rewrites_them(
    exported, tmp_path
):
    """Two tiles' keys swapped inside a shard (their entries still match their own digests) are
    refused before either reaches a batch; `export-wds`, which the errors name, rewrites a damaged
    shard and a damaged index instead of calling the export up to date."""

    path, folder = exported
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    index = json.loads((copy / "index.json").read_text())
    shard = next(s for s in index["shards"] if s["samples"] >= 2)
    tar_path = copy / shard["name"]
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    a, b = f"{shard['first']:08d}_0000", f"{shard['first'] + 1:08d}_0000"
    swap = {a: b, b: a}
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            key, _, ext = m.name.partition(".")
            m.name = f"{swap.get(key, key)}.{ext}"
            tar.addfile(m, io.BytesIO(data))
    split = WdsSplit.open(copy)
    got = []
    with pytest.raises(WdsError, match=r"meta.json: describes sample"):
        for raw in split.samples(shard, {(i, 0) for i in range(N)}):
            got.append(raw["index"])
    assert got == []
    out = export_wds(path, tmp_path, min_shards=4)
    assert out == copy and split.image(shard["first"])["gt"].shape[:2] == tuple(HW[shard["first"]])
    WdsSplit.open(copy).image(shard["first"])  # rewritten: reads again
    (copy / "index.json").write_text((copy / "index.json").read_text()[:100])
    export_wds(path, tmp_path, min_shards=4)
    assert WdsSplit.open(copy).image(shard["first"])["gt"].shape[:2] == tuple(HW[shard["first"]])
