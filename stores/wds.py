"""Export a store to WebDataset tar shards for streaming: `python -m stores export-wds STORE`.

Writes `<out>/<store name>-wds/` (default out: the store's folder's parent):
    shard-000000.tar ...   per tile of a sample, `<index:08d>_<tile:04d>.` + lq, gt (uint8 RGB, in
                           the export's codec: lq.npy.zst, gt.npy.zst by default, lq.png, gt.png
                           with `--codec png`), base.npy (float16), osf.<encoder member id>.npy ((4, D)
                           float32, the 4 flips of the whole image's g), meta.json (name, index,
                           hw, tile [y, x, h, w], store, pairs key, members and keys, the
                           degradation's `meta` parsed, `sha256`: each other entry's digest,
                           checked by the reader before it decodes the entry)
    shard-000000.json ...  each tar's record and the member keys and tiling it was written with
    index.json             codec, tiling, shards (samples, tiles, first index, names, hw, bytes,
                           sha256), the source's keys and member records, `complete: true`;
                           written last
Codecs of the lq/gt tiles (`codec` in index.json; `--codec`). `zstd` (default): the tile as a
uint8 .npy compressed with zstd (level 1: it decodes 1.26x faster than level 3 for 4 % more bytes), any
zstd tool and numpy read it;
on natural photos it takes about 1.1x the bytes of the PNG (less on noisy tiles) and decodes ~10x
faster (see docs/benchmarks.md), so one loader process keeps up with a training step. `png`: 8-bit
RGB PNGs any image tool opens. Version 3 exports (before the codec was recorded) hold PNGs.
Tiles. A sample is cut into a grid of tiles of at most `tile` px a side (`tile_grid`: balanced, so
a 1280x720 frame gives 3 x 2 tiles of 427x360, a 12 MP photo 48 of 500x500), overlapping by
`overlap` px; the tiles of a sample are contiguous in its shard. A reader then decodes a tile, not
a 12 MP image, per training crop: a loader's memory and time per crop no longer follow the largest
image. A crop never straddles two tiles unless they overlap by the crop size (`--tile-overlap`);
`tile` 0 writes whole samples.
One writer (WdsWriter) makes the tars from a stream of samples: `export-wds` feeds it a complete
store's samples read back (`stored_rows`); `make features FORMAT=wds` (`--wds`) feeds it the
extraction stream as it goes (pipeline/stages.py), one tar per store shard, and then lets
export_wds add the tars of shards computed earlier and the index. Tars are written with
webdataset's TarWriter, each to a temporary name and renamed; index.json is removed first and
written last, so readers never take a half-made export for a finished one. By default shards hold
contiguous, balanced sample ranges; there are at least `min_shards` of them (so nodes x workers
can each get whole shards) and none above `samples_per_shard` samples or about `shard_mb` MB. Tar
entries carry fixed owners and times: the same samples give the same bytes. Streamed back by
`training/wds_data.py`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from numcodecs.zstd import Zstd

from .files import open_regular
from .keys import sha256_file
from .store import Store, StoreError, atomic_path, utc_now, write_json_atomic

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "ptgrm-wds"
VERSION = (
    4  # 4: the lq/gt codec recorded (zstd by default); 3: PNG tiles, per-entry sha256 in meta.json
)
READS = (3, 4)  # versions the reader takes (2: no per-entry sha256, 1: whole samples: export again)
TILE = 512  # default tile side, px
CODECS = {"zstd": "npy.zst", "png": "png"}  # lq/gt codec -> entry extension (see the module doc)
CODEC = "zstd"
ZSTD = Zstd(level=1)  # exports written at level 3 (before 2026-12) read the same


def image_entries(codec: str) -> tuple[str, str]:
    """The lq and gt entry names of a tile in an export of this codec."""
    return f"lq.{CODECS[codec]}", f"gt.{CODECS[codec]}"


def axis_tiles(length: int, tile: int, overlap: int = 0) -> list[tuple[int, int]]:
    """(start, size) of the tiles along one axis: as few as cover `length` with tiles of at most
    `tile` px overlapping by at least `overlap`, all of one size, evenly spread."""
    if tile <= 0 or length <= tile:
        return [(0, length)]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, {tile}), got {overlap}")
    n = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (n - 1) * overlap) / n)
    return [(int(a), size) for a in np.linspace(0, length - size, n).round()]


def tile_grid(h: int, w: int, tile: int, overlap: int = 0) -> list[tuple[int, int, int, int]]:
    """(y, x, h, w) of each tile of an h x w sample, row by row (see the module doc)."""
    return [
        (y, x, th, tw)
        for y, th in axis_tiles(h, tile, overlap)
        for x, tw in axis_tiles(w, tile, overlap)
    ]


def png_bytes(img: np.ndarray) -> bytes:
    """A standard 8-bit RGB PNG of a (H, W, 3) uint8 image (every row 'Up'-filtered)."""
    h, w, c = img.shape
    if img.dtype != np.uint8 or c != 3:
        raise ValueError(f"png_bytes needs (H, W, 3) uint8, got {img.shape} {img.dtype}")
    up = np.diff(img.astype(np.int16), axis=0, prepend=0).astype(np.uint8)  # wraps mod 256
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up.reshape(h, w * c)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()


def image_bytes(img: np.ndarray, codec: str) -> bytes:
    """A (H, W, 3) uint8 tile in `codec` (CODECS): a zstd-compressed .npy, or a PNG."""
    if codec == "png":
        return png_bytes(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image_bytes needs (H, W, 3) uint8, got {img.shape} {img.dtype}")
    return ZSTD.encode(npy_bytes(img))


def shard_ranges(
    hw: np.ndarray, d: int, samples_per_shard: int, shard_mb: float, min_shards: int
) -> list:
    """Contiguous, balanced [start, stop) ranges: at least `min_shards` (at most one per sample)."""
    n = len(hw)
    per_sample = hw[:, 0].astype(np.int64) * hw[:, 1] * 3 * 4 + 16 * d + 1024  # lq+gt+base(f16), g
    count = max(
        min_shards,
        math.ceil(n / max(1, samples_per_shard)),
        math.ceil(per_sample.sum() / (shard_mb * 1e6)),
    )
    bounds = np.linspace(0, n, min(count, n) + 1).round().astype(int)
    return [[int(a), int(b)] for a, b in zip(bounds[:-1], bounds[1:])]


class WdsWriter:
    """The WebDataset writer of one export folder: a stream of samples in, tar shards out. Fed by
    extraction as it goes (`make features FORMAT=wds`) and by `export-wds` from a complete store
    (`stored_rows`): the same writer either way.

    A row is one sample's fields: index, name, hw (usable size; (0, 0): excluded, never written),
    lq, gt (uint8), base (float16), g {osf member: (4, D)}, meta (the degradation's JSON)."""

    def __init__(
        self,
        out: Path,
        store: str,
        pairs_key: str,
        task,
        target: str,
        encoders: list[str],
        keys: dict,
        tile: int = TILE,
        overlap: int = 0,
        codec: str = CODEC,
    ):
        self.out, self.store, self.pairs_key, self.task = Path(out), store, pairs_key, task
        self.target, self.encoders, self.keys = target, encoders, keys
        if tile < 0 or (tile and not 0 <= overlap < tile):
            raise ValueError(
                f"--tile must be 0 (whole samples) or positive, and --tile-overlap in [0, tile); "
                f"got {tile} and {overlap}"
            )
        if codec not in CODECS:
            raise ValueError(f"--codec must be one of {', '.join(CODECS)}, got {codec!r}")
        self.tiling, self.codec = {"tile": int(tile), "overlap": int(overlap)}, codec

    def sample_meta(self, row: dict) -> dict:
        meta = row["meta"]
        try:
            drawn = json.loads(meta) if meta else {}
        except json.JSONDecodeError as e:
            raise StoreError(
                f"{self.store}: pairs/meta of sample {row['index']} is not JSON: {e}"
            ) from None
        return {
            "name": row["name"],
            "index": row["index"],
            "hw": [int(v) for v in row["hw"]],
            "store": self.store,
            "pairs_key": self.pairs_key,
            "task": self.task,
            "target": {"member": self.target, "key": self.keys[self.target]},
            "encoders": [{"member": e, "key": self.keys[e]} for e in self.encoders],
            "meta": drawn,
        }

    def samples(self, row: dict):
        """The WebDataset samples ({"__key__": "<index:08d>_<tile:04d>", entry: bytes}) of a row's
        tiles; none when it was excluded."""
        h, w = (int(v) for v in row["hw"])
        if h == 0:  # excluded at extraction: never written, so it can never reach a batch
            return
        meta = self.sample_meta(row)
        g = {
            f"osf.{e.split('/', 1)[1]}.npy": npy_bytes(np.asarray(row["g"][e], np.float32))
            for e in self.encoders
        }
        for t, (y, x, th, tw) in enumerate(tile_grid(h, w, **self.tiling)):
            box = (slice(y, y + th), slice(x, x + tw))
            lq, gt = image_entries(self.codec)
            entries = {
                lq: image_bytes(row["lq"][box], self.codec),
                gt: image_bytes(row["gt"][box], self.codec),
                "base.npy": npy_bytes(row["base"][box]),
                **g,
            }
            sha = {e: hashlib.sha256(data).hexdigest() for e, data in entries.items()}
            yield {
                "__key__": f"{row['index']:08d}_{t:04d}",
                **entries,
                "meta.json": json.dumps(
                    {**meta, "tile": [y, x, th, tw], "sha256": sha}, sort_keys=True
                ).encode(),
            }

    def write_shard(self, k: int, lo: int, hi: int, rows) -> dict:
        """Write shard k (the rows of samples [lo, hi), in order) with webdataset's TarWriter to a
        temporary name, then rename it into place (fixed owner, mode and time: the same samples
        give the same bytes); its record goes beside it (`shard-<k>.json`, for reuse)."""
        from webdataset.writer import TarWriter  # imports torch: only when exporting

        name, names, hw, tiles = f"shard-{k:06d}.tar", [], [], 0
        with (
            atomic_path(self.out / name) as tmp,
            os.fdopen(open_regular(tmp), "wb") as f,
            TarWriter(f, encoder=False, mtime=0, user="ptgrm", group="ptgrm", mode=0o644) as tar,
        ):
            for row in rows:
                names.append(row["name"])
                hw.append([int(v) for v in row["hw"]])
                for sample in self.samples(row):
                    tar.write(sample)
                    tiles += 1
        rec = {
            "name": name,
            "first": lo,
            "samples": hi - lo,
            "tiles": tiles,
            "names": names,
            "hw": hw,
            "bytes": (self.out / name).stat().st_size,
            "sha256": sha256_file(self.out / name),
        }
        write_json_atomic(
            self.out / f"shard-{k:06d}.json",
            {
                "version": VERSION,
                "keys": self.keys,
                "tiling": self.tiling,
                "codec": self.codec,
                "record": rec,
            },
        )
        return rec

    def reuse(self, k: int, lo: int, hi: int) -> dict | None:
        """The record of shard k when a finished tar of these samples and member keys is there
        (written as extraction went, or by an interrupted export, in this format version), else None."""
        try:
            side = json.loads((self.out / f"shard-{k:06d}.json").read_text())
            rec = side["record"]
            ok = (
                side.get("version") == VERSION
                and side["keys"] == self.keys
                and side.get("tiling") == self.tiling
                and side.get("codec") == self.codec
                and [rec["first"], rec["first"] + rec["samples"]] == [lo, hi]
                and intact(self.out / rec["name"], rec)
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return rec if ok else None


def intact(path: Path, rec: dict) -> bool:
    """Whether the tar at `path` has the size and sha256 its record gives (a damaged shard is
    written again by export-wds, never kept)."""
    if path.is_symlink() or path.stat().st_size != rec["bytes"]:
        return False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest() == rec["sha256"]


def export_members(
    store: Store, target: str | None, encoders: list | None
) -> tuple[str, list[str]]:
    """(target member, osf members) an export holds: the named ones, or the only target and every osf."""
    tgt = store.pick("targets", target)
    encs = [store.pick("osf", e) for e in encoders] if encoders else store.members("osf")
    if not encs:
        raise StoreError(f"{store.path}: no complete osf member to export")
    return tgt, encs


def writer_of(
    store: Store,
    target: str,
    encoders: list[str],
    folder: Path,
    tile: int = TILE,
    overlap: int = 0,
    codec: str = CODEC,
) -> WdsWriter:
    m = store.manifest()
    keys = {k: m["members"][k]["key"] for k in ["pairs", target, *encoders]}
    return WdsWriter(
        folder,
        store.path.name,
        m["pairs_key"],
        m.get("task"),
        target,
        encoders,
        keys,
        tile,
        overlap,
        codec,
    )


def stored_rows(store: Store, target: str, encoders: list[str], hw: np.ndarray, lo: int, hi: int):
    """The rows (WdsWriter) of samples [lo, hi) read back from a complete store, one sample at a
    time (a shard of 12 MP photos is never in memory at once); `hw`: usable sizes."""
    names, meta = store.array("pairs", "names")[lo:hi], store.array("pairs", "meta")[lo:hi]
    a = {
        "lq": store.array("pairs", "lq"),
        "gt": store.array("pairs", "gt"),
        "base": store.array(target, "base"),
        **{e: store.array(e, "g") for e in encoders},
    }
    for j, i in enumerate(range(lo, hi)):
        yield {
            "index": i,
            "name": str(names[j]),
            "hw": hw[i],
            "lq": a["lq"][i],
            "gt": a["gt"][i],
            "base": a["base"][i],
            "g": {e: a[e][i] for e in encoders},
            "meta": str(meta[j]),
        }


def index_digest(index: dict) -> str:
    """sha256 of an export index without its own `sha256` field (canonical JSON): a flipped digit
    in a size, a range or a shard's hash is caught before anything is read by it."""
    body = {k: v for k, v in index.items() if k != "sha256"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def export_index(store: Store, writer: WdsWriter, shards: list[dict], settings: dict) -> dict:
    index = _export_index(store, writer, shards, settings)
    return {**index, "sha256": index_digest(index)}


def _export_index(store: Store, writer: WdsWriter, shards: list[dict], settings: dict) -> dict:
    m = store.manifest()
    source = {
        k: m.get(k)
        for k in ("dataset", "split", "task", "pairs_key", "n", "metric_space", "schema")
    }
    members = {k: dict(m["members"][k]) for k in writer.keys}
    return {
        "format": FORMAT,
        "version": VERSION,
        "codec": writer.codec,
        "store": store.path.name,
        "source": source,
        "target": writer.target,
        "encoders": writer.encoders,
        "keys": writer.keys,
        "members": members,
        "tiling": writer.tiling,
        "settings": settings,
        "samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "created": utc_now(),
        "complete": True,
    }


def up_to_date(folder: Path, index: dict, settings: dict) -> bool:
    """A complete export made with these settings whose shard files are all there, at their size."""
    return (
        bool(index.get("complete"))
        and index.get("version") == VERSION
        and index.get("settings") == settings
        and index.get("sha256") == index_digest(index)
        and all(
            (folder / s["name"]).is_file() and intact(folder / s["name"], s)
            for s in index["shards"]
        )
    )


def export_wds(
    store_path,
    out=None,
    target: str | None = None,
    encoders: list | None = None,
    samples_per_shard: int = 1000,
    shard_mb: float = 256,
    min_shards: int = 8,
    jobs: int = 4,
    ranges: list | None = None,
    tile: int = TILE,
    overlap: int = 0,
    codec: str = CODEC,
) -> Path:
    """Export the store at `store_path` (see the module doc); returns the export folder. `tile`,
    `overlap`: the tiling (px; tile 0: whole samples); `codec`: of the lq/gt tiles (CODECS). `ranges`
    (default: balanced, see shard_ranges) are the shards' sample ranges; a shard already written
    with these samples and keys (by extraction, or an interrupted export) is kept, not rewritten."""
    store = Store(store_path)
    tgt, encs = export_members(store, target, encoders)
    folder = Path(out or store.path.parent) / f"{store.path.name}-wds"
    writer = writer_of(store, tgt, encs, folder, tile, overlap, codec)
    hw = store.usable_hw([tgt, *encs])  # excluded samples: (0, 0), no entries
    if ranges is None:
        d = sum(store.member_info(e)["arrays"]["g"]["row"][-1] for e in encs)
        ranges = shard_ranges(hw, d, samples_per_shard, shard_mb, min_shards)
        if len(ranges) < min_shards:
            log.warning(
                f"{store.path.name} has only {len(ranges)} samples: {len(ranges)} shards, "
                f"fewer than --min-shards {min_shards}"
            )
    ranges = [[int(a), int(b)] for a, b in ranges]
    settings = {
        "ranges": ranges,
        "keys": writer.keys,
        "tiling": writer.tiling,
        "codec": writer.codec,
    }
    old = folder / INDEX
    try:
        done = old.is_file() and up_to_date(folder, json.loads(old.read_bytes()), settings)
    except (
        ValueError,
        UnicodeDecodeError,
        KeyError,
        TypeError,
        AttributeError,
    ):  # a damaged index: export again
        done = False
    if done:
        log.info(f"{folder}: up to date ({len(ranges)} shards); nothing to export")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    old.unlink(missing_ok=True)  # readers see no finished export while shards change

    def one(k: int, lo: int, hi: int) -> dict:
        return writer.reuse(k, lo, hi) or writer.write_shard(
            k, lo, hi, stored_rows(store, tgt, encs, hw, lo, hi)
        )

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        shards = list(pool.map(lambda kr: one(kr[0], *kr[1]), enumerate(ranges)))
    keep = {s["name"] for s in shards} | {s["name"].replace(".tar", ".json") for s in shards}
    for stale in (p for p in folder.glob("shard-*") if p.name not in keep):
        stale.unlink()
    write_json_atomic(old, export_index(store, writer, shards, settings))
    log.info(
        f"{folder}: {len(shards)} shards, {len(hw)} samples in {sum(s['tiles'] for s in shards)} tiles "
        f"of at most {tile or 'any'} px (lq/gt {codec}), "
        f"{sum(s['bytes'] for s in shards) / 1e6:.1f} MB; target {tgt}, osf {', '.join(encs)}"
    )
    return folder
