"""Fast crops of complete image arrays: the training loader's read path.

zarr-python spends about 0.2 ms of Python and event-loop hand-offs on every inner chunk it reads,
so a 96 px crop of three 64 px-tiled arrays cost 4 ms and the loader could barely feed a CPU
training step. A member's shards never change once it is complete, so this reader reads each
shard's index once (again if `stores repair` replaced the file) and then gets each tile with one
`pread`, a crc32c check and a zstd decode, exactly as the Zarr v3 sharding spec lays them out.

It handles exactly the layout `Store.begin_member` writes (sharding_indexed, index at the end;
inner codecs bytes, zstd, crc32c) on a local filesystem; anything else is read through zarr.
Reads are byte-identical to zarr's (tests/test_tiles.py). Nothing is ever written.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import google_crc32c
import numpy as np
from numcodecs.zstd import Zstd

from .store import StoreError

EMPTY = np.uint64(2**64 - 1)  # index entry of a chunk that was never written (fill value)
INDEX_CACHE_BYTES = 32 << 20  # shard indexes kept per reader (least recently used dropped first)
TILE_CACHE_BYTES = 192 << 20  # decoded tiles kept per process, all readers together: a small
# store's train arrays whole (the demo's lq, gt and base take 115 MB), so its epochs after the
# first decode nothing; on a large store, whose random crops rarely meet again, it only bounds


class TileCache:
    """Decoded tiles of every TileReader in this process, least recently used dropped first once
    they pass TILE_CACHE_BYTES. Keys hold the array's folder and its shard file's identity, so a
    shard replaced since (a repair) is read and checked again. A forked loader worker starts with
    a copy of its parent's."""

    def __init__(self):
        self.tiles: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple, make) -> np.ndarray:
        tile = self.tiles.get(key)
        if tile is not None:
            self.tiles.move_to_end(key)
            return tile
        tile = self.tiles[key] = make()
        self.bytes += tile.nbytes
        while self.bytes > TILE_CACHE_BYTES and len(self.tiles) > 1:
            _, old = self.tiles.popitem(last=False)
            self.bytes -= old.nbytes
        return tile


TILES = TileCache()


class DamagedShard(StoreError):
    """A shard's index or tile failed its checksum: run `python -m stores verify` / `repair`."""


def _crc_ok(raw: bytes) -> bool:
    """Whether bytes end with the little-endian crc32c of what precedes them (zarr's crc32c codec)."""
    return np.uint32(google_crc32c.value(raw[:-4])).tobytes() == raw[-4:]


def _codec_layout(meta: dict) -> dict | None:
    """The sharding settings of an array's zarr.json when they are the ones we write, else None."""
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    conf = codecs[0]["configuration"]
    inner = [c["name"] for c in conf["codecs"]]
    index = [c["name"] for c in conf["index_codecs"]]
    endian = [
        c.get("configuration", {}).get("endian", "little")
        for c in conf["codecs"] + conf["index_codecs"]
        if c["name"] == "bytes"
    ]
    sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
    if (
        inner != ["bytes", "zstd", "crc32c"]
        or index != ["bytes", "crc32c"]
        or set(endian) != {"little"}
        or conf.get("index_location", "end") != "end"
        or sep != "/"
        or meta.get("chunk_key_encoding", {}).get("name") != "default"
    ):
        return None
    return {
        "inner": tuple(conf["chunk_shape"]),
        "shard": tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]),
    }


class TileReader:
    """`reader[i, y0:y1, x0:x1]` of an (N, H, W, C) sharded array, like `zarr_array[...]`;
    every other selection is passed to the zarr array."""

    def __init__(self, array, root: Path, layout: dict):
        self.array, self.root = array, Path(root)
        self.shape, self.dtype = tuple(array.shape), np.dtype(array.dtype).newbyteorder("<")
        self.fill = np.asarray(array.fill_value, self.dtype)
        self.inner, self.shard = layout["inner"], layout["shard"]
        self.per_shard = tuple(s // c for s, c in zip(self.shard, self.inner))
        self.n_inner = int(np.prod(self.per_shard))
        self._index: OrderedDict[tuple, tuple] = OrderedDict()  # shard -> (file identity, index)
        self._index_bytes = 0
        self._zstd = Zstd()

    @classmethod
    def wrap(cls, array):
        """A TileReader over a zarr array when its layout and store allow it, else the array."""
        root = getattr(array.store, "root", None)
        if root is None or len(array.shape) != 4 or type(array.store).__name__ != "LocalStore":
            return array
        path = Path(root) / array.path
        layout = _codec_layout(array.metadata.to_dict())
        if (
            layout is None
            or layout["inner"][0] != 1
            or layout["inner"][3] != array.shape[3]
            or layout["shard"][3] != array.shape[3]
            or not (path / "zarr.json").is_file()
        ):
            return array
        return cls(array, path, layout)

    def __getattr__(self, name):  # shape-like attributes the callers use come from zarr
        if name.startswith("__") or name == "array":  # pickling and copying look these up first
            raise AttributeError(name)
        return getattr(self.array, name)

    def __getitem__(self, key):
        if not (
            isinstance(key, tuple)
            and len(key) == 3
            and isinstance(key[0], (int, np.integer))
            and all(isinstance(k, slice) and k.step in (None, 1) for k in key[1:])
        ):
            return self.array[key]
        i = int(key[0]) + (self.shape[0] if key[0] < 0 else 0)
        (y0, y1, _), (x0, x1, _) = (k.indices(n) for k, n in zip(key[1:], self.shape[1:3]))
        if not 0 <= i < self.shape[0]:
            raise IndexError(
                f"index {int(key[0])} is out of bounds for {self.shape[0]} samples ({self.root})"
            )
        return self.crop(i, y0, max(y0, y1), x0, max(x0, x1))

    def crop(self, i: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        ch, cw = self.inner[1:3]
        out = np.empty((y1 - y0, x1 - x0, self.shape[3]), self.dtype)
        tiles = [
            (ty, tx) for ty in range(y0 // ch, -(-y1 // ch)) for tx in range(x0 // cw, -(-x1 // cw))
        ]
        by_shard: dict[tuple, list] = {}
        for ty, tx in tiles:
            by_shard.setdefault(
                (i // self.shard[0], ty // self.per_shard[1], tx // self.per_shard[2]), []
            ).append((ty, tx))
        for (si, sy, sx), group in by_shard.items():
            path = self.root / "c" / str(si) / str(sy) / str(sx) / "0"
            try:
                fd = os.open(path, os.O_RDONLY)
            except (
                FileNotFoundError
            ):  # never written (all fill), as the store checked; or lost since
                fd = None
            try:
                index = self._shard_index(fd, path, (si, sy, sx))
                ident = self._index[(si, sy, sx)][0]  # the file the index was read from
                for ty, tx in group:
                    tile = self._cached_tile(
                        fd,
                        path,
                        index,
                        ((si, sy, sx), ident),
                        (i % self.shard[0], ty % self.per_shard[1], tx % self.per_shard[2]),
                    )
                    ay, ax = ty * ch, tx * cw  # tile origin in the image
                    sy0, sy1 = max(y0, ay), min(y1, ay + ch)
                    sx0, sx1 = max(x0, ax), min(x1, ax + cw)
                    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                        sy0 - ay : sy1 - ay, sx0 - ax : sx1 - ax
                    ]
            finally:
                if fd is not None:
                    os.close(fd)
        return out

    def _shard_index(self, fd, path: Path, where: tuple) -> np.ndarray | None:
        """(offset, nbytes) per inner chunk of the shard open as `fd` (None: no file), read once
        per shard while it stays in the bounded cache and the file is the same one: a shard
        replaced since (by `stores repair`, or a rewrite with other bytes) has its index read again."""
        ident = None
        if fd is not None:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._index.get(where)
        if cached is not None and cached[0] == ident:
            self._index.move_to_end(where)
            return cached[1]
        if fd is None:
            if cached is not None and cached[0] is not None:
                raise DamagedShard(
                    f"{path}: shard file removed while being read; run `python -m stores verify`"
                )
            self._remember(where, None, None)
            return None
        size = self.n_inner * 16 + 4
        try:
            raw = os.pread(fd, size, max(0, ident[2] - size))
        except OSError as e:
            raise DamagedShard(f"{path}: cannot read its shard index ({e})") from e
        if len(raw) != size or not _crc_ok(raw):
            raise DamagedShard(
                f"{path}: shard index checksum mismatch; run `python -m stores verify`"
            )
        self._remember(where, ident, np.frombuffer(raw[:-4], "<u8").reshape(self.per_shard + (2,)))
        return self._index[where][1]

    def _remember(self, where: tuple, ident, index) -> None:
        old = self._index.pop(where, None)
        self._index_bytes -= 0 if old is None or old[1] is None else old[1].nbytes
        self._index[where] = (ident, index)
        self._index_bytes += 0 if index is None else index.nbytes
        while self._index_bytes > INDEX_CACHE_BYTES and len(self._index) > 1:
            _, (_, old) = self._index.popitem(last=False)
            self._index_bytes -= 0 if old is None else old.nbytes

    def _cached_tile(self, fd, path: Path, index, shard: tuple, at: tuple) -> np.ndarray:
        """`_tile`, decoded once while it stays in the process's TileCache."""
        return TILES.get((self.root, shard, at), lambda: self._tile(fd, path, index, *at))

    def _tile(self, fd, path: Path, index, n: int, ty: int, tx: int) -> np.ndarray:
        shape = self.inner[1:]
        entry = index[n, ty, tx, 0] if index is not None else None
        if entry is None or entry[0] == EMPTY:
            return np.broadcast_to(self.fill, shape)
        offset, nbytes = int(entry[0]), int(entry[1])
        raw = os.pread(fd, nbytes, offset)
        if len(raw) != nbytes or not _crc_ok(raw):
            raise DamagedShard(
                f"{path}: tile ({n}, {ty}, {tx}) checksum mismatch; run `python -m stores verify`"
            )
        return np.frombuffer(self._zstd.decode(raw[:-4]), self.dtype).reshape(shape)
