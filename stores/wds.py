"""Export a store to WebDataset tar shards for streaming: `python -m stores export-wds STORE`.

Writes `<out>/<store name>-wds/` (default out: the store's folder's parent):
    shard-000000.tar ...   per sample `<index:08d>.` + lq.png, gt.png (uint8 RGB, valid size),
                           base.npy (float16, valid size), osf.<encoder member id>.npy ((4, D)
                           float32, the 4 flips), meta.json (name, index, hw, store, pairs key,
                           members and keys, the degradation's `meta` parsed)
    index.json             shards (samples, first index, names, hw, bytes, sha256), the source's
                           keys and member records, `complete: true`; written last
Tars are written with webdataset's TarWriter, each to a temporary name and renamed; index.json is removed first and written last,
so readers never take a half-made export for a finished one. Shards hold contiguous, balanced
sample ranges; there are at least `min_shards` of them (so nodes x workers can each get whole
shards) and none above `samples_per_shard` samples or about `shard_mb` MB. Tar entries carry fixed
owners and times: the same store gives the same bytes. Streamed back by `training/wds_data.py`.
"""
from __future__ import annotations

import io
import json
import math
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .keys import sha256_file
from .store import Store, StoreError, atomic_path, utc_now, write_json_atomic

INDEX = "index.json"
FORMAT = "ptgrm-wds"
VERSION = 1


def png_bytes(img: np.ndarray) -> bytes:
    """A standard 8-bit RGB PNG of a (H, W, 3) uint8 image (every row 'Up'-filtered)."""
    h, w, c = img.shape
    if img.dtype != np.uint8 or c != 3:
        raise ValueError(f"png_bytes needs (H, W, 3) uint8, got {img.shape} {img.dtype}")
    up = np.diff(img.astype(np.int16), axis=0, prepend=0).astype(np.uint8)  # wraps mod 256
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up.reshape(h, w * c)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()


def shard_ranges(hw: np.ndarray, d: int, samples_per_shard: int, shard_mb: float, min_shards: int) -> list:
    """Contiguous, balanced [start, stop) ranges: at least `min_shards` (at most one per sample)."""
    n = len(hw)
    per_sample = hw[:, 0].astype(np.int64) * hw[:, 1] * 3 * 4 + 16 * d + 1024  # lq+gt+base(f16), g
    count = max(min_shards, math.ceil(n / max(1, samples_per_shard)),
                math.ceil(per_sample.sum() / (shard_mb * 1e6)))
    bounds = np.linspace(0, n, min(count, n) + 1).round().astype(int)
    return [[int(a), int(b)] for a, b in zip(bounds[:-1], bounds[1:])]


class Exporter:
    """Writes the shards of one store's export (see the module doc)."""

    def __init__(self, store: Store, target: str, encoders: list[str], out: Path):
        self.store, self.target, self.encoders, self.out = store, target, encoders, out
        m = store.manifest()
        self.pairs_key, self.task = m["pairs_key"], m.get("task")
        self.keys = {k: m["members"][k]["key"] for k in ["pairs", target, *encoders]}
        self.hw = store.usable_hw([target, *encoders])  # excluded samples: (0, 0), no entries
        self.names = [str(x) for x in store.array("pairs", "names")[:]]
        self.arrays = {"lq": store.array("pairs", "lq"), "gt": store.array("pairs", "gt"),
                       "meta": store.array("pairs", "meta"), "base": store.array(target, "base"),
                       **{e: store.array(e, "g") for e in encoders}}

    def sample_meta(self, i: int, meta: str) -> dict:
        try:
            drawn = json.loads(meta) if meta else {}
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.store.path}: pairs/meta of sample {i} is not JSON: {e}") from None
        return {"name": self.names[i], "index": i, "hw": [int(v) for v in self.hw[i]],
                "store": self.store.path.name, "pairs_key": self.pairs_key, "task": self.task,
                "target": {"member": self.target, "key": self.keys[self.target]},
                "encoders": [{"member": e, "key": self.keys[e]} for e in self.encoders], "meta": drawn}

    def samples(self, lo: int, hi: int):
        """The WebDataset samples ({"__key__": "<index:08d>", entry: bytes}) of [lo, hi), in order."""
        a = {k: v[lo:hi] for k, v in self.arrays.items()}
        for j, i in enumerate(range(lo, hi)):
            h, w = (int(v) for v in self.hw[i])
            if h == 0:  # excluded at extraction: never written, so it can never reach a batch
                continue
            meta = json.dumps(self.sample_meta(i, str(a["meta"][j])), sort_keys=True).encode()
            yield {"__key__": f"{i:08d}", "lq.png": png_bytes(a["lq"][j][:h, :w]),
                   "gt.png": png_bytes(a["gt"][j][:h, :w]), "base.npy": npy_bytes(a["base"][j][:h, :w]),
                   **{f"osf.{e.split('/', 1)[1]}.npy": npy_bytes(a[e][j].astype(np.float32)) for e in self.encoders},
                   "meta.json": meta}

    def write_shard(self, k: int, lo: int, hi: int) -> dict:
        """Write shard k (samples [lo, hi)) with webdataset's TarWriter to a temporary name, then
        rename it into place (fixed owner, mode and time: the same store gives the same bytes)."""
        from webdataset.writer import TarWriter  # imports torch: only when exporting

        name = f"shard-{k:06d}.tar"
        with atomic_path(self.out / name) as tmp, open(tmp, "wb") as f, \
                TarWriter(f, encoder=False, mtime=0, user="ptgrm", group="ptgrm", mode=0o644) as tar:
            for sample in self.samples(lo, hi):
                tar.write(sample)
        return {"name": name, "first": lo, "samples": hi - lo, "names": self.names[lo:hi],
                "hw": self.hw[lo:hi].tolist(), "bytes": (self.out / name).stat().st_size,
                "sha256": sha256_file(self.out / name)}

    def index(self, shards: list[dict], settings: dict) -> dict:
        m = self.store.manifest()
        source = {k: m.get(k) for k in ("dataset", "split", "task", "pairs_key", "n", "metric_space",
                                          "schema")}
        members = {k: dict(m["members"][k]) for k in self.keys}
        return {"format": FORMAT, "version": VERSION, "store": self.store.path.name, "source": source,
                "target": self.target, "encoders": self.encoders, "keys": self.keys, "members": members,
                "settings": settings, "samples": sum(s["samples"] for s in shards), "shards": shards,
                "created": utc_now(), "complete": True}


def up_to_date(folder: Path, index: dict, settings: dict) -> bool:
    """A complete export made with these settings whose shard files are all there, at their size."""
    return bool(index.get("complete")) and index.get("settings") == settings and all(
        (folder / s["name"]).is_file() and (folder / s["name"]).stat().st_size == s["bytes"]
        for s in index["shards"])


def export_wds(store_path, out=None, target: str | None = None, encoders: list | None = None,
               samples_per_shard: int = 1000, shard_mb: float = 256, min_shards: int = 8,
               jobs: int = 4, log=print) -> Path:
    """Export the store at `store_path` (see the module doc); returns the export folder."""
    store = Store(store_path)
    tgt = store.pick("targets", target)
    encs = [store.pick("osf", e) for e in encoders] if encoders else store.members("osf")
    if not encs:
        raise StoreError(f"{store.path}: no complete osf member to export")
    folder = Path(out or store.path.parent) / f"{store.path.name}-wds"
    ex = Exporter(store, tgt, encs, folder)
    d = sum(store.member_info(e)["arrays"]["g"]["row"][-1] for e in encs)
    ranges = shard_ranges(ex.hw, d, samples_per_shard, shard_mb, min_shards)
    settings = {"ranges": ranges, "keys": ex.keys}
    old = folder / INDEX
    if old.is_file() and up_to_date(folder, json.loads(old.read_text()), settings):
        log(f"{folder}: up to date ({len(ranges)} shards); nothing to export")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    old.unlink(missing_ok=True)  # readers see no finished export while shards change
    if len(ranges) < min_shards:
        log(f"warning: {store.path.name} has only {len(ranges)} samples: {len(ranges)} shards, "
            f"fewer than --min-shards {min_shards}")
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        shards = list(pool.map(lambda kr: ex.write_shard(kr[0], *kr[1]), enumerate(ranges)))
    for stale in set(folder.glob("shard-*.tar")) - {folder / s["name"] for s in shards}:
        stale.unlink()
    write_json_atomic(old, ex.index(shards, settings))
    log(f"{folder}: {len(shards)} shards, {len(ex.hw)} samples, "
        f"{sum(s['bytes'] for s in shards) / 1e6:.1f} MB; target {tgt}, osf {', '.join(encs)}")
    return folder
