"""The feature store: one Zarr v3 group per degraded dataset split, with members added over time.

Layout of a store directory `<root>/<dataset>-<split>-<task>-<key12>/`:
    zarr.json                 Zarr group (root attributes: schema, dataset, split, task, pairs key)
    manifest.json             every member: key, spec, plan, status, arrays, bytes (JSON, never pickle)
    pairs/{lq,gt,hw,names,meta}
    targets/<id>/base         float16, unclamped target output
    osf/<id>/g                float32, (N, 4 flips, D)
    _done/<member>/<task>.json  written last by each extraction task, with per-shard sha256

A member is complete when every planned task has its done marker and the finaliser has re-read
every shard against those hashes; only then does the manifest say `complete`, and readers
refuse anything else. Inspect with `python -m stores info STORE`.
"""
from __future__ import annotations

import json
import re
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .keys import SCHEMA_VERSION, sha256_bytes
from .leases import store_lock

MANIFEST = "manifest.json"
DONE_DIR = "_done"


class StoreError(RuntimeError):
    """A store or member is missing, incomplete, damaged or was made with other settings."""


@dataclass(frozen=True)
class ArraySpec:
    """One array of a member. Image arrays are (N, H, W, C) with spatial `tile` chunks."""

    name: str
    shape: tuple
    dtype: str
    tile: int | None = None  # spatial chunk edge for (N,H,W,C) arrays; None = whole rows

    def chunks_and_shards(self, shard_len: int):
        if self.dtype == "str":
            return (shard_len,), None
        if self.tile is None:
            return (shard_len,) + tuple(self.shape[1:]), None
        n, h, w, c = self.shape
        t = self.tile
        shards = (shard_len, -(-h // t) * t, -(-w // t) * t, c)
        return (1, t, t, c), shards


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    A crash or kill never leaves a half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def make_plan(n: int, shard_len: int, n_tasks: int | None = None) -> list[list[int]]:
    """Split samples [0, n) into tasks of whole shards: [[start, stop], ...], fixed for a member."""
    n_shards = max(1, -(-n // shard_len))
    n_tasks = n_shards if not n_tasks else max(1, min(n_tasks, n_shards))
    bounds = np.linspace(0, n_shards, n_tasks + 1).round().astype(int)
    return [[int(a * shard_len), int(min(b * shard_len, n))] for a, b in zip(bounds[:-1], bounds[1:])]


def digest(values: np.ndarray) -> str:
    """sha256 of an array slice's content (strings joined by NUL)."""
    if values.dtype.kind in "OUT":
        return sha256_bytes("\0".join(str(v) for v in values.ravel()).encode())
    return sha256_bytes(np.ascontiguousarray(values).tobytes())


def dataset_name(data: str) -> str:
    """The name a DATA value gives its stores: `demo`, or the dataset folder's name."""
    return "demo" if data == "demo" else Path(data).resolve().name


def encoder_id(name: str) -> str:
    """The member id of an encoder name: `clip-vit-b32`, `openclip-<model or folder name>`, or
    `user-<module>-<factory>`, or
    `sd-vae` / `sd-unet` (their options are in the spec; the key suffix tells settings apart)."""
    if name.split(":")[0] in ("sd-vae", "sd-unet"):
        return name.split(":")[0]
    if name.startswith("openclip:"):
        return "openclip-" + Path(name.split(":")[1]).name.replace("/", "_")
    if ":" in name:  # a user's backbone, module.path:factory
        mod, _, fn = name.partition(":")
        return "user-" + re.sub(r"[^A-Za-z0-9_.]", "_", mod) + "-" + re.sub(r"[^A-Za-z0-9_]", "_", fn)
    return name


def store_name(dataset: str, split: str, task: str, pairs_key: str) -> str:
    return f"{dataset}-{split}-{task}-{pairs_key[:12]}"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class Store:
    """A feature store on local disk (or a shared filesystem). `mode='r'` never writes."""

    def __init__(self, path, mode: str = "r"):
        self.path = Path(path)
        self.mode = mode
        if not (self.path / MANIFEST).is_file():
            raise StoreError(f"{self.path}: not a feature store (no {MANIFEST})")
        self.group = zarr.open_group(str(self.path), mode="r" if mode == "r" else "r+", zarr_format=3)

    # -- creation ------------------------------------------------------------------------------
    @classmethod
    def open_or_create(cls, path, attrs: dict) -> "Store":
        """Open the store at `path` for writing, creating it with root `attrs` if absent."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with store_lock(path):
            if not (path / MANIFEST).is_file():
                group = zarr.open_group(str(path), mode="a", zarr_format=3)
                group.attrs.update({"schema": SCHEMA_VERSION, **attrs})
                write_json_atomic(path / MANIFEST, {"schema": SCHEMA_VERSION, **attrs, "created": _now(),
                                                    "members": {}})
        store = cls(path, mode="a")
        if store.manifest()["pairs_key"] != attrs["pairs_key"]:
            raise StoreError(f"{path}: holds pairs key {store.manifest()['pairs_key'][:12]}, "
                             f"asked for {attrs['pairs_key'][:12]}")
        return store

    # -- manifest ------------------------------------------------------------------------------
    def manifest(self) -> dict:
        return read_json(self.path / MANIFEST)

    def _update_member(self, member: str, **fields) -> None:
        if self.mode == "r":
            raise StoreError(f"{self.path}: opened read-only")
        with store_lock(self.path):  # another writer may update the manifest at the same time
            m = self.manifest()
            m["members"].setdefault(member, {}).update(fields)
            write_json_atomic(self.path / MANIFEST, m)

    def member_info(self, member: str) -> dict | None:
        return self.manifest()["members"].get(member)

    def status(self, member: str, key: str | None = None) -> str:
        """'missing', 'complete' or 'incomplete'; a different key raises StoreError."""
        info = self.member_info(member)
        if info is None:
            return "missing"
        if key is not None and info["key"] != key:
            raise StoreError(f"{self.path}: member {member} has key {info['key'][:12]}, asked for "
                             f"{key[:12]}; it was made with other settings")
        return info.get("status", "incomplete")

    # -- writing -------------------------------------------------------------------------------
    def begin_member(self, member: str, key: str, spec: dict, arrays: list[ArraySpec],
                     shard_len: int, plan: list[list[int]], info: dict | None = None) -> None:
        """Create a member's arrays and record its key and plan (idempotent for the same key; a
        second writer finds the member begun and keeps its plan)."""
        with store_lock(self.path):
            if self.status(member, key) == "missing":
                self._create_member(member, key, spec, arrays, shard_len, plan, info)

    def _create_member(self, member, key, spec, arrays, shard_len, plan, info) -> None:
        for a in arrays:
            chunks, shards = a.chunks_and_shards(shard_len)
            compressors = None if a.dtype == "str" else [ZstdCodec(level=3), Crc32cCodec()]
            self.group.create_array(f"{member}/{a.name}", shape=a.shape, dtype=a.dtype, chunks=chunks,
                                    shards=shards, compressors=compressors, overwrite=True,
                                    fill_value="" if a.dtype == "str" else 0)
        zarr.open_group(str(self.path / member), mode="r+", zarr_format=3).attrs.update(
            {"key": key, "spec": spec})
        self._update_member(member, key=key, spec=spec, status="incomplete", shard_len=shard_len,
                            plan=plan, arrays={a.name: {"shape": list(a.shape), "dtype": a.dtype}
                                               for a in arrays}, **(info or {}))

    def done_tasks(self, member: str) -> set[int]:
        d = self.path / DONE_DIR / member
        return {int(p.stem) for p in d.glob("*.json")} if d.is_dir() else set()

    def write_task(self, member: str, task: int, data: dict[str, np.ndarray], stats: dict) -> None:
        """Write one task's whole shards of every array of `member`, then its done marker last."""
        info = self.member_info(member)
        start, stop = info["plan"][task]
        shard_len = info["shard_len"]
        hashes, t0 = {}, time.perf_counter()
        for name, values in data.items():
            if len(values) != stop - start:
                raise StoreError(f"{member}/{name}: task {task} got {len(values)} samples, "
                                 f"expected {stop - start}")
            self.group[f"{member}/{name}"][start:stop] = values
            hashes[name] = {str(s // shard_len): digest(values[s - start:min(s + shard_len, stop) - start])
                            for s in range(start, stop, shard_len)}
        write_json_atomic(self.path / DONE_DIR / member / f"{task:05d}.json",
                          {"task": task, "samples": [start, stop], "shards": hashes, "finished": _now(),
                           "stats": {**stats, "seconds_write": time.perf_counter() - t0}})

    def finalize(self, member: str) -> dict:
        """Verify every shard against the done markers, then mark the member complete."""
        info = self.member_info(member)
        missing = sorted(set(range(len(info["plan"]))) - self.done_tasks(member))
        if missing:
            raise StoreError(f"{self.path}: member {member} is missing tasks {missing}")
        problems = self.verify(member)
        if problems:
            raise StoreError(f"{self.path}: member {member} failed verification: " + "; ".join(problems))
        nbytes = dir_bytes(self.path / member)
        self._update_member(member, status="complete", bytes=nbytes, completed=_now(),
                            excluded=self.task_records(member, "excluded"),
                            notes=self.task_records(member, "notes"))
        return self.member_info(member)

    def task_records(self, member: str, field: str) -> list:
        """The `field` lists (excluded samples, conversion notes) of all done markers, in order."""
        out = []
        for task in sorted(self.done_tasks(member)):
            out += read_json(self.path / DONE_DIR / member / f"{task:05d}.json")["stats"].get(field, [])
        return out

    def shard_checks(self, member: str) -> list[tuple]:
        """(array, shard, recorded sha256, first, last+1) of every shard the done markers list."""
        info = self.member_info(member)
        out = []
        for task in sorted(self.done_tasks(member)):
            marker = read_json(self.path / DONE_DIR / member / f"{task:05d}.json")
            for name, shards in marker["shards"].items():
                n = info["arrays"][name]["shape"][0]
                out += [(name, s, want, int(s) * info["shard_len"], min((int(s) + 1) * info["shard_len"], n))
                        for s, want in shards.items()]
        return out

    def check_shard(self, member: str, job: tuple) -> str | None:
        """Re-read one shard (decoding checks each chunk's crc32c); a problem line or None."""
        name, s, want, lo, hi = job
        try:
            got = digest(self.group[f"{member}/{name}"][lo:hi])
        except Exception as e:  # a damaged chunk fails its checksum on decode
            got = f"unreadable ({type(e).__name__}: {e})"
        if got != want:
            return f"{member}/{name} shard {s} (samples {lo}-{hi - 1}) does not match its recorded hash"
        return None

    def verify(self, member: str, jobs: int = 4) -> list[str]:
        """Re-read every shard of `member` against its recorded sha256, `jobs` at a time."""
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            found = pool.map(lambda job: self.check_shard(member, job), self.shard_checks(member))
            return [p for p in found if p]

    # -- reading -------------------------------------------------------------------------------
    def array(self, member: str, name: str, key: str | None = None):
        """A complete member's array; refuses incomplete members and, given `key`, other settings."""
        status = self.status(member, key)
        if status != "complete":
            raise StoreError(f"{self.path}: member {member} is {status}; run `make features` "
                             f"to build or complete it")
        return self.group[f"{member}/{name}"]

    def members(self, prefix: str) -> list[str]:
        """Complete members under `targets` or `osf`, sorted."""
        return sorted(m for m, i in self.manifest()["members"].items()
                      if m.startswith(prefix + "/") and i.get("status") == "complete")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
