"""The feature store: one Zarr v3 group per degraded dataset split, with members added over time.

Layout of a store directory `<root>/<dataset>-<split>-<task>-<key12>/` (schema 2, docs/design.md):
    zarr.json                       Zarr group (root attributes: schema, dataset, split, task, pairs key)
    manifest.json                   store settings, the bucket table, every member's key, spec, status,
                                    arrays and bytes; constant in size as N grows (JSON, never pickle)
    _sources/...                    per-file and per-sample source records (stat fast path, array tasks)
    pairs/<bucket>/{lq,gt,hw,names,meta,source_index}
    targets/<id>/<bucket>/base      float16, unclamped target output
    osf/<id>/<bucket>/g             float32, (n, 4 flips, D)
    _done/<member>/<ri>.json        written last for each extraction range ri, with per-shard sha256 and
                                    the lease generation whose staged shards it vouches for
    _staging/<start>-<stop>/<gen>/  shards written under one lease generation of a range, moved into
                                    the arrays only once that generation's done marker stands
    _records/<member>.json          excluded samples and conversion notes, written on completion

Buckets, shards and ranges: stores/layout.py. A member is complete when every planned range has its
done marker and the finaliser has re-read every shard against those hashes; only then does the
manifest say `complete`, and readers refuse anything else. Inspect with `python -m stores info STORE`.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from common.privacy import shareable

from .files import StoreError, UnsafeFileError, check_inside, new_file, open_regular  # noqa: F401 (re-exported)
from .keys import SCHEMA_VERSION, sha256_bytes
from .layout import Layout, decode_text, encode_text
from .leases import store_lock

MANIFEST = "manifest.json"
DONE_DIR = "_done"
RECORDS_DIR = "_records"
SOURCES_DIR = "_sources"
STAGING_DIR = "_staging"
TEXT = "text"  # ArraySpec dtype of UTF-8 text rows, stored as NUL-padded uint8


class DamagedFile(StoreError, ValueError):
    """A store file that is not what was written: unreadable JSON, or a shard file that is not the
    one its done marker vouches for. A ValueError too, for callers that skip unparsable JSON."""


MEMBER_NAME = re.compile(r"pairs|(targets|osf)/[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_member_name(path, member: str) -> str:
    """A member name as the pipeline makes them (`pairs`, `targets/<id>`, `osf/<id>`); anything
    else (`..`, absolute paths, other folders) is refused before it goes into a path."""
    if not isinstance(member, str) or not MEMBER_NAME.fullmatch(member) or ".." in member:
        raise StoreError(
            f"{path}: {MANIFEST} names a member {member!r}; expected 'pairs', 'targets/<id>' or "
            f"'osf/<id>' (letters, digits, . _ + -): the manifest is damaged or not from this tool"
        )
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
            return {
                "shape": (bucket.count, h, w, c),
                "chunks": (1, tile, tile, c),
                "shards": (bucket.shard_len, h, w, c),
            }
        return {
            "shape": (bucket.count, *self.row),
            "chunks": (bucket.shard_len, *self.row),
            "shards": None,
        }

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
    """A JSON file the project wrote; damage (not JSON, not UTF-8) raises DamagedFile naming it."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFile(
            f"{path}: damaged ({type(e).__name__}: {e}); this file is only ever written whole: "
            f"run `python -m stores verify` / `repair` on its store, or pull the store again"
        ) from None


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
        return (
            "user-" + re.sub(r"[^A-Za-z0-9_.]", "_", mod) + "-" + re.sub(r"[^A-Za-z0-9_]", "_", fn)
        )
    return name


def match_member(members: list, kind: str, name: str | None, where) -> str:
    """The one of `members` (complete `targets/...` or `osf/...` members) that `name` means:
    `<id>` or `<id>-<key12>` (an encoder by its name, `clip-vit-b32`, `openclip:...`), or the member
    in full (`osf/<id>-<key12>`); None: the only one. Anything else raises StoreError naming `where`."""
    if name and kind == "osf":
        name = encoder_id(name)
    found = [
        m
        for m in members
        if name is None or m in (f"{kind}/{name}", name) or m.rsplit("-", 1)[0] == f"{kind}/{name}"
    ]
    if len(found) == 1:
        return found[0]
    flag = "--target" if kind == "targets" else "--encoder"
    if not found:
        raise StoreError(
            f"{where}: no complete {kind} member matches {name or 'any'}; complete: "
            f"{members or 'none'}; name one with {flag}"
        )
    raise StoreError(
        f"{where}: several complete {kind} members match {name or 'any'}: {found}; "
        f"name one in full with {flag} (e.g. {found[0].split('/', 1)[1]})"
    )


def store_name(dataset: str, split: str, task: str, pairs_key: str) -> str:
    return f"{dataset}-{split}-{task}-{pairs_key[:12]}"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def rebuild_hint(path: Path) -> str:
    return (
        f"remove it (rm -r {path}) and run `make features` with the same TASK/DATA (or "
        f"`python -m pipeline features ...`) to rebuild it in the current layout"
    )


def read_manifest(path: Path) -> dict:
    """A store's manifest.json, checked: JSON, this schema, valid member names. A truncated or
    garbled one is named, with the recovery (docs/design.md: "A damaged manifest")."""
    file = Path(path) / MANIFEST
    try:
        m = read_json(file)
        if not isinstance(m, dict) or not isinstance(m.get("members"), dict) or "layout" not in m:
            raise ValueError("not a manifest object with 'members' and 'layout'")
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(
            f"{file}: damaged ({type(e).__name__}: {e}); it is only ever replaced whole, so this "
            f"is damage from outside (disk, copy, editor): restore it with `python -m stores pull` "
            f"from a shared copy, or remove the whole store (rm -r {path}; not only this file) and "
            f"rerun `make features`"
        ) from None
    check_schema(path, m)
    for member in m["members"]:
        check_member_name(path, member)
    return m


def check_schema(path: Path, manifest: dict) -> None:
    """Refuse a store of another schema with what to do about it."""
    schema = manifest.get("schema")
    if schema != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store schema {schema}, this version reads schema {SCHEMA_VERSION} "
            f"(size buckets, no padding to the split's largest image, text as bytes; see "
            f"docs/design.md); {rebuild_hint(path)}"
        )


def shard_file(layout: Layout, member: str, name: str, spec: dict, k: int, row: int) -> str:
    """The file (relative to the store) of the shard holding row `row` of bucket `k` of an array:
    image shards span the whole canvas, flat arrays' chunks whole rows (zarr's default keys)."""
    b = layout.buckets[k]
    ndim = 4 if spec["image"] else 1 + len(spec["row"])
    return f"{member}/{b.name}/{name}/c/{row // b.shard_len}" + "/0" * (ndim - 1)


FINGERPRINT_BYTES = (
    4  # every chunk and shard file ends with a crc32c: of its data, or of its shard index
)


def fingerprint(path: Path) -> str | None:
    """'<size>:<last 4 bytes hex>' of a chunk or shard file (None: no file). Zarr's files end with
    a crc32c (a flat array's chunk: of its compressed data; an image shard: of its index, which
    holds every tile's offset and size), so a file swapped with, or replaced by, another one of the
    store differs here, at the cost of one 4-byte read, without decoding anything."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: a symlink, which a store never holds
        raise DamagedFile(
            f"{path}: not a regular file ({e.strerror}); a store holds no symlinks: run "
            f"`python -m stores repair` or pull the store again"
        ) from None
    try:
        size = os.fstat(fd).st_size
        return f"{size}:{os.pread(fd, FINGERPRINT_BYTES, max(0, size - FINGERPRINT_BYTES)).hex()}"
    finally:
        os.close(fd)


def records_file(member: str) -> str:
    return f"{RECORDS_DIR}/{member.replace('/', '__')}.json"


@lru_cache(maxsize=64)
def _zeros_digest(dtype: str, shape: tuple) -> str:
    return digest(np.zeros(shape, dtype))


def zeros_digest(layout: Layout, spec: dict, k: int, lo: int, hi: int) -> str:
    """sha256 of a shard [lo, hi) of bucket k that holds only the fill value (0): zarr writes no
    file for such a shard, so its absence is what the done marker vouches for."""
    a = ArraySpec("", spec["dtype"], tuple(spec["row"]), spec["image"])
    return _zeros_digest(
        a.zarr_dtype(), (hi - lo, *a.geometry(layout.buckets[k], layout.tile)["shape"][1:])
    )


def range_of(layout: Layout, info: dict, lo: int) -> int:
    """The range of a member (manifest `info`) that owns the shard starting at sample lo."""
    starts = [a for a, _ in layout.ranges(info.get("n_tasks"))]
    return bisect.bisect_right(starts, lo) - 1


def absent_is_vouched(
    layout: Layout, info: dict, name: str, k: int, lo: int, hi: int, marker: dict | None
) -> bool:
    """Whether a complete member's absent shard [lo, hi) of `name` is one zarr never wrote (its
    done marker `marker` records the hash of zeros), rather than a lost file."""
    want = ((marker or {}).get("shards", {}).get(name) or {}).get(str(lo))
    return want == zeros_digest(layout, info["arrays"][name], k, lo, hi)


def lost_shards(layout: Layout, info: dict, member: str, exists, marker) -> list[str]:
    """The shard files of a complete member that are absent though their done markers record data:
    `exists(relative path)`, `marker(ri)` (its done marker, or None). One check per shard."""
    lost = []
    for k, lo, hi in layout.shards():
        row = lo - layout.buckets[k].start
        for name, spec in info["arrays"].items():
            rel = shard_file(layout, member, name, spec, k, row)
            if not exists(rel) and not absent_is_vouched(
                layout, info, name, k, lo, hi, marker(range_of(layout, info, lo))
            ):
                lost.append(rel)
    return lost


def _marker_shaped(m: dict) -> bool:
    """A done marker's fields have the types this tool writes (JSON that parses can still be wrong)."""

    def table(x, value):
        return isinstance(x, dict) and all(
            isinstance(v, dict) and all(value(h) for h in v.values()) for v in x.values()
        )

    return (
        table(m.get("shards"), lambda h: isinstance(h, str))
        and ("files" not in m or table(m["files"], lambda h: h is None or isinstance(h, str)))
        and isinstance(m.get("stats", {}), dict)
        and (m.get("generation") is None or type(m["generation"]) is int)
    )


class Samples:
    """One array of a member over all its buckets, indexed by sample like a single array:
    `a[i]` (a row; text decoded), `a[i, ys, xs]` (a crop of an image), `a[lo:hi]` (rows of flat
    arrays as one ndarray, or a list of canvases for images, or a list of strings for text).

    `check(k, row)`, when given, is called before rows of a shard of bucket k are read (it raises
    for a shard file that is lost, see `Store.presence_check`)."""

    def __init__(self, layout: Layout, spec: dict, parts: list, check=None, where: str = ""):
        self.layout, self.parts, self.check, self.where = layout, parts, check, where
        self.text, self.image = spec["dtype"] == TEXT, spec["image"]
        first = parts[0]
        self.dtype = first.dtype
        self.shape = (
            (layout.n, *first.shape[1:])
            if not self.image
            else (layout.n, None, None, first.shape[3])
        )
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
        if self.check:
            self.check(k, r)
        with self.named(i, i + 1):
            out = self.parts[k][(r, *rest)]
            return decode_text(out)[0] if self.text and not rest else out

    @contextmanager
    def named(self, lo: int, hi: int):
        """Errors of the array readers (zarr's checksum and decoding errors name no file) name
        this array and its samples."""
        try:
            yield
        except (StoreError, IndexError):
            raise
        except Exception as e:
            raise StoreError(
                f"{self.where}: samples {lo}-{hi - 1} unreadable ({type(e).__name__}: {e}); run "
                f"`python -m stores verify` and `repair`, or pull the store again"
            ) from None

    def rows(self, lo: int, hi: int):
        pieces = self.layout.pieces(lo, hi)
        for k, a, b in pieces if self.check else ():
            for r in range(a, b, self.layout.buckets[k].shard_len):
                self.check(k, r)
            self.check(k, b - 1)
        with self.named(lo, hi):
            got = [self.parts[k][a:b] for k, a, b in pieces]
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
            try:
                group = zarr.open_group(
                    str(self.path), mode="r" if self.mode == "r" else "r+", zarr_format=3
                )
                if group.attrs.get("pairs_key") != self._manifest.get("pairs_key"):
                    raise ValueError(
                        f"its pairs key {str(group.attrs.get('pairs_key'))[:12]} is not the "
                        f"manifest's {str(self._manifest.get('pairs_key'))[:12]}"
                    )
                self._group = group
            except Exception as e:  # zarr: a damaged or missing zarr.json at the root
                raise DamagedFile(
                    f"{self.path}/zarr.json: cannot open the store's root ({type(e).__name__}: {e}); "
                    f"pull the store again, or rebuild it"
                ) from None
        return self._group

    # -- creation ------------------------------------------------------------------------------
    @classmethod
    def open_or_create(
        cls, path, attrs: dict, layout: Layout | None = None, side_files: dict | None = None
    ) -> "Store":
        """Open the store at `path` for writing, creating it with root `attrs` and `layout` if
        absent; a new store gets `side_files` ({relative path: JSON object}) before its manifest."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with store_lock(path):
            if not (path / MANIFEST).is_file():
                if layout is None:
                    raise StoreError(f"{path}: no store here, and no layout given to create one")
                group = zarr.open_group(str(path), mode="a", zarr_format=3)
                group.attrs.update({"schema": SCHEMA_VERSION, **attrs})
                for rel, obj in (side_files or {}).items():
                    write_json_atomic(path / rel, obj)
                attrs = shareable(attrs)
                write_json_atomic(
                    path / MANIFEST,
                    {
                        "schema": SCHEMA_VERSION,
                        **attrs,
                        "created": utc_now(),
                        "n": layout.n,
                        "layout": layout.to_json(),
                        "members": {},
                    },
                )
        store = cls(path, mode="a")
        if store.manifest()["pairs_key"] != attrs["pairs_key"]:
            raise StoreError(
                f"{path}: holds pairs key {store.manifest()['pairs_key'][:12]}, "
                f"asked for {attrs['pairs_key'][:12]}"
            )
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
            m["members"].setdefault(check_member_name(self.path, member), {}).update(
                shareable(fields)
            )
            write_json_atomic(self.path / MANIFEST, m)

    def member_info(self, member: str) -> dict | None:
        return self.manifest()["members"].get(member)

    def status(self, member: str, key: str | None = None) -> str:
        """'missing', 'complete' or 'incomplete'; a different key raises StoreError."""
        info = self.member_info(member)
        if info is None:
            return "missing"
        if key is not None and info["key"] != key:
            raise StoreError(
                f"{self.path}: member {member} has key {info['key'][:12]}, asked for "
                f"{key[:12]}; it was made with other settings"
            )
        return info.get("status", "incomplete")

    def ranges(self, member: str) -> list[list[int]]:
        """The member's ranges, `[[start, stop], ...]` (a pure function of the layout)."""
        return self.layout.ranges(self.member_info(member).get("n_tasks"))

    # -- writing -------------------------------------------------------------------------------
    def begin_member(
        self,
        member: str,
        key: str,
        spec: dict,
        arrays: list[ArraySpec],
        n_ranges: int | None = None,
        info: dict | None = None,
    ) -> None:
        """Create a member's arrays in every bucket and record its key and range count (idempotent
        for the same key; a second writer finds the member begun and keeps its ranges)."""
        with store_lock(self.path):
            self.refresh()
            if self.status(member, key) == "missing":
                self._create_member(member, key, spec, arrays, n_ranges, info)

    def _create_member(self, member, key, spec, arrays, n_ranges, info) -> None:
        for b in self.layout.buckets:
            for a in arrays:
                g = a.geometry(b, self.layout.tile)
                self.group.create_array(
                    f"{member}/{b.name}/{a.name}",
                    shape=g["shape"],
                    dtype=a.zarr_dtype(),
                    chunks=g["chunks"],
                    shards=g["shards"],
                    overwrite=True,
                    fill_value=0,
                    compressors=[ZstdCodec(level=3), Crc32cCodec()],
                    attributes={"encoding": "utf-8, NUL-padded"} if a.dtype == TEXT else None,
                )
        zarr.open_group(str(self.path / member), mode="r+", zarr_format=3).attrs.update(
            {"key": key, "spec": shareable(spec)}
        )
        ranges = self.layout.ranges(
            n_ranges
        )  # recorded as n_tasks and tasks (the names of schema 2)
        self._update_member(
            member,
            key=key,
            spec=spec,
            status="incomplete",
            n_tasks=n_ranges,
            tasks=len(ranges),
            arrays={a.name: a.to_json() for a in arrays},
            **(info or {}),
        )

    def done_ranges(self, member: str) -> set[int]:
        d = self.path / DONE_DIR / member
        return {int(p.stem) for p in d.glob("*.json")} if d.is_dir() else set()

    def _bucket_array(self, member: str, k: int, name: str):
        """Array `name` of bucket k, checked against the manifest (shape, dtype): a zarr.json that
        is damaged, or another array's, is named."""
        rel = f"{member}/{self.layout.buckets[k].name}/{name}"
        try:
            a = self.group[rel]
            spec = (self.member_info(member) or {}).get("arrays", {}).get(name)
            if spec is not None:
                want = ArraySpec(name, spec["dtype"], tuple(spec["row"]), spec["image"])
                shape = tuple(want.geometry(self.layout.buckets[k], self.layout.tile)["shape"])
                if (
                    not isinstance(a, zarr.Array)
                    or tuple(a.shape) != shape
                    or np.dtype(a.dtype) != np.dtype(want.zarr_dtype())
                ):
                    raise ValueError(
                        f"expected an array of shape {shape} and dtype {want.zarr_dtype()}, found "
                        f"{type(a).__name__} {getattr(a, 'shape', '')} {getattr(a, 'dtype', '')}"
                    )
            return a
        except Exception as e:  # zarr: a damaged, missing or misplaced zarr.json
            raise DamagedFile(
                f"{self.path}: cannot open array {rel} ({type(e).__name__}: {e}); its zarr.json is "
                f"damaged, missing or another array's: run `python -m stores verify` / `repair`, or "
                f"pull the store again"
            ) from None

    def write_shard(
        self, member: str, start: int, stop: int, data: dict, stage: Path | None = None
    ) -> dict[str, str]:
        """Write one whole shard [start, stop) of every array in `data`; returns their sha256.

        Image arrays take a list of (h, w, C) arrays at each sample's valid size (None or an
        empty array for an excluded sample), pasted on the bucket's canvas; the others take
        (stop - start, *row) arrays. With `stage` (`staging`: a lease generation's folder) the
        shard goes there, and into the arrays only once a done marker names that generation."""
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
                raise StoreError(
                    f"{member}/{name}: shard [{start}, {stop}) got {len(values)} samples"
                )
            spec = specs[name]
            if spec["dtype"] == TEXT:
                values = encode_text(values, spec["row"][0], f"{self.path.name}: {member}/{name}")
            elif spec["image"]:
                canvas = np.zeros((r1 - r0, *bucket.hw, spec["row"][0]), spec["dtype"])
                for j, v in enumerate(values):
                    if v is not None and v.size:
                        canvas[j, : v.shape[0], : v.shape[1]] = v
                values = canvas
            values = np.ascontiguousarray(values)
            out = (
                self._bucket_array(member, k, name)
                if stage is None
                else self._staged_array(stage, member, k, name)
            )
            out[r0:r1] = values
            hashes[name] = digest(values)
        return hashes

    def mark_done(
        self,
        member: str,
        ri: int,
        hashes: dict[int, dict],
        stats: dict,
        generation: int | None = None,
        stage: Path | None = None,
        made_by: dict | None = None,
    ) -> bool:
        """The done marker of a range, written last and only once: `hashes` {shard start: {array:
        sha256}}; `generation`: the lease generation whose staged shards it vouches for (None:
        written in place); `made_by`: the writer's device and arch (provenance, never checked).
        False if the range already had one (another writer finished it first)."""
        by_array: dict[str, dict] = {}
        for lo, h in hashes.items():
            for name, sha in h.items():
                by_array.setdefault(name, {})[str(lo)] = sha
        start, stop = self.ranges(member)[ri]
        base = (
            self.path
            if generation is None
            else Path(stage or self.staging(start, stop, generation))
        )
        check_inside(self.path, self.done_path(member, ri))
        files = {
            name: {lo: fingerprint(base / self.shard_file(member, name, int(lo))) for lo in shards}
            for name, shards in by_array.items()
        }
        generation = (
            {} if generation is None else {"generation": int(generation), "stage": base.name}
        )
        return write_json_once(
            self.done_path(member, ri),
            {
                "task": ri,
                "samples": [start, stop],
                "shards": by_array,
                "files": files,
                "finished": utc_now(),
                "stats": shareable(stats),
                **generation,
                **({"made_by": shareable(made_by)} if made_by else {}),
            },
        )  # reasons may name $HOME files

    def shard_file(self, member: str, name: str, lo: int) -> str:
        """The file (relative to the store) of array `name`'s shard that starts at sample `lo`."""
        k, row = self.layout.locate(lo)
        return shard_file(
            self.layout, member, name, self.member_info(member)["arrays"][name], k, row
        )

    def marker(self, member: str, ri: int) -> dict | None:
        """Range `ri`'s done marker (None: none), checked to be that range's: a marker copied or
        swapped from another range raises DamagedFile naming it."""
        path = self.done_path(member, ri)
        try:
            m = read_json(path)
        except FileNotFoundError:
            return None
        want = self.ranges(member)[ri]
        if (
            not isinstance(m, dict)
            or m.get("task") != ri
            or m.get("samples") != list(want)
            or not _marker_shaped(m)
        ):
            raise DamagedFile(
                f"{path}: not the done marker of range {ri} (samples {want[0]}-{want[1] - 1}) of "
                f"{member}: damaged or moved; run `python -m stores repair {self.path}`"
            )
        return m

    def done_path(self, member: str, ri: int) -> Path:
        return self.path / DONE_DIR / member / f"{ri:05d}.json"

    # -- staging: a shard is published only by its lease generation's done marker ---------------
    def staging(self, start: int, stop: int, generation: int, token: str | None = None) -> Path:
        """The folder of the shards written under lease `generation` of the range [start, stop)
        by the writer `token` (its lease owner id: generation numbers are per store, so a done
        marker pulled from another store may name the same generation; the token tells them apart)."""
        name = f"{int(generation):08d}" + (f"-{re.sub(r'[^0-9a-f]', '', token)}" if token else "")
        return self.path / STAGING_DIR / f"{int(start)}-{int(stop)}" / name

    def _staged_array(self, stage: Path, member: str, k: int, name: str):
        """The array `member/<bucket>/name` inside `stage`: the member's metadata, so its chunk
        files have the same names, written even when all fill (publishing must replace every shard)."""
        rel = f"{member}/{self.layout.buckets[k].name}/{name}"
        check_inside(self.path, stage / rel / "zarr.json")
        if not (stage / rel / "zarr.json").is_file():
            (stage / rel).mkdir(parents=True, exist_ok=True)
            with atomic_path(stage / rel / "zarr.json") as tmp:
                shutil.copyfile(self.path / rel / "zarr.json", tmp)
        return zarr.open_array(
            str(stage / rel), mode="r+", zarr_format=3, config={"write_empty_chunks": True}
        )

    def publish(self, member: str, ri: int) -> None:
        """Move the staged shards of the generation that range's done marker names into the
        member's arrays (any process may, any number of times: those files never change, and
        each is moved once). Nothing else ever replaces a shard of a range with a marker, so a late
        writer's bytes, even different ones, never land. No marker, or none naming a generation
        (written in place: older stores), leaves everything as it is."""
        marker = self.marker(member, ri)
        if marker is None or marker.get("generation") is None:
            return
        src = self.marked_stage(marker) / member
        check_inside(self.path, src)
        for f in sorted(src.rglob("*")) if src.is_dir() else []:
            rel = f.relative_to(src)
            if (
                len(rel.parts) > 3
                and rel.parts[2] == "c"
                and all(p.isdigit() for p in rel.parts[3:])
                and f.is_file()
                and not f.is_symlink()
            ):
                check_inside(self.path, self.path / member / rel)
                (self.path / member / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(f, self.path / member / rel)
                except FileNotFoundError:  # another process moved it first
                    pass
        if (
            src.is_dir()
        ):  # a shard the marker vouches for as never written (all fill): no older file may stay
            for name, shards in marker.get("files", {}).items():
                for lo, want in shards.items():
                    if want is None:
                        old = self.path / self.shard_file(member, name, int(lo))
                        check_inside(self.path, old)
                        old.unlink(missing_ok=True)
        shutil.rmtree(src, ignore_errors=True)

    def marked_stage(self, marker: dict) -> Path:
        """The staging folder a done marker vouches for: its `stage` (a generation and the writer's
        token), or its generation alone (markers written before tokens)."""
        a, b = marker["samples"]
        stage = marker.get("stage", f"{marker['generation']:08d}")
        if not re.fullmatch(r"[0-9]{8}(-[0-9a-f]{1,64})?", str(stage)):
            raise DamagedFile(
                f"{self.path}: a done marker of samples {a}-{b - 1} names staging folder {stage!r}, "
                f"not one this tool writes: damaged; run `python -m stores repair {self.path}`"
            )
        return self.path / STAGING_DIR / f"{int(a)}-{int(b)}" / stage

    def settle(self, member: str, ri: int, stage: Path) -> None:
        """After a writer's done marker, or its lost lease: publish what the range's marker vouches
        for and drop this writer's staged copy (published now, or superseded)."""
        self.publish(member, ri)
        check_inside(self.path, Path(stage) / member)
        shutil.rmtree(Path(stage) / member, ignore_errors=True)

    def write_range(self, member: str, ri: int, data: dict, stats: dict) -> None:
        """Write one range's whole shards of every array of `member` (values of all its samples,
        as write_shard takes them), then its done marker last."""
        start, stop = self.ranges(member)[ri]
        t0, hashes = time.perf_counter(), {}
        for _, lo, hi in self.shards_of(start, stop):
            hashes[lo] = self.write_shard(
                member, lo, hi, {k: v[lo - start : hi - start] for k, v in data.items()}
            )
        self.mark_done(member, ri, hashes, {**stats, "seconds_write": time.perf_counter() - t0})

    def shards_of(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(bucket number, start, stop) of the shards inside [start, stop)."""
        return self.layout.shards_of(start, stop)

    def finalize(self, member: str) -> dict:
        """Publish what each done marker vouches for (a writer may have died before moving it),
        verify every shard against the markers, then mark the member complete."""
        self.refresh()
        missing = sorted(set(range(len(self.ranges(member)))) - self.done_ranges(member))
        if missing:
            raise StoreError(f"{self.path}: member {member} is missing ranges {missing}")
        for ri in sorted(self.done_ranges(member)):
            self.publish(member, ri)
        problems = self.verify(member)
        if problems:
            raise StoreError(
                f"{self.path}: member {member} failed verification: " + "; ".join(problems)
            )
        nbytes = dir_bytes(self.path / member)
        records = shareable(
            {"member": member, **{f: self.range_records(member, f) for f in ("excluded", "notes")}}
        )
        with store_lock(self.path):
            if self.refresh()["members"][member].get("status") == "complete":
                return self.member_info(member)  # another writer finalised it: never written again
            check_inside(self.path, self.path / records_file(member))
            write_json_atomic(self.path / records_file(member), records)
            self._update_member(
                member,
                status="complete",
                bytes=nbytes,
                completed=utc_now(),
                **{f"n_{f}": len(v) for f, v in records.items()},
                **self.range_provenance(member),
            )
        return self.member_info(member)

    def records(self, member: str) -> dict:
        """A complete member's excluded samples and conversion notes: {"excluded": [...], "notes": [...]}.
        A complete member without its records file (lost by a partial copy) raises: read as empty,
        its excluded samples would come back."""
        path = self.path / records_file(member)
        if path.is_file():
            rec = read_json(path)
            if (
                not isinstance(rec, dict)
                or not all(isinstance(rec.get(f), list) for f in ("excluded", "notes"))
                or rec.get("member", member) != member
            ):
                raise DamagedFile(
                    f"{path}: not the records of member {member} (damaged or another file's); run "
                    f"`python -m stores repair {self.path}` to rewrite them from its done markers"
                )
            return rec
        if self.status(member) == "complete":
            raise StoreError(
                f"{path}: records of complete member {member} missing (lost by a partial copy or "
                f"sync?); run `python -m stores repair {self.path}` to rewrite them from its done "
                f"markers, or pull the store again"
            )
        return {"excluded": [], "notes": []}

    def rewrite_records(self, member: str) -> None:
        """Write a complete member's records again from its done markers (as `finalize` made them)."""
        missing = sorted(set(range(len(self.ranges(member)))) - self.done_ranges(member))
        if missing:
            raise StoreError(
                f"{self.path}: member {member} is missing the done markers of ranges {missing}"
            )
        check_inside(self.path, self.path / records_file(member))
        write_json_atomic(
            self.path / records_file(member),
            shareable(
                {
                    "member": member,
                    **{f: self.range_records(member, f) for f in ("excluded", "notes")},
                }
            ),
        )

    def usable_hw(self, members: list) -> np.ndarray:
        """Valid sizes with (0, 0) for every sample a member excluded (e.g. a non-finite target
        output; samples excluded when loading already have size (0, 0)): readers draw from these."""
        hw = self.array("pairs", "hw")[:].copy()
        for m in members:
            for e in self.records(m)["excluded"]:
                if "index" in e:
                    hw[e["index"]] = 0
        return hw

    def range_provenance(self, member: str) -> dict:
        """{"provenance": ...}: the member's, with the devices and CPU architectures its done
        markers name (the submitting node of `python -m slurm features` begins a member, array tasks compute it on
        others); {} when the member records none (made by an older version: "unknown")."""
        prov = self.member_info(member).get("provenance")
        if not isinstance(prov, dict):
            return {}
        seen: dict[str, set] = {"device": set(), "arch": set()}
        for ri in sorted(self.done_ranges(member)):
            made_by = read_json(self.done_path(member, ri)).get("made_by") or {}
            for field, found in seen.items():
                if made_by.get(field):
                    found.add(str(made_by[field]))
        return {"provenance": {**prov, **{f: ", ".join(sorted(v)) for f, v in seen.items() if v}}}

    def range_records(self, member: str, field: str) -> list:
        """The `field` lists (excluded samples, conversion notes) of all done markers, in order."""
        out = []
        for ri in sorted(self.done_ranges(member)):
            out += read_json(self.done_path(member, ri))["stats"].get(field, [])
        return out

    def shard_checks(self, member: str, damaged=None) -> list[tuple]:
        """(array, recorded sha256, start, stop, range) of every shard the done markers list; a
        damaged marker raises DamagedFile, or is passed to `damaged(ri)` when given."""
        out = []
        for ri in sorted(self.done_ranges(member)):
            try:
                marker = self.marker(member, ri)
            except DamagedFile:
                if damaged is None:
                    raise
                damaged(ri)
                continue
            stops = {a: b for _, a, b in self.shards_of(*marker["samples"])}
            for name, shards in marker["shards"].items():
                out += [
                    (name, want, int(lo), stops.get(int(lo), int(lo)), ri)
                    for lo, want in shards.items()
                ]
        return out

    def check_shard(self, member: str, job: tuple) -> str | None:
        """Re-read one shard (decoding checks each chunk's crc32c); a problem line or None."""
        name, want, lo, hi, *ri = job
        try:
            k, r0 = self.layout.locate(lo)
            got = digest(self._bucket_array(member, k, name)[r0 : r0 + hi - lo])
        except Exception as e:  # a damaged chunk fails its checksum on decode
            return (
                f"{member}/{name} shard [{lo}, {hi}) (samples {lo}-{hi - 1}, file "
                f"{self.shard_file(member, name, lo)}) is unreadable: {type(e).__name__}: {e}"
            )
        if got != want:
            marker = (
                f", or its done marker {self.done_path(member, ri[0]).relative_to(self.path)} is damaged"
                if ri
                else ""
            )
            return (
                f"{member}/{name} shard [{lo}, {hi}) (samples {lo}-{hi - 1}) does not match its recorded hash: "
                f"its file {self.shard_file(member, name, lo)} was damaged or replaced{marker}"
            )
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
            raise StoreError(
                f"{self.path}: member {member} is {status}; run `make features` "
                f"to build or complete it"
            )
        return self._samples(member, name, check=True)

    def _samples(self, member: str, name: str, check: bool = False) -> Samples:
        spec = self.member_info(member)["arrays"].get(name)
        if spec is None:
            raise StoreError(f"{self.path}: member {member} has no array {name!r}")
        parts = [self._bucket_array(member, k, name) for k in range(len(self.layout.buckets))]
        return Samples(
            self.layout,
            spec,
            parts,
            self.presence_check(member, name) if check else None,
            f"{self.path}: {member}/{name}",
        )

    def presence_check(self, member: str, name: str):
        """`check(k, row)` for Samples: the shard file of that row exists, or its done marker
        vouches that it holds only zeros (which zarr never writes); else StoreError naming it and
        the repair. Each shard is looked at once (a stat) per Samples: reads stay fast."""
        info, seen, markers = self.member_info(member), set(), {}

        def check(k: int, row: int) -> None:
            b = self.layout.buckets[k]
            lo = b.start + row // b.shard_len * b.shard_len
            if (k, lo) in seen:
                return
            rel = shard_file(self.layout, member, name, info["arrays"][name], k, row)
            hi = min(lo + b.shard_len, b.start + b.count)
            ri = range_of(self.layout, info, lo)
            if ri not in markers:
                markers[ri] = self.marker(member, ri)
            marker = markers[ri]
            want = ((marker or {}).get("files", {}).get(name) or {}).get(str(lo), "unrecorded")
            if want != "unrecorded":  # done markers since fingerprints: the very file written
                got = fingerprint(self.path / rel)
                if got != want:
                    raise DamagedFile(
                        f"{self.path}: member {member} is complete but its shard file {rel} (samples {lo}-{hi - 1}) "
                        f"is {'missing' if got is None else 'not the file written'} (size:crc32c {got}, its done "
                        f"marker {self.done_path(member, ri).relative_to(self.path)} vouches for {want}): lost, "
                        f"replaced or swapped; run `python -m stores repair {self.path}` to recompute it, or pull "
                        f"the store again"
                    )
            elif not (self.path / rel).is_file() and not absent_is_vouched(
                self.layout, info, name, k, lo, hi, marker
            ):
                raise StoreError(
                    f"{self.path}: member {member} is complete but its shard file {rel} (samples "
                    f"{lo}-{hi - 1}) is missing (lost by a partial copy or sync?); run `python -m "
                    f"stores repair {self.path}` to recompute it, or pull the store again"
                )
            seen.add((k, lo))

        return check

    def members(self, prefix: str) -> list[str]:
        """Complete members under `targets` or `osf`, sorted."""
        return sorted(
            m
            for m, i in self.manifest()["members"].items()
            if m.startswith(prefix + "/") and i.get("status") == "complete"
        )

    def pick(self, kind: str, name: str | None) -> str:
        """The complete member of `kind` that `name` means (`match_member`)."""
        return match_member(self.members(kind), kind, name, self.path)


def utc_now() -> str:
    """The time stamp of every record a store writes (manifest, done markers, exports): UTC,
    ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
