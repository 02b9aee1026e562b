"""Stage 2 data streamed from a store's WebDataset export (`python -m stores export-wds STORE`), read by
`python -m training train --format wds`.

Streaming: nothing is read up front but `index.json`; tar shards are read sequentially with the
`webdataset` library (from a local path, a shared filesystem or `s3://`, through fsspec), samples go
through a bounded shuffle buffer, and only the samples of a batch are decoded. Memory is the shuffle
buffers (at most --wds-buffer samples per stream and --wds-buffer-mb of encoded samples in all) plus
one batch, whatever the size of the export or of its samples.

Determinism. Each rank reads `streams` (--wds-streams, default 4) independent streams. In epoch e of
stream k on rank r, the shards are a permutation of all shards drawn from (seed, e), of which the
stream takes every (world x streams)-th starting at r x streams + k: ranks and streams read disjoint
shards. Its samples pass a shuffle buffer of `buffer` samples seeded by (seed, e, r, k). The batch of
step s on rank r is the next `batch / world` samples of stream s mod streams (its (s // streams)-th
batch), with crop offsets and flips drawn from (seed, s, r). So batches depend on the seed, the step,
the rank and these two settings only, not on the number of loader workers: worker w of W (W must
divide `streams`) produces the steps start + w, start + w + W, ... from the streams it owns, in the
order the DataLoader hands them out. A resumed run skips, without decoding, the samples its streams
used before the resume step, and gets the batches of an uninterrupted run.

Tiles. Export versions 2 and later cut each sample into tiles (stores/wds.py, `--tile`, default 512 px): the
stream, the shuffle buffer and the decoding work on tiles, so a loader's memory and its time per crop
follow the tile, not the largest photo. A crop lies inside one tile (drawn from (seed, step, rank)
within it); the batch's `index` is the sample's. `WdsSplit.image` puts a sample's tiles back together.

Samples excluded at extraction have no entries in the export and never reach a batch; samples and
tiles smaller than the crop are skipped (known from the index, without reading them). lq/gt tiles are in the
export's codec (index.json `codec`: `zstd`, a zstd-compressed uint8 .npy, by default since version 4; `png` with
`export-wds --codec png` and in version 3). Decoding uses numcodecs' zstd and `numpy.load(allow_pickle=False)`
for arrays, PIL for PNG: nothing in an export can run code. Checksums: each
tile's entries are checked against the sha256 its meta.json records (export version 3) as the tile
is read, before it enters the shuffle buffer, so a damaged byte never reaches a batch, even in a run
that stops inside the shard; the whole shard's sha256 (covering meta.json and the tiles not used) is
checked at its end. A mismatch or a damaged tar raises WdsError naming the shard and the entry.
Imports no pipeline code and no frozen network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from webdataset.filters import shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from stores import match_member
from stores.remote import open_location
from stores.wds import (
    CODECS,
    FORMAT,
    INDEX,
    READS,
    VERSION,
    ZSTD,
    image_entries,
    index_digest,
    tile_grid,
)

from .data import IMAGES, check_crop_batch, crop_batch, draw_crop, members_info

READ_BLOCK = 4 << 20
REEXPORT = "`python -m stores export-wds STORE` (or `make features FORMAT=wds`), which rewrites every shard"


class WdsError(RuntimeError):
    """An export is missing, unfinished, damaged or does not hold what was asked for."""


def find_export(path):
    """(Location, url) of the export: `path` itself if it holds index.json, else `<path>-wds` beside
    a store. `path` may be a local folder or a URL (s3://bucket/prefix/<store>-wds)."""
    path = str(path).rstrip("/")
    for url in (path, f"{path}-wds"):
        loc = open_location(url)
        if loc.fs.exists(loc.path(INDEX)):
            return loc
    raise WdsError(
        f"{path}: no WebDataset export (no {INDEX} in it or in {path.rsplit('/', 1)[-1]}-wds beside "
        f"it); run `python -m stores export-wds STORE`"
    )


def read_index(loc) -> dict:
    """The export's index.json, checked: JSON, its own sha256, this format and version."""
    where = f"{loc.url}/{INDEX}"
    try:
        with loc.fs.open(loc.path(INDEX), "rb") as f:
            index = json.loads(f.read())
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise WdsError(
            f"{where}: damaged or unreadable ({type(e).__name__}: {e}); export it again: {REEXPORT}"
        ) from None
    if index.get("version") in READS and index.get("sha256") != index_digest(index):
        raise WdsError(
            f"{where}: its sha256 does not match its content: damaged; export it again: {REEXPORT}"
        )
    if index.get("format") != FORMAT or not index.get("complete"):
        raise WdsError(f"{loc.url}/{INDEX}: not a complete {FORMAT} export; run export-wds again")
    if index.get("version") not in READS:
        raise WdsError(
            f"{loc.url}: a WebDataset export of format version {index.get('version')}; this version "
            f"reads versions {' and '.join(map(str, READS))} (samples cut into tiles, each entry's sha256 "
            f"in its meta.json). Export it again: {REEXPORT}"
        )
    if codec_of(index) not in CODECS:
        raise WdsError(
            f"{where}: lq/gt tiles in codec {codec_of(index)!r}; this version reads "
            f"{', '.join(sorted(CODECS))}. Export it again: {REEXPORT}"
        )
    return index


def codec_of(index: dict) -> str:
    """The codec of an export's lq/gt tiles: recorded since version 4; PNG before."""
    return index.get("codec") if index["version"] >= 4 else "png"


def decode_png(data: bytes, where: str) -> np.ndarray:
    """(H, W, 3) uint8 from an 8-bit RGB PNG (PIL: no code runs)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode != "RGB" or im.format != "PNG":
                raise WdsError(f"{where}: expected an 8-bit RGB PNG, got {im.format} {im.mode}")
            return np.asarray(im)
    except WdsError:
        raise
    except Exception as e:
        raise WdsError(f"{where}: not a readable PNG: {e}") from None


def decode_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise WdsError(f"{where}: not a plain .npy array: {e}") from None


def decode_image(data: bytes, codec: str, where: str) -> np.ndarray:
    """(H, W, 3) uint8 from an lq/gt entry in `codec` (stores.wds.CODECS)."""
    if codec == "png":
        return decode_png(data, where)
    try:
        raw = ZSTD.decode(data)
    except RuntimeError as e:
        raise WdsError(f"{where}: not a zstd-compressed .npy ({e})") from None
    img = npy_view(raw, where)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise WdsError(f"{where}: expected an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    return img


def npy_view(raw: bytes, where: str) -> np.ndarray:
    """The array of .npy bytes as a read-only view of them (numpy.load would copy it once more)."""
    fmt = np.lib.format
    f = io.BytesIO(raw)
    try:
        read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}[
            fmt.read_magic(f)
        ]
        shape, fortran, dtype = read_header(f)
        if fortran or dtype.hasobject:
            raise ValueError(f"{'Fortran order' if fortran else 'object dtype'}")
        return np.frombuffer(raw, dtype, int(np.prod(shape)), f.tell()).reshape(shape)
    except (ValueError, KeyError) as e:
        raise WdsError(f"{where}: not a plain .npy array: {e}") from None


class HashingReader:
    """A file object that hashes what is read through it (the shard's sha256, checked at its end)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> str:
        while self.read(READ_BLOCK):
            pass
        return self.sha.hexdigest()


@dataclass
class WdsSplit:
    """An export's index and the chosen members (a `training.data.SplitLike`); samples are streamed
    by `WdsBatches`."""

    loc: object  # stores.remote.Location of the export folder
    target: str
    encoders: list
    index: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path, target: str | None = None, encoders: list | None = None) -> "WdsSplit":
        loc = find_export(path)
        index = read_index(loc)
        where = f"{index['store']}-wds (exported members)"
        tgt = match_member([index["target"]], "targets", target, where)
        encs = [match_member(index["encoders"], "osf", e, where) for e in (encoders or [None])]
        return cls(loc, tgt, encs, index)

    def __post_init__(self):
        self.shards = self.index["shards"]
        self._hw = np.array([hw for s in self.shards for hw in s["hw"]], np.int32).reshape(-1, 2)
        self._names = [x for s in self.shards for x in s["names"]]
        self.tiling, self.codec = self.index["tiling"], codec_of(self.index)
        self.entries = [
            *image_entries(self.codec),
            "base.npy",
            "meta.json",
            *(f"osf.{e.split('/', 1)[1]}.npy".lower() for e in self.encoders),
        ]

    @property
    def path(self):  # for messages (a folder or URL)
        from pathlib import PurePosixPath

        return PurePosixPath(self.loc.url)

    @property
    def hw(self) -> np.ndarray:
        return self._hw

    @property
    def names(self) -> list[str]:
        return self._names

    @property
    def metric_space(self) -> str:
        return self.index["source"].get("metric_space") or "rgb"

    def info(self) -> dict:
        """What training.data.Split.info gives for the source store, plus `format: wds`."""
        return {
            **members_info(self.index["members"], self.index["store"], self.target, self.encoders),
            "format": "wds",
        }

    def tiles(self, i: int) -> list[tuple[int, int, int, int]]:
        """(y, x, h, w) of sample i's tiles, in the order of their keys (none when excluded)."""
        h, w = (int(v) for v in self._hw[i])
        return tile_grid(h, w, **self.tiling) if h else []

    def filesystem(self):
        """The export's filesystem in this process: made anew in a forked loader worker, since an
        fsspec async filesystem (s3fs) works only in the process that made it."""
        fs = self.loc.fs
        if getattr(fs, "_pid", os.getpid()) != os.getpid():
            # the parent's instance is kept: freed here, it would close the parent's connections
            self.inherited = fs
            fs = type(fs)(*fs.storage_args, **fs.storage_options)
            self.loc = replace(self.loc, fs=fs)
        return fs

    def samples(self, shard: dict, usable: set):
        """The raw (undecoded) tiles of one shard whose (sample index, tile) is in `usable`,
        streamed; the shard's sha256 and each tile's entries are checked."""
        name = f"{self.loc.url}/{shard['name']}"
        try:
            fs = self.filesystem()
            with fs.open(self.loc.path(shard["name"]), "rb", block_size=READ_BLOCK) as f:
                reader = HashingReader(f)
                files = tar_file_expander([{"url": name, "stream": reader}], eof_value=None)
                for sample in group_by_keys(files):
                    i, _, t = sample["__key__"].partition("_")
                    i, t = int(i), int(t)
                    if not shard["first"] <= i < shard["first"] + shard["samples"]:
                        raise WdsError(
                            f"{name}: holds sample {i}, but {INDEX} lists samples {shard['first']}-"
                            f"{shard['first'] + shard['samples'] - 1} in it: the file was swapped or "
                            f"replaced; export again: {REEXPORT}"
                        )
                    missing = [e for e in self.entries if e not in sample]
                    if missing:
                        raise WdsError(
                            f"{name}: sample {sample['__key__']} lacks {', '.join(missing)}; "
                            f"expected {', '.join(self.entries)}"
                        )
                    if (i, t) in usable:
                        self.verify(sample, f"{name}: sample {sample['__key__']}", i, t)
                        yield {"index": i, "tile": t, **{e: sample[e] for e in self.entries}}
                if reader.drain() != shard["sha256"]:
                    raise WdsError(
                        f"{name}: sha256 differs from {INDEX}; the shard is damaged or was replaced"
                    )
        except WdsError:
            raise
        except Exception as e:  # a damaged tar, a lost connection
            raise WdsError(
                f"{name}: cannot read the shard ({type(e).__name__}: {e}); expected a tar written "
                f"by export-wds"
            ) from None

    def verify(self, sample: dict, where: str, i: int, t: int) -> None:
        """Check the entries this split uses against the sha256 the tile's meta.json records, and
        that meta.json is this key's (sample i, tile t: a renamed key is caught), before anything
        reads them (the shard's own sha256 is known only at its end)."""
        try:
            meta = json.loads(sample["meta.json"])
            sha = meta["sha256"]
        except (ValueError, KeyError, TypeError):
            meta, sha = {}, None
        tiles = self.tiles(i)
        if isinstance(sha, dict) and (
            meta.get("index") != i or t >= len(tiles) or meta.get("tile") != list(tiles[t])
        ):
            raise WdsError(
                f"{where} meta.json: describes sample {meta.get('index')} tile {meta.get('tile')}, not this "
                f"key's (sample {i}, tile {t}): the shard is damaged; export again: {REEXPORT}"
            )
        if not isinstance(sha, dict):
            raise WdsError(
                f"{where} meta.json: not JSON with each entry's sha256; the shard is damaged or not from "
                f"export-wds version {VERSION}. Export again: {REEXPORT}"
            ) from None
        for e in self.entries:
            if e != "meta.json" and hashlib.sha256(sample[e]).hexdigest() != sha.get(e):
                raise WdsError(
                    f"{where} {e}: sha256 differs from the one its meta.json records; the shard is "
                    f"damaged (copy it again, or export again: {REEXPORT})"
                )

    def decode(self, raw: dict) -> dict:
        where = f"{self.loc.url} sample {raw['index']:08d} tile {raw['tile']}"
        lq, gt = self.entries[:2]
        return {
            "lq": decode_image(raw[lq], self.codec, f"{where} {lq}"),
            "gt": decode_image(raw[gt], self.codec, f"{where} {gt}"),
            "base": decode_npy(raw["base.npy"], f"{where} base.npy"),
            "g": [decode_npy(raw[e], f"{where} {e}") for e in self.entries[4:]],
        }

    def image(self, i: int) -> dict:
        """Whole sample i: lq, gt uint8 (h,w,3); base float32 (h,w,3); g (D,) unflipped. Reads the
        whole shard that holds it (checking its sha256): for checks and evaluation, not for training."""
        shard = next((s for s in self.shards if s["first"] <= i < s["first"] + s["samples"]), None)
        tiles = self.tiles(i) if shard is not None else []
        found = (
            list(self.samples(shard, {(i, t) for t in range(len(tiles))})) if tiles else []
        )  # sha256 checked
        if not found:
            raise WdsError(
                f"{self.loc.url}: no sample {i} in the export (excluded at extraction, or out of range)"
            )
        h, w = (int(v) for v in self._hw[i])
        out = {
            "lq": np.zeros((h, w, 3), np.uint8),
            "gt": np.zeros((h, w, 3), np.uint8),
            "base": np.zeros((h, w, 3), np.float32),
        }
        for raw in found:
            d, (y, x, th, tw) = self.decode(raw), tiles[raw["tile"]]
            for k in out:
                out[k][y : y + th, x : x + tw] = d[k]
        return {**out, "g": np.concatenate([g[0] for g in d["g"]])}


def buffer_samples(split: "WdsSplit", streams: int, buffer: int, buffer_mb: float) -> int:
    """Shuffle-buffer length per stream: `buffer` tiles, fewer when the streams' buffers would
    hold more than `buffer_mb` of raw (encoded) tiles at the export's mean tile size, and at
    least 1. A function of the export and the settings alone, so batches stay deterministic."""
    sizes = [
        (s.get("bytes", 0), s["tiles"]) for s in split.shards
    ]  # read_index admits tiled exports only
    mean = sum(b for b, _ in sizes) / max(1, sum(n for _, n in sizes))
    if mean <= 0:
        return buffer
    return max(1, min(buffer, int(buffer_mb * 2**20 / (streams * mean))))


class WdsBatches(torch.utils.data.IterableDataset):
    """The batches of steps [start, stop) of one rank, streamed (see the module doc)."""

    def __init__(
        self,
        split: WdsSplit,
        crop: int,
        batch: int,
        seed: int,
        start: int,
        stop: int,
        rank: int = 0,
        world: int = 1,
        streams: int = 4,
        buffer: int = 256,
        buffer_mb: float = 128.0,
    ):
        check_crop_batch(crop, batch, world)
        if len(split.shards) < world * streams:
            raise WdsError(
                f"{split.loc.url}: {len(split.shards)} shards for {world} processes x {streams} streams; "
                f"export with --min-shards {world * streams} or more (or lower --wds-streams)"
            )
        hw, tile = split.hw, split.tiling["tile"]
        self.usable = {
            (i, t)
            for i in range(len(hw))
            for t, (_, _, h, w) in enumerate(split.tiles(i))
            if min(h, w) >= crop
        }
        small = [i for i, (h, w) in enumerate(hw) if h > 0 and min(h, w) < crop]
        if small:
            warnings.warn(
                f"{split.loc.url}: {len(small)} samples are smaller than the {crop}px crop and are not "
                f"trained on (e.g. sample {small[0]}, {tuple(int(v) for v in hw[small[0]])})",
                stacklevel=2,
            )
        cut = len(
            {i for i, (h, w) in enumerate(hw) if min(h, w) >= crop} - {i for i, _ in self.usable}
        )
        if cut:
            warnings.warn(
                f"{split.loc.url}: the export's tiles (at most {tile} px) are smaller than the {crop}px "
                f"crop in {cut} samples, which are not trained on; export again with --tile {2 * crop} "
                f"or more",
                stacklevel=2,
            )
        if not self.usable:
            raise ValueError(
                f"{split.loc.url}: no sample (or tile of at most {tile} px) is at least {crop}px on both "
                f"sides; lower --crop, or export again with a larger --tile"
            )
        self.split, self.crop, self.per_rank, self.seed = split, crop, batch // world, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self.streams, self.buffer = streams, buffer_samples(split, streams, buffer, buffer_mb)
        self.peak_held = (
            0  # most raw samples read but not yet used, over this process's streams (tests)
        )

    def __len__(self) -> int:
        return self.stop - self.start

    def shards_of(self, stream: int, epoch: int) -> list[dict]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.split.shards))
        return [
            self.split.shards[k]
            for k in perm[self.rank * self.streams + stream :: self.world * self.streams]
        ]

    def _stream(self, k: int, held: list):
        """Raw samples of stream k, epoch after epoch, through its shuffle buffer."""
        for epoch in range(1 << 62):

            def read():
                for shard in self.shards_of(k, epoch):
                    for raw in self.split.samples(shard, self.usable):
                        held[0] += 1
                        self.peak_held = max(self.peak_held, sum(v[0] for v in self._held.values()))
                        yield raw

            rng = random.Random(
                int(np.random.default_rng([self.seed, epoch, self.rank, k]).integers(1 << 62))
            )
            n = 0
            for raw in shuffle(bufsize=self.buffer, initial=self.buffer, rng=rng)(read()):
                held[0] -= 1
                n += 1
                yield raw
            if not n:
                raise WdsError(
                    f"{self.split.loc.url}: stream {k} of rank {self.rank} got no usable sample in "
                    f"epoch {epoch}; export with fewer samples per shard"
                )

    def batch_of(self, step: int, raws: list) -> dict:
        """Crops and flips of one step's samples, drawn from (seed, step, rank)."""
        rng, c, crops = np.random.default_rng([self.seed, step, self.rank]), self.crop, []
        for raw in raws:
            d = self.split.decode(raw)
            y, x, variant = draw_crop(rng, *d["gt"].shape[:2], c)  # within the tile
            crops.append(
                (
                    {k: d[k][y : y + c, x : x + c] for k in IMAGES},
                    variant,
                    np.concatenate([g[variant] for g in d["g"]]),
                )
            )  # g of the flipped image
        return {**crop_batch(crops), "index": torch.tensor([r["index"] for r in raws])}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.streams % workers:
            raise ValueError(f"{workers} loader workers must divide --wds-streams {self.streams}")
        self._held: dict = {}
        iters, used = {}, {}
        for step in range(self.start + worker, self.stop, workers):
            k, j = step % self.streams, step // self.streams  # stream k's j-th batch
            if k not in iters:
                self._held[k] = [0]
                iters[k], used[k] = self._stream(k, self._held[k]), 0
            for _ in range(
                (j - used[k]) * self.per_rank
            ):  # resuming: skip, without decoding, what was used
                next(iters[k])
            yield self.batch_of(step, [next(iters[k]) for _ in range(self.per_rank)])
            used[k] = j + 1
