"""The feature store: one Zarr v3 group per degraded dataset split, with members added over time.

Layout of a store directory `<root>/<dataset>-<split>-<task>-<key12>/` (schema 2, docs/design.md):
    zarr.json                       Zarr group (root attributes: schema, dataset, split, task, pairs key)
    manifest.json                   store settings, the bucket table, every member's key, spec, status,
                                    arrays and bytes; constant in size as N grows (JSON, never pickle)
    _sources/...                    per-file and per-sample source records (stat fast path, array tasks)
    pairs/<bucket>/{lq,gt,hw,names,meta,source_index}
    targets/<id>/<bucket>/base      float16, unclamped target output
    osf/<id>/<bucket>/g             float32, (n, 4 flips, D)
    _done/<member>/<task>.json      written last by each extraction task, with per-shard sha256
    _records/<member>.json          excluded samples and conversion notes, written on completion

Buckets, shards and tasks: stores/layout.py. A member is complete when every planned task has its
done marker and the finaliser has re-read every shard against those hashes; only then does the
manifest say `complete`, and readers refuse anything else. Inspect with `python -m stores info STORE`.
"""
from __future__ import annotations

import json
import os
import re
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
from .layout import Layout, decode_text, encode_text
from .leases import store_lock
from .files import StoreError, UnsafeFileError, new_file, open_regular  # noqa: F401 (re-exported)
from .privacy import shareable

MANIFEST = "manifest.json"
DONE_DIR = "_done"
RECORDS_DIR = "_records"
SOURCES_DIR = "_sources"
TEXT = "text"  # ArraySpec dtype of UTF-8 text rows, stored as NUL-padded uint8


MEMBER_NAME = re.compile(r"pairs|(targets|osf)/[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_member_name(path, member: str) -> str:
    """A member name as the pipeline makes them (`pairs`, `targets/<id>`, `osf/<id>`); anything
    else (`..`, absolute paths, other folders) is refused before it goes into a path."""
    if not isinstance(member, str) or not MEMBER_NAME.fullmatch(member) or ".." in member:
        raise StoreError(f"{path}: {MANIFEST} names a member {member!r}; expected 'pairs', 'targets/<id>' or "
                         f"'osf/<id>' (letters, digits, . _ + -): the manifest is damaged or not from this tool")
    return member


@dataclass(frozen=True)
class ArraySpec:
    """One per-sample array of a member, stored per bucket as (rows, *row).

    `image`: (rows, H, W, channels) with H, W the bucket's canvas, chunked in spatial tiles;
    `row` is then (channels,). dtype `text`: `row` is (width,) bytes of UTF-8 per sample."""

    name: str
    dtype: str
    row: tuple = ()
    image: bool = False

    def zarr_dtype(self) -> str:
        return "uint8" if self.dtype == TEXT else self.dtype

    def geometry(self, bucket, tile: int) -> dict:
        """shape, chunks and shards of this array in one bucket."""
        if self.image:
            (h, w), c = bucket.hw, self.row[0]
            return {"shape": (bucket.count, h, w, c), "chunks": (1, tile, tile, c),
                    "shards": (bucket.shard_len, h, w, c)}
        return {"shape": (bucket.count, *self.row), "chunks": (bucket.shard_len, *self.row), "shards": None}

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "row": list(self.row), "image": self.image}


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`, already created empty by this process (exclusively,
    not through a link); rename it to `path` only if the block succeeds.

    A crash or kill never leaves a half-written file under the final name, and a symbolic link
    planted at `path` is replaced, never written through.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        new_file(tmp).close()
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _dump(tmp: Path, obj, fresh: bool = False) -> None:
    with new_file(tmp) if fresh else os.fdopen(open_regular(tmp), "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        _dump(tmp, obj)


def write_json_once(path: Path, obj) -> bool:
    """Publish `path` complete (written beside it, then hard-linked into place) unless it exists;
    False if another writer published it first. Never overwrites."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _dump(tmp, obj, fresh=True)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def digest(values: np.ndarray) -> str:
    """sha256 of an array slice's content."""
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


def match_member(members: list, kind: str, name: str | None, where) -> str:
    """The one of `members` (complete `targets/...` or `osf/...` members) that `name` means:
    `<id>` or `<id>-<key12>` (an encoder by its name, `clip-vit-b32`, `openclip:...`), or the member
    in full (`osf/<id>-<key12>`); None: the only one. Anything else raises StoreError naming `where`."""
    if name and kind == "osf":
        name = encoder_id(name)
    found = [m for m in members if name is None or m in (f"{kind}/{name}", name)
             or m.rsplit("-", 1)[0] == f"{kind}/{name}"]
    if len(found) == 1:
        return found[0]
    flag = "--target" if kind == "targets" else "--encoder"
    if not found:
        raise StoreError(f"{where}: no complete {kind} member matches {name or 'any'}; complete: "
                         f"{members or 'none'}; name one with {flag}")
    raise StoreError(f"{where}: several complete {kind} members match {name or 'any'}: {found}; "
                     f"name one in full with {flag} (e.g. {found[0].split('/', 1)[1]})")


def store_name(dataset: str, split: str, task: str, pairs_key: str) -> str:
    return f"{dataset}-{split}-{task}-{pairs_key[:12]}"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def rebuild_hint(path: Path) -> str:
    return (f"remove it (rm -r {path}) and run `make features` with the same TASK/DATA (or "
            f"`python -m pipeline features ...`) to rebuild it in the current layout")


def read_manifest(path: Path) -> dict:
    """A store's manifest.json, checked: JSON, this schema, valid member names. A truncated or
    garbled one is named, with the recovery (docs/design.md: "A damaged manifest")."""
    file = Path(path) / MANIFEST
    try:
        m = read_json(file)
        if not isinstance(m, dict) or not isinstance(m.get("members"), dict) or "layout" not in m:
            raise ValueError("not a manifest object with 'members' and 'layout'")
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{file}: damaged ({type(e).__name__}: {e}); it is only ever replaced whole, so this "
                         f"is damage from outside (disk, copy, editor): restore it with `python -m stores pull` "
                         f"from a shared copy, or remove the whole store (rm -r {path}; not only this file) and "
                         f"rerun `make features`") from None
    check_schema(path, m)
    for member in m["members"]:
        check_member_name(path, member)
    return m


def check_schema(path: Path, manifest: dict) -> None:
    """Refuse a store of another schema with what to do about it."""
    schema = manifest.get("schema")
    if schema != SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema {schema}, this version reads schema {SCHEMA_VERSION} "
                         f"(size buckets, no padding to the split's largest image, text as bytes; see "
                         f"docs/design.md); {rebuild_hint(path)}")


class Samples:
    """One array of a member over all its buckets, indexed by sample like a single array:
    `a[i]` (a row; text decoded), `a[i, ys, xs]` (a crop of an image), `a[lo:hi]` (rows of flat
    arrays as one ndarray, or a list of canvases for images, or a list of strings for text)."""

    def __init__(self, layout: Layout, spec: dict, parts: list):
        self.layout, self.parts = layout, parts
        self.text, self.image = spec["dtype"] == TEXT, spec["image"]
        first = parts[0]
        self.dtype = first.dtype
        self.shape = (layout.n, *first.shape[1:]) if not self.image else (layout.n, None, None, first.shape[3])
        self.nbytes = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in parts)

    def __len__(self) -> int:
        return self.layout.n

    def __getitem__(self, key):
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.layout.n)
            if step != 1:
                raise IndexError("only contiguous sample ranges are supported")
            return self.rows(lo, hi)
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        i = int(key) + (self.layout.n if key < 0 else 0)
        k, r = self.layout.locate(i)
        out = self.parts[k][(r, *rest)]
        return decode_text(out)[0] if self.text and not rest else out

    def rows(self, lo: int, hi: int):
        got = [self.parts[k][a:b] for k, a, b in self.layout.pieces(lo, hi)]
        if self.text:
            return [s for g in got for s in decode_text(g)]
        if self.image:
            return [x for g in got for x in g]
        return np.concatenate(got) if got else np.zeros((0, *self.shape[1:]), self.dtype)

    def wrap(self, fn) -> "Samples":
        """The same view with every bucket's array passed through `fn` (e.g. a fast reader)."""
        out = object.__new__(Samples)
        out.__dict__.update(self.__dict__, parts=[fn(p) for p in self.parts])
        return out


class Store:
    """A feature store on local disk (or a shared filesystem). `mode='r'` never writes.

    The manifest is read once per Store object (writers re-read it under the lock to update it)."""

    def __init__(self, path, mode: str = "r"):
        self.path = Path(path)
        self.mode = mode
        if not (self.path / MANIFEST).is_file():
            raise StoreError(f"{self.path}: not a feature store (no {MANIFEST})")
        self._manifest = read_manifest(self.path)
        self.layout = Layout.from_json(self._manifest["layout"])
        self._group = None

    @property
    def group(self):
        if self._group is None:
            self._group = zarr.open_group(str(self.path), mode="r" if self.mode == "r" else "r+", zarr_format=3)
        return self._group

    # -- creation ------------------------------------------------------------------------------
    @classmethod
    def open_or_create(cls, path, attrs: dict, layout: Layout | None = None, before_manifest=None) -> "Store":
        """Open the store at `path` for writing, creating it with root `attrs` and `layout` if
        absent; `before_manifest(path)` writes side files of a new store before its manifest."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with store_lock(path):
            if not (path / MANIFEST).is_file():
                if layout is None:
                    raise StoreError(f"{path}: no store here, and no layout given to create one")
                group = zarr.open_group(str(path), mode="a", zarr_format=3)
                group.attrs.update({"schema": SCHEMA_VERSION, **attrs})
                if before_manifest is not None:
                    before_manifest(path)
                attrs = shareable(attrs)
                write_json_atomic(path / MANIFEST, {"schema": SCHEMA_VERSION, **attrs, "created": utc_now(),
                                                    "n": layout.n, "layout": layout.to_json(), "members": {}})
        store = cls(path, mode="a")
        if store.manifest()["pairs_key"] != attrs["pairs_key"]:
            raise StoreError(f"{path}: holds pairs key {store.manifest()['pairs_key'][:12]}, "
                             f"asked for {attrs['pairs_key'][:12]}")
        return store

    # -- manifest ------------------------------------------------------------------------------
    def manifest(self) -> dict:
        return self._manifest

    def refresh(self) -> dict:
        """Read the manifest again (another writer may have changed it)."""
        self._manifest = read_manifest(self.path)
        return self._manifest

    def _update_member(self, member: str, **fields) -> None:
        if self.mode == "r":
            raise StoreError(f"{self.path}: opened read-only")
        with store_lock(self.path):  # another writer may update the manifest at the same time
            m = self.refresh()
            m["members"].setdefault(check_member_name(self.path, member), {}).update(shareable(fields))
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

    def plan(self, member: str) -> list[list[int]]:
        """The member's tasks, `[[start, stop], ...]` (a pure function of the layout)."""
        return self.layout.plan(self.member_info(member).get("n_tasks"))

    # -- writing -------------------------------------------------------------------------------
    def begin_member(self, member: str, key: str, spec: dict, arrays: list[ArraySpec],
                     n_tasks: int | None = None, info: dict | None = None) -> None:
        """Create a member's arrays in every bucket and record its key and task count (idempotent
        for the same key; a second writer finds the member begun and keeps its plan)."""
        with store_lock(self.path):
            self.refresh()
            if self.status(member, key) == "missing":
                self._create_member(member, key, spec, arrays, n_tasks, info)

    def _create_member(self, member, key, spec, arrays, n_tasks, info) -> None:
        for b in self.layout.buckets:
            for a in arrays:
                g = a.geometry(b, self.layout.tile)
                self.group.create_array(f"{member}/{b.name}/{a.name}", shape=g["shape"], dtype=a.zarr_dtype(),
                                        chunks=g["chunks"], shards=g["shards"], overwrite=True, fill_value=0,
                                        compressors=[ZstdCodec(level=3), Crc32cCodec()],
                                        attributes={"encoding": "utf-8, NUL-padded"} if a.dtype == TEXT else None)
        zarr.open_group(str(self.path / member), mode="r+", zarr_format=3).attrs.update(
            {"key": key, "spec": shareable(spec)})
        plan = self.layout.plan(n_tasks)
        self._update_member(member, key=key, spec=spec, status="incomplete", n_tasks=n_tasks, tasks=len(plan),
                            arrays={a.name: a.to_json() for a in arrays}, **(info or {}))

    def done_tasks(self, member: str) -> set[int]:
        d = self.path / DONE_DIR / member
        return {int(p.stem) for p in d.glob("*.json")} if d.is_dir() else set()

    def _bucket_array(self, member: str, k: int, name: str):
        return self.group[f"{member}/{self.layout.buckets[k].name}/{name}"]

    def write_shard(self, member: str, start: int, stop: int, data: dict) -> dict[str, str]:
        """Write one whole shard [start, stop) of every array in `data`; returns their sha256.

        Image arrays take a list of (h, w, C) arrays at each sample's valid size (None or an
        empty array for an excluded sample), pasted on the bucket's canvas; the others take
        (stop - start, *row) arrays."""
        pieces = self.layout.pieces(start, stop)
        if len(pieces) != 1 or pieces[0][1] % self.layout.buckets[pieces[0][0]].shard_len:
            raise StoreError(f"{self.path}: [{start}, {stop}) is not one whole shard of {member}")
        k, r0, r1 = pieces[0]
        bucket, specs = self.layout.buckets[k], self.member_info(member)["arrays"]
        if r1 - r0 != min(bucket.shard_len, bucket.count - r0):
            raise StoreError(f"{self.path}: [{start}, {stop}) is not one whole shard of {member}")
        hashes = {}
        for name, values in data.items():
            if len(values) != stop - start:
                raise StoreError(f"{member}/{name}: shard [{start}, {stop}) got {len(values)} samples")
            spec = specs[name]
            if spec["dtype"] == TEXT:
                values = encode_text(values, spec["row"][0], f"{self.path.name}: {member}/{name}")
            elif spec["image"]:
                canvas = np.zeros((r1 - r0, *bucket.hw, spec["row"][0]), spec["dtype"])
                for j, v in enumerate(values):
                    if v is not None and v.size:
                        canvas[j, :v.shape[0], :v.shape[1]] = v
                values = canvas
            values = np.ascontiguousarray(values)
            self._bucket_array(member, k, name)[r0:r1] = values
            hashes[name] = digest(values)
        return hashes

    def mark_done(self, member: str, task: int, hashes: dict[int, dict], stats: dict) -> bool:
        """The done marker of a task, written last and only once: `hashes` {shard start: {array:
        sha256}}. False if the task already had one (another writer finished it first)."""
        by_array: dict[str, dict] = {}
        for lo, h in hashes.items():
            for name, sha in h.items():
                by_array.setdefault(name, {})[str(lo)] = sha
        start, stop = self.plan(member)[task]
        return write_json_once(self.done_path(member, task),
                               {"task": task, "samples": [start, stop], "shards": by_array, "finished": utc_now(),
                                "stats": shareable(stats)})  # reasons may name files under $HOME

    def done_path(self, member: str, task: int) -> Path:
        return self.path / DONE_DIR / member / f"{task:05d}.json"

    def write_task(self, member: str, task: int, data: dict, stats: dict) -> None:
        """Write one task's whole shards of every array of `member` (values of all its samples,
        as write_shard takes them), then its done marker last."""
        start, stop = self.plan(member)[task]
        t0, hashes = time.perf_counter(), {}
        for _, lo, hi in self.shards_of(start, stop):
            hashes[lo] = self.write_shard(member, lo, hi, {k: v[lo - start:hi - start] for k, v in data.items()})
        self.mark_done(member, task, hashes, {**stats, "seconds_write": time.perf_counter() - t0})

    def shards_of(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(bucket number, start, stop) of the shards inside [start, stop)."""
        return self.layout.shards_of(start, stop)

    def finalize(self, member: str) -> dict:
        """Verify every shard against the done markers, then mark the member complete."""
        self.refresh()
        missing = sorted(set(range(len(self.plan(member)))) - self.done_tasks(member))
        if missing:
            raise StoreError(f"{self.path}: member {member} is missing tasks {missing}")
        problems = self.verify(member)
        if problems:
            raise StoreError(f"{self.path}: member {member} failed verification: " + "; ".join(problems))
        nbytes = dir_bytes(self.path / member)
        records = shareable({f: self.task_records(member, f) for f in ("excluded", "notes")})  # pushed too
        with store_lock(self.path):
            if self.refresh()["members"][member].get("status") == "complete":
                return self.member_info(member)  # another writer finalised it: never written again
            write_json_atomic(self.path / RECORDS_DIR / f"{member.replace('/', '__')}.json", records)
            self._update_member(member, status="complete", bytes=nbytes, completed=utc_now(),
                                **{f"n_{f}": len(v) for f, v in records.items()})
        return self.member_info(member)

    def records(self, member: str) -> dict:
        """A complete member's excluded samples and conversion notes: {"excluded": [...], "notes": [...]}."""
        path = self.path / RECORDS_DIR / f"{member.replace('/', '__')}.json"
        return read_json(path) if path.is_file() else {"excluded": [], "notes": []}

    def usable_hw(self, members: list) -> np.ndarray:
        """Valid sizes with (0, 0) for every sample a member excluded (e.g. a non-finite target
        output; samples excluded when loading already have size (0, 0)): readers draw from these."""
        hw = self.array("pairs", "hw")[:].copy()
        for m in members:
            for e in self.records(m)["excluded"]:
                if "index" in e:
                    hw[e["index"]] = 0
        return hw

    def task_records(self, member: str, field: str) -> list:
        """The `field` lists (excluded samples, conversion notes) of all done markers, in order."""
        out = []
        for task in sorted(self.done_tasks(member)):
            out += read_json(self.done_path(member, task))["stats"].get(field, [])
        return out

    def shard_checks(self, member: str) -> list[tuple]:
        """(array, recorded sha256, start, stop) of every shard the done markers list."""
        out = []
        for task in sorted(self.done_tasks(member)):
            marker = read_json(self.done_path(member, task))
            stops = {a: b for _, a, b in self.shards_of(*marker["samples"])}
            for name, shards in marker["shards"].items():
                out += [(name, want, int(lo), stops.get(int(lo), int(lo))) for lo, want in shards.items()]
        return out

    def check_shard(self, member: str, job: tuple) -> str | None:
        """Re-read one shard (decoding checks each chunk's crc32c); a problem line or None."""
        name, want, lo, hi = job
        try:
            k, r0 = self.layout.locate(lo)
            got = digest(self._bucket_array(member, k, name)[r0:r0 + hi - lo])
        except Exception as e:  # a damaged chunk fails its checksum on decode
            got = f"unreadable ({type(e).__name__}: {e})"
        if got != want:
            return f"{member}/{name} shard [{lo}, {hi}) (samples {lo}-{hi - 1}) does not match its recorded hash"
        return None

    def verify(self, member: str, jobs: int = 4) -> list[str]:
        """Re-read every shard of `member` against its recorded sha256, `jobs` at a time."""
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            found = pool.map(lambda job: self.check_shard(member, job), self.shard_checks(member))
            return [p for p in found if p]

    # -- reading -------------------------------------------------------------------------------
    def array(self, member: str, name: str, key: str | None = None) -> Samples:
        """A complete member's array over all buckets; refuses incomplete members and, given
        `key`, other settings."""
        status = self.status(member, key)
        if status != "complete":
            raise StoreError(f"{self.path}: member {member} is {status}; run `make features` "
                             f"to build or complete it")
        return self._samples(member, name)

    def _samples(self, member: str, name: str) -> Samples:
        spec = self.member_info(member)["arrays"].get(name)
        if spec is None:
            raise StoreError(f"{self.path}: member {member} has no array {name!r}")
        return Samples(self.layout, spec, [self._bucket_array(member, k, name) for k in range(len(self.layout.buckets))])

    def members(self, prefix: str) -> list[str]:
        """Complete members under `targets` or `osf`, sorted."""
        return sorted(m for m, i in self.manifest()["members"].items()
                      if m.startswith(prefix + "/") and i.get("status") == "complete")

    def pick(self, kind: str, name: str | None) -> str:
        """The complete member of `kind` that `name` means (`match_member`)."""
        return match_member(self.members(kind), kind, name, self.path)


def utc_now() -> str:
    """The time stamp of every record a store writes (manifest, done markers, exports): UTC,
    ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
