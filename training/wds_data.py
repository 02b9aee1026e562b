"""Stage 2 data from a store's WebDataset export (`python -m stores export-wds STORE`), read by
`python -m training train --format wds`.

`WdsSplit` has the interface of `training.data.Split` (open, info, hw, names, metric_space, image,
g, arrays), so `training.data.CropBatches` works on it unchanged; with one process its batches
equal those read from the Zarr store for the same seed and step.

Several processes (torchrun: RANK, WORLD_SIZE): rank r of w takes whole shards r, r+w, r+2w, ...
(disjoint), reads them into memory and keeps its first m samples, m being the smallest sample count
of any rank, so every rank holds the same number of samples (shards are balanced: at most a few
samples per rank are dropped). Sample index i then means the rank's own i-th sample: CropBatches
draws the same global (index, crop, flip) list on every rank and each rank fills its slice of the
batch from its own shards. Shards need at least `world` of them (export with --min-shards).
Reads tar shards with the standard library; imports no pipeline code and no frozen network.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stores import encoder_id

from .data import match_member, members_info

INDEX = "index.json"


class WdsError(RuntimeError):
    """An export is missing, unfinished, damaged or does not hold what was asked for."""


def find_export(path) -> Path:
    """The export folder: `path` itself if it holds index.json, else `<path>-wds` beside a store."""
    path = Path(path)
    for folder in (path, path.parent / f"{path.name}-wds"):
        if (folder / INDEX).is_file():
            return folder
    raise WdsError(f"{path}: no WebDataset export (no {INDEX} in it or in {path.name}-wds beside it); "
                   f"run `python -m stores export-wds {path}`")


def read_index(folder: Path) -> dict:
    index = json.loads((folder / INDEX).read_text())
    if index.get("format") != "ptgrm-wds" or not index.get("complete"):
        raise WdsError(f"{folder / INDEX}: not a complete ptgrm-wds export; run export-wds again")
    return index


def decode_png(data: bytes, where: str) -> np.ndarray:
    """(H, W, 3) uint8 from an 8-bit RGB PNG whose rows use filters None, Sub or Up."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise WdsError(f"{where}: not a PNG")
    pos, idat, head = 8, [], None
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        if tag == b"IHDR":
            head = struct.unpack(">IIBBBBB", data[pos + 8:pos + 21])
        elif tag == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + n])
        pos += 12 + n
    if head is None or head[2:] != (8, 2, 0, 0, 0):
        raise WdsError(f"{where}: expected an 8-bit RGB, non-interlaced PNG, got header {head}")
    w, h = head[:2]
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + 3 * w)
    filters, px = rows[:, 0], rows[:, 1:]
    if (filters == 2).all():  # what export-wds writes: each row is the difference to the row above
        return np.cumsum(px, axis=0, dtype=np.uint8).reshape(h, w, 3)
    out = np.zeros((h, 3 * w), np.uint8)
    for r, f in enumerate(filters):
        if f == 0:
            out[r] = px[r]
        elif f == 1:
            out[r] = np.cumsum(px[r].reshape(w, 3), axis=0, dtype=np.uint8).ravel()
        elif f == 2:
            out[r] = px[r] + (out[r - 1] if r else 0)
        else:
            raise WdsError(f"{where}: PNG row filter {f} is not supported (export-wds writes filter 2)")
    return out.reshape(h, w, 3)


def decode_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise WdsError(f"{where}: not a plain .npy array: {e}") from None


class Ragged:
    """Samples of different sizes indexed like one array: `r[i, ys, xs]` is `items[i][ys, xs]`."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx):
        if isinstance(idx, tuple):
            return self.items[idx[0]][idx[1:]]
        return self.items[idx]


def read_shard(folder: Path, shard: dict, encoders: list) -> list[dict]:
    """The decoded samples of one shard, checked against the index (sha256, sample keys, entries)."""
    path = folder / shard["name"]
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise WdsError(f"{path}: sha256 differs from {INDEX}; the shard is damaged or was replaced")
    entries: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            entries.setdefault(key, {})[ext] = tar.extractfile(info).read()
    out = []
    for i, hw in zip(range(shard["first"], shard["first"] + shard["samples"]), shard["hw"]):
        if hw[0] == 0:  # excluded at extraction (not in the tar); size (0, 0): never drawn
            empty = np.zeros((0, 0, 3), np.uint8)
            out.append({"lq": empty, "gt": empty, "base": empty.astype(np.float16),
                        "g": None})
            continue
        e, where = entries.get(f"{i:08d}", {}), f"{path} sample {i}"
        want = ["lq.png", "gt.png", "base.npy", "meta.json"] + [f"osf.{x.split('/', 1)[1]}.npy" for x in encoders]
        missing = [w for w in want if w not in e]
        if missing:
            raise WdsError(f"{where}: missing {', '.join(missing)}")
        out.append({"lq": decode_png(e["lq.png"], f"{where} lq.png"),
                    "gt": decode_png(e["gt.png"], f"{where} gt.png"),
                    "base": decode_npy(e["base.npy"], f"{where} base.npy"),
                    "g": [decode_npy(e[w], f"{where} {w}") for w in want[4:]]})
    return out


def choose(index: dict, kind: str, name: str | None) -> str:
    """The exported member `kind/<name>-<key12>` (or given in full; None: the only one)."""
    have = [index["target"]] if kind == "targets" else index["encoders"]
    return match_member(have, kind, name, f"{index['store']}-wds (exported members)")


@dataclass
class WdsSplit:
    """The samples of this rank's shards of one export, in memory, with the chosen members."""

    path: Path  # the export folder, <store name>-wds
    target: str
    encoders: list
    rank: int = 0
    world: int = 1
    index: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path, target: str | None = None, encoders: list | None = None,
             rank: int | None = None, world: int | None = None) -> "WdsSplit":
        folder = find_export(path)
        index = read_index(folder)
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
        tgt = choose(index, "targets", target)
        encs = [choose(index, "osf", e and encoder_id(e)) for e in (encoders or [None])]
        return cls(folder, tgt, encs, rank, world, index)

    def __post_init__(self):
        self.index = self.index or read_index(self.path)
        shards = self.index["shards"]
        if len(shards) < self.world:
            raise WdsError(f"{self.path}: {len(shards)} shards for {self.world} processes; export with "
                           f"--min-shards {self.world} or more")
        self.shards = shards[self.rank::self.world]
        self.n = min(sum(s["samples"] for s in shards[r::self.world]) for r in range(self.world))
        self._hw = np.array([hw for s in self.shards for hw in s["hw"]], np.int32)[:self.n]
        self._names = [x for s in self.shards for x in s["names"]][:self.n]
        self._arrays = None

    def __getstate__(self):  # spawned loader workers read the shards themselves instead of a pickle
        return {**self.__dict__, "_arrays": None}

    def arrays(self) -> dict:
        """lq, gt, base (Ragged, valid size) and g ([(n, 4, D)] per encoder), read on first use.
        Call it before starting forked loader workers and they share this one copy."""
        if self._arrays is None:
            samples = [x for s in self.shards for x in read_shard(self.path, s, self.encoders)][:self.n]
            self._arrays = {k: Ragged([x[k] for x in samples]) for k in ("lq", "gt", "base")}
            shapes = [next((x["g"][j].shape for x in samples if x["g"] is not None), (4, 0))
                      for j in range(len(self.encoders))]  # excluded samples get zeros, never drawn
            self._arrays["g"] = [np.stack([x["g"][j] if x["g"] is not None else np.zeros(shapes[j], np.float32)
                                           for x in samples]) for j in range(len(self.encoders))]
        return self._arrays

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
        return {**members_info(self.index["members"], self.index["store"], self.target, self.encoders),
                "format": "wds"}

    def g(self, i: int, variant: int = 0) -> np.ndarray:
        return np.concatenate([g[i, variant] for g in self.arrays()["g"]])

    def image(self, i: int) -> dict:
        """Full valid-size sample i: lq, gt uint8 (h,w,3); base float32 (h,w,3); g (D,)."""
        a = self.arrays()
        return {"lq": a["lq"][i], "gt": a["gt"][i], "base": a["base"][i].astype(np.float32), "g": self.g(i)}
