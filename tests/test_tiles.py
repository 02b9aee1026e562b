"""The training loader's fast tile reader returns exactly what zarr returns, and names damage."""

import numpy as np
import pytest
import zarr
from toys import make_store
from zarr.codecs import Crc32cCodec, ZstdCodec

from stores import Store
from stores.tiles import DamagedShard, TileReader
from training.data import CropBatches, Split

MIXED = [(50, 70), (70, 50), (30, 30), (50, 70), (16, 16), (70, 50), (50, 70), (33, 17), (50, 70)]


def test_crops_equal_zarr_for_uint8_and_float16(tmp_path):
    """Mixed sizes and orientations (5 buckets; 16 px tiles, 4 samples per shard, ragged edges):
    crops across tile, shard and bucket edges equal a direct zarr read of the bucket array."""
    path = make_store(tmp_path, "train", len(MIXED), MIXED)
    store = Store(path)
    assert len(store.layout.buckets) == 5 and {b.hw for b in store.layout.buckets} >= {
        (64, 80),
        (80, 64),
    }
    hw = store.array("pairs", "hw")[:]
    assert sorted(map(tuple, hw.tolist())) == sorted(MIXED)
    rng = np.random.default_rng(0)
    for member, name in (("pairs", "lq"), (store.members("targets")[0], "base")):
        samples = store.array(member, name)
        reader = samples.wrap(TileReader.wrap)
        assert all(isinstance(p, TileReader) for p in reader.parts)
        for _ in range(300):
            i = int(rng.integers(0, len(MIXED)))
            k, row = store.layout.locate(i)
            direct = zarr.open_array(path / member / store.layout.buckets[k].name / name, mode="r")
            (H, W), (h, w) = store.layout.buckets[k].hw, hw[i]
            y, x = int(rng.integers(0, H)), int(rng.integers(0, W))
            dy, dx = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
            want, got = direct[row, y : y + dy, x : x + dx], reader[i, y : y + dy, x : x + dx]
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
            assert (
                not got[h - y :].any() and not got[:, w - x :].any()
            )  # only the rounding to the tile pads
        last = reader.parts[-1]
        assert np.array_equal(last[0], last.array[0])  # other selections go through zarr
        assert np.array_equal(
            last[-1, :, 3:], last.array[-1, :, 3:]
        )  # negative index and open slices
        with pytest.raises(IndexError):
            reader[len(MIXED), 0:4, 0:4]


def test_stored_bytes_follow_each_samples_own_size(tmp_path):
    """One large portrait among small crops: the small ones cost what they cost alone."""
    small = make_store(tmp_path / "a", "train", 8, (32, 32))
    mixed = make_store(tmp_path / "b", "train", 9, [(32, 32)] * 4 + [(640, 480)] + [(32, 32)] * 4)
    b = Store(mixed).layout.buckets
    assert [(x.hw, x.count, x.shard_len) for x in b] == [((32, 32), 8, 4), ((640, 480), 1, 4)]
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    small_bytes = size(small / "pairs" / "h32w32" / "lq")
    assert size(mixed / "pairs" / "h32w32" / "lq") <= small_bytes * 1.05


def test_unwritten_tiles_read_as_fill_value(tmp_path):
    path = tmp_path / "z"
    a = zarr.create_array(
        path,
        shape=(4, 40, 40, 3),
        dtype="uint8",
        chunks=(1, 16, 16, 3),
        shards=(2, 48, 48, 3),
        compressors=[ZstdCodec(level=3), Crc32cCodec()],
        fill_value=0,
    )
    a[1, 20:30, 5:9] = 7  # one written tile region; shard 1 (samples 2, 3) is never written
    a = zarr.open_array(path, mode="r")
    reader = TileReader.wrap(a)
    assert isinstance(reader, TileReader)
    for i in range(4):
        assert np.array_equal(reader[i, 0:40, 0:40], a[i])


def test_other_layouts_fall_back_to_zarr(tmp_path):
    a = zarr.create_array(
        tmp_path / "plain", shape=(2, 8, 8, 3), dtype="uint8", chunks=(1, 8, 8, 3)
    )
    assert TileReader.wrap(a) is a


def test_damaged_tile_names_the_shard(tmp_path):
    path = make_store(tmp_path, "train", 4, (32, 32))
    shard = next(p for p in (path / "pairs" / "h32w32" / "gt" / "c").rglob("*") if p.is_file())
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first tile's bytes
    shard.write_bytes(bytes(data))
    reader = Store(path).array("pairs", "gt").wrap(TileReader.wrap)
    with pytest.raises(DamagedShard, match=str(shard)):
        for i in range(4):
            reader[i, 0:32, 0:32]


def test_loader_batches_unchanged_by_fast_reads(tmp_path):
    path = make_store(tmp_path, "train", 12, (48, 48))
    split = Split.open(path, None, None)
    batches = CropBatches(split, 16, 6, seed=3, steps=4)
    batch, draw = batches[2], batches.draw(2)
    store = Store(path)
    lq, base = store.array("pairs", "lq"), store.array(split.target, "base")
    g = store.array(split.encoders[0], "g")
    for k, (i, y, x, fh, fv) in enumerate(draw):

        def flipped(a):  # the crop at (y, x), flipped as the batch's sample k
            a = a[i, y : y + 16, x : x + 16]
            a = a[:, ::-1] if fh else a
            return a[::-1] if fv else a

        assert np.allclose(batch["lq"][k].permute(1, 2, 0).numpy() * 255, flipped(lq))
        assert np.array_equal(
            batch["base"][k].permute(1, 2, 0).numpy(), flipped(base).astype(np.float32)
        )
        assert np.array_equal(batch["g"][k].numpy(), g[i, fh + 2 * fv])
    assert len(draw) == 6


def test_spawned_loader_workers_open_their_own_readers(tmp_path):
    """A split whose arrays are open pickles without them (spawn and forkserver start methods)."""
    import pickle

    import torch

    path = make_store(tmp_path, "train", 12, (48, 48))
    split = Split.open(path, None, None)
    split.arrays()
    assert pickle.loads(pickle.dumps(split))._arrays is None
    batches = CropBatches(split, 16, 4, seed=0, steps=2)
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, num_workers=1, multiprocessing_context="spawn"
    )
    for step, batch in enumerate(loader):
        assert torch.equal(batch["lq"], batches[step]["lq"]) and torch.equal(
            batch["g"], batches[step]["g"]
        )
    with pytest.raises(
        ValueError
    ):  # g handed out by the split is a read-only view of the shared copy
        split.g(0)[0] = 1


@pytest.mark.parametrize("budget", [64 << 20, 2000])  # every tile kept, or evicted all along
def test_decoded_tiles_are_reused_but_a_replaced_shard_is_read_again(tmp_path, monkeypatch, budget):
    """Readers keep decoded tiles (a small store's epochs after the first decode nothing), but
    a shard file written anew since (a repair, another writer) is read and checked again: the
    cache is keyed by the file's identity, never serving the old pixels."""
    import stores.tiles

    monkeypatch.setattr(stores.tiles, "TILE_CACHE_BYTES", budget)
    path = make_store(tmp_path, "train", 4, (32, 32))
    store = Store(path)
    reader = store.array("pairs", "gt").wrap(TileReader.wrap)
    direct = zarr.open_array(path / "pairs" / store.layout.buckets[0].name / "gt", mode="r+")
    before = [reader[i, 0:32, 0:32] for i in range(4)]
    assert all(np.array_equal(b, direct[i]) for i, b in enumerate(before))
    assert all(np.array_equal(reader[i, 3:29, 5:30], direct[i, 3:29, 5:30]) for i in range(4))
    cache = stores.tiles.TILES
    assert cache.bytes <= budget or len(cache.tiles) == 1
    direct[1] = 255 - direct[1]  # the shard holding sample 1, rewritten with other pixels
    assert np.array_equal(reader[1, 0:32, 0:32], 255 - before[1])
    assert np.array_equal(reader[0, 0:32, 0:32], direct[0])
