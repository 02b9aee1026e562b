"""Copy a store between local disk and a shared location: `python -m stores push|pull SRC DST`.

SRC and DST are local paths, shared-filesystem paths or `s3://bucket/prefix` URLs (any fsspec
URL works). DST is the folder the store goes into, or the store's own path when its last part is
the store's name: `push data/stores/X s3://team/stores` writes `s3://team/stores/X`.

- Shard file by shard file, several at a time; each file's size and sha256 are compared with the
  source as copied (the destination is read back).
- Resumable: a file already at the destination with the source's size and sha256 is skipped.
- Never a partial store under the final name. A store is a store only once `manifest.json`
  exists (`Store()` refuses a folder without one), so `manifest.json` is always written last,
  after every member's done markers are checked at the destination. Locally a new store is
  assembled in `.partial-<name>-<uuid>/` beside the final name and renamed into place; a rerun
  picks the partial folder up again. On S3 (no rename) files go to the final prefix directly,
  manifest last: an interrupted push leaves a prefix without `manifest.json`, which is no store.
- Only complete members are copied unless `include_incomplete`; the others are named and left out
  of the copied manifest.
- Copying onto an existing store (same pairs key) updates it in place: new members' files first,
  then the manifest, merged with the destination's as read at that moment, under the store's
  manifest lock for a local or shared-filesystem destination: members that writers began or
  finished meanwhile are kept. Another store there is refused.
- Locally, copies creating the same new store take turns (`.<name>.lock` beside it); the
  later one updates the store the first made. A writer (`make features`) that creates the store
  during a copy is met the same way: the copy then updates that store and drops its partial folder.
- Credentials are never passed around here: s3fs/botocore read them from the environment
  (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or ~/.aws; the endpoint comes from
  `endpoint_url`, S3_ENDPOINT_URL or AWS_ENDPOINT_URL. Error messages are scrubbed of them.
On S3 (no locks) the manifest is re-read just before it is written: one copy at a time per S3 store.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from common.privacy import scrub, strip_url_credentials

from .files import new_file
from .layout import Layout
from .leases import file_lock, store_lock
from .store import (
    DONE_DIR,
    MANIFEST,
    RECORDS_DIR,
    SOURCES_DIR,
    StoreError,
    check_member_name,
    lost_shards,
    records_file,
    shard_file,
)

log = logging.getLogger(__name__)

BLOCK = 8 << 20
CREDENTIALS_HINT = (
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or ~/.aws/credentials) and the "
    "endpoint (--endpoint-url, S3_ENDPOINT_URL or AWS_ENDPOINT_URL)"
)


class RemoteError(StoreError):
    """A copy could not be done or did not verify; the message never holds a credential."""


def storage_options(url: str, endpoint_url: str | None = None) -> dict:
    """fsspec options for `url`: for s3:// only the endpoint; credentials are left to botocore."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    endpoint = (
        endpoint_url or os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    )
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


@dataclass
class Location:
    """A folder on some filesystem: `fs`, its path there `root`, and the `url` shown to people."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def child(self, name: str) -> "Location":
        return Location(self.fs, self.path(name), self.url.rstrip("/") + "/" + name)


def open_location(url: str, endpoint_url: str | None = None) -> Location:
    """The filesystem and path of a local path or URL, with storage options from the environment."""
    url = str(url)
    fs, root = fsspec.core.url_to_fs(url, **storage_options(url, endpoint_url))
    if isinstance(fs, LocalFileSystem):
        root = os.path.abspath(root)
    return Location(
        fs, root.rstrip("/"), strip_url_credentials(url.rstrip("/"))
    )  # url: shown to people


def list_files(loc: Location) -> dict[str, int]:
    """{relative path: size} of every file under `loc`, leaving out hidden (temporary) names."""
    loc.fs.invalidate_cache()
    if not loc.fs.exists(loc.root):
        return {}
    found = loc.fs.find(loc.root, detail=True)
    out = {}
    for path, info in found.items():
        rel = posixpath.relpath(path, loc.root)
        if info.get("type") == "file" and not is_temporary(rel):
            out[rel] = int(info["size"])
    return out


def is_temporary(rel: str) -> bool:
    """Hidden names (our temporary files) and zarr's `*.partial` files (a write in progress, or
    left by a killed one): never part of a store, never copied."""
    return any(p.startswith(".") for p in rel.split("/")) or rel.endswith(".partial")


def file_sha256(loc: Location, rel: str) -> tuple[int, str]:
    """(size, sha256) of one file, read in blocks."""
    h, size = hashlib.sha256(), 0
    with loc.fs.open(loc.path(rel), "rb", block_size=BLOCK) as f:
        while block := f.read(BLOCK):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def write_file(dst: Location, rel: str, chunks) -> None:
    """Write the byte blocks `chunks` to `rel`; locally through a temporary name and a rename."""
    path = dst.path(rel)
    if dst.local:  # never on S3, where makedirs would create a missing bucket
        dst.fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = posixpath.join(
        posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:8]}"
    )
    try:  # locally a new file, never written through a link planted by someone else
        with new_file(tmp, "wb") if dst.local else dst.fs.open(path, "wb", block_size=BLOCK) as f:
            for block in chunks:
                f.write(block)
        if dst.local:
            os.replace(tmp, path)
    finally:
        if dst.local and os.path.exists(tmp):
            os.unlink(tmp)


class Copier:
    """Copies files from `src` to `dst`, verifying each; counts what it copied and skipped."""

    def __init__(self, src: Location, dst: Location, present: dict[str, int]):
        self.src, self.dst, self.present = src, dst, present
        self.copied = self.skipped = self.bytes = 0
        self.lock = threading.Lock()
        self.stopped = False

    def run(self, items: list[tuple[str, int]], jobs: int) -> None:
        """Copy `items` with `jobs` threads; the first error cancels what has not started."""
        pool = ThreadPoolExecutor(max(1, jobs))
        try:
            for f in as_completed([pool.submit(self, it) for it in items]):
                f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def __call__(self, item: tuple[str, int]) -> None:
        """Copy one file (or skip it if already there); after any failure, copy nothing more."""
        if self.stopped:
            return
        try:
            self.copy(*item)
        except BaseException:
            self.stopped = True
            raise

    def copy(self, rel: str, size: int) -> None:
        if self.present.get(rel) == size and file_sha256(self.dst, rel) == file_sha256(
            self.src, rel
        ):
            with self.lock:
                self.skipped += 1
            return
        h, n = hashlib.sha256(), 0

        def blocks():
            nonlocal n
            with self.src.fs.open(self.src.path(rel), "rb", block_size=BLOCK) as f:
                while block := f.read(BLOCK):
                    h.update(block)
                    n += len(block)
                    yield block

        write_file(self.dst, rel, blocks())
        self.check(rel, size, n, h.hexdigest())

    def check(self, rel: str, size: int, n: int, sha: str) -> None:
        if n != size:
            raise RemoteError(
                f"{self.src.url}/{rel}: read {n} bytes, listed as {size}; the source "
                f"changed during the copy"
            )
        got = file_sha256(self.dst, rel)
        if got != (size, sha):
            raise RemoteError(
                f"{self.dst.url}/{rel}: copy does not verify: expected {size} bytes with "
                f"sha256 {sha[:16]}, found {got[0]} bytes with sha256 {got[1][:16]}"
            )
        with self.lock:
            self.copied += 1
            self.bytes += size


def select(
    manifest: dict, files: dict[str, int], include_incomplete: bool
) -> tuple[list, dict, dict]:
    """(members to copy, {left-out member: status}, {file: size} to copy). The copied files are the
    Zarr group metadata above the members, the members' arrays, done markers and records, and the
    source records (`_sources/`); manifest.json is written separately, last."""
    members = manifest.get("members", {})
    keep = [m for m, i in members.items() if include_incomplete or i.get("status") == "complete"]
    left_out = {m: i.get("status", "incomplete") for m, i in members.items() if m not in keep}
    groups = {"zarr.json"} | {f"{posixpath.dirname(m)}/zarr.json" for m in keep if "/" in m}
    prefixes = (
        tuple(f"{m}/" for m in keep)
        + tuple(f"{DONE_DIR}/{m}/" for m in keep)
        + (f"{SOURCES_DIR}/",)
    )
    records = {f"{RECORDS_DIR}/{m.replace('/', '__')}.json" for m in keep}
    chosen = {
        rel: size
        for rel, size in files.items()
        if rel in groups or rel in records or (rel.startswith(prefixes) and rel != MANIFEST)
    }
    return keep, left_out, chosen


def check_done_markers(src_files, dst_files, manifest: dict, keep: list, where: str) -> None:
    """Every copied member has its source's done markers at the destination, and a complete member
    has one for each of its ranges."""
    problems = []
    for m in keep:
        prefix = f"{DONE_DIR}/{m}/"
        want = {r for r in src_files if r.startswith(prefix)}
        if manifest["members"][m].get("status") == "complete":
            want |= {f"{prefix}{t:05d}.json" for t in range(manifest["members"][m].get("tasks", 0))}
        missing = sorted(want - set(dst_files))
        if missing:
            problems.append(f"{m}: {len(missing)} done marker(s) missing, e.g. {missing[0]}")
    if problems:
        raise RemoteError(f"{where}: copy incomplete, manifest not written: " + "; ".join(problems))


def missing_files(loc: Location, files: dict, manifest: dict, keep: list) -> list[str]:
    """What the complete members of `keep` need that `files` (a listing of `loc`) lacks: their
    done markers, records, and every shard whose done marker records data (`lost_shards`)."""
    layout, out = Layout.from_json(manifest["layout"]), []
    for m in keep:
        info = manifest["members"][m]
        if info.get("status") != "complete":
            continue
        markers = [
            f"{DONE_DIR}/{m}/{t:05d}.json" for t in range(len(layout.ranges(info.get("n_tasks"))))
        ]
        out += [rel for rel in (*markers, records_file(m)) if rel not in files]

        def marker(t, m=m, info=info):
            rel = f"{DONE_DIR}/{m}/{t:05d}.json"
            if rel not in files:
                return None
            try:
                got = json.loads(loc.fs.cat_file(loc.path(rel)))
                if (
                    not isinstance(got, dict)
                    or got.get("task") != t
                    or not set((got.get("files") or {}) | (got.get("shards") or {}))
                    <= set(info["arrays"])
                ):
                    raise ValueError(f"not the done marker of range {t} of {m}")
            except (ValueError, UnicodeDecodeError, TypeError, AttributeError) as e:
                raise RemoteError(
                    f"{loc.url}/{rel}: damaged ({type(e).__name__}: {e}); nothing copied: repair the "
                    f"store where it was built (`python -m stores repair STORE`) and copy it again"
                ) from None
            return got

        out += lost_shards(layout, info, m, files.__contains__, marker)
        out += resized_shards(layout, info, m, files, marker)
    return out


def resized_shards(layout: Layout, info: dict, member: str, files: dict, marker) -> list[str]:
    """Shard files whose size (from the listing: nothing is read) differs from the one their done
    marker recorded (truncated, or replaced by another file)."""
    out = []
    for t in range(len(layout.ranges(info.get("n_tasks")))):
        for name, shards in ((marker(t) or {}).get("files") or {}).items():
            for lo, fp in shards.items():
                k, row = layout.locate(int(lo))
                rel = shard_file(layout, member, name, info["arrays"][name], k, row)
                if isinstance(fp, str) and rel in files and files[rel] != int(fp.split(":")[0]):
                    out.append(rel)
    return out


def check_complete(
    loc: Location, files: dict, manifest: dict, keep: list, copied: dict | None = None
) -> None:
    """Refuse (RemoteError naming the files) a source whose complete members lack files, or, given
    `copied` ({file: size} copied), a destination where one of them did not arrive whole."""
    missing = missing_files(loc, files, manifest, keep)
    missing += sorted(rel for rel, size in (copied or {}).items() if files.get(rel) != size)
    if not missing:
        return
    names = ", ".join(sorted(set(missing))[:5]) + (", ..." if len(set(missing)) > 5 else "")
    if copied is None:
        raise RemoteError(
            f"{loc.url}: {len(set(missing))} file(s) of complete members missing ({names}): lost "
            f"by a partial copy or sync? Nothing copied; repair the store where it was built "
            f"(`python -m stores repair STORE`) and copy it again"
        )
    raise RemoteError(
        f"{loc.url}: copy incomplete, manifest not written: {len(set(missing))} file(s) missing "
        f"or of the wrong size ({names}); run the copy again"
    )


def read_manifest(loc: Location, source: bool = True) -> bytes:
    """The raw bytes of `loc`'s manifest.json, checked to be a manifest (a copy's source must have
    its layout too); a folder without one is no store."""
    try:
        raw = loc.fs.cat_file(loc.path(MANIFEST))
    except FileNotFoundError:
        raise RemoteError(
            f"{loc.url}: not a feature store (no {MANIFEST}; a store without it is "
            f"unfinished or not a store)"
        ) from None
    try:
        m = json.loads(raw)
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("members"), dict)
            or (source and "layout" not in m)
        ):
            raise ValueError(
                "not a manifest object with 'members'" + (" and 'layout'" if source else "")
            )
    except (ValueError, UnicodeDecodeError) as e:
        raise RemoteError(
            f"{loc.url}/{MANIFEST}: damaged ({type(e).__name__}: {e}); nothing copied: copy the "
            f"store from an intact source"
        ) from None
    return raw


def manifest_bytes(src: dict, raw: bytes, keep: list, old: dict | None) -> bytes:
    """The destination's manifest: the source's, less left-out members, plus members only the
    destination has (`old`: read just now, under the lock; an update adds members, never drops any)."""
    extra = {m: i for m, i in (old or {}).get("members", {}).items() if m not in keep}
    if set(keep) == set(src["members"]) and not extra:
        return raw
    members = {**extra, **{m: src["members"][m] for m in keep}}
    return json.dumps({**src, "members": members}, indent=1, sort_keys=True).encode()


def partial_location(final: Location) -> Location:
    """The `.partial-<name>-<uuid>` folder beside a new local store: an earlier one, or a new one."""
    parent, name = posixpath.split(final.root)
    final.fs.makedirs(parent, exist_ok=True)
    old = sorted(
        final.fs.glob(posixpath.join(parent, f".partial-{name}-*")),
        key=lambda p: final.fs.info(p).get("mtime", 0),
    )
    path = old[-1] if old else posixpath.join(parent, f".partial-{name}-{uuid.uuid4().hex[:12]}")
    return Location(
        final.fs, path, posixpath.join(posixpath.dirname(final.url), posixpath.basename(path))
    )


def final_location(src: Location, dst: Location) -> Location:
    name = posixpath.basename(src.root)
    return dst if posixpath.basename(dst.root) == name else dst.child(name)


@contextmanager
def plain_errors(what: str):
    """Turn filesystem and S3 errors into a RemoteError naming `what`, with no credential in it."""
    try:
        yield
    except RemoteError as e:
        raise RemoteError(scrub(str(e))) from None
    except PermissionError as e:
        raise RemoteError(scrub(f"{what}: access denied ({e}); {CREDENTIALS_HINT}")) from None
    except Exception as e:  # botocore, aiohttp and OS errors, scrubbed of any credential
        hint = f"; {CREDENTIALS_HINT}" if "Credential" in type(e).__name__ else ""
        raise RemoteError(scrub(f"{what}: {type(e).__name__}: {e}{hint}")) from None


def copy_files(
    src: Location, work: Location, manifest: dict, include_incomplete: bool, jobs: int
) -> tuple[list, dict, Copier]:
    """Copy the chosen members' files (largest first), then check their done markers at `work`."""
    src_files = list_files(src)
    keep, left_out, todo = select(manifest, src_files, include_incomplete)
    for m, status in left_out.items():
        log.info(f"  leaving out member {m} ({status}); --include-incomplete copies it too")
    check_complete(src, src_files, manifest, keep)
    copier = Copier(src, work, list_files(work))
    copier.run(sorted(todo.items(), key=lambda kv: (-kv[1], kv[0])), jobs)
    dst_files = list_files(work)
    check_done_markers(src_files, dst_files, manifest, keep, work.url)
    check_complete(work, dst_files, manifest, keep, copied=todo)
    return keep, left_out, copier


def destination_manifest(final: Location, manifest: dict) -> dict | None:
    """The destination's manifest as it is now (None: no store there yet); another store is refused."""
    old = (
        json.loads(read_manifest(final, source=False))
        if final.fs.exists(final.path(MANIFEST))
        else None
    )
    if old and old.get("pairs_key") != manifest.get("pairs_key"):
        raise RemoteError(
            f"{final.url}: holds another store (pairs key {str(old.get('pairs_key'))[:12]}, "
            f"source {str(manifest.get('pairs_key'))[:12]}); nothing copied"
        )
    return old


@contextmanager
def creating(final: Location):
    """Locally, copies that create the same new store take turns (a lock file beside it, held from
    choosing the partial folder to renaming it): a later one finds the store and updates it."""
    if not final.local or final.fs.exists(final.path(MANIFEST)):
        yield
        return
    parent, name = posixpath.split(final.root)
    os.makedirs(parent, exist_ok=True)
    with file_lock(
        posixpath.join(parent, f".{name}.lock"),
        "lock on creating this store",
        final.url,
        timeout=86400,
    ):
        yield


def publish(work: Location, final: Location, manifest: dict, raw: bytes, keep: list) -> bool:
    """Write manifest.json last, merged with the destination's as it is now: locally under the
    manifest lock, so members that writers began or finished meanwhile are kept. Then rename a
    partial folder into place; False if another process created the store there meanwhile."""
    with store_lock(work.root) if work.local and work.root == final.root else nullcontext():
        data = manifest_bytes(manifest, raw, keep, destination_manifest(work, manifest))
        want = (len(data), hashlib.sha256(data).hexdigest())
        if not work.fs.exists(work.path(MANIFEST)) or file_sha256(work, MANIFEST) != want:
            write_file(work, MANIFEST, [data])
            if file_sha256(work, MANIFEST) != want:
                raise RemoteError(f"{work.url}/{MANIFEST}: does not verify after writing")
    if work.root != final.root:
        try:
            os.rename(work.root, final.root)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return False
    return True


def copy_store(
    src_url: str,
    dst_url: str,
    endpoint_url: str | None = None,
    include_incomplete: bool = False,
    jobs: int = 8,
) -> dict:
    """Copy the store at `src_url` into `dst_url` (see the module doc); returns a summary."""
    t0 = time.perf_counter()
    with plain_errors(f"{src_url} -> {dst_url}"):
        src = open_location(src_url, endpoint_url)
        final = final_location(src, open_location(dst_url, endpoint_url))
        raw = read_manifest(src)
        manifest = json.loads(raw)
        for member in manifest[
            "members"
        ]:  # a hostile name never reaches a path or the destination's manifest
            check_member_name(src.url, member)
        destination_manifest(final, manifest)  # refuse another store before copying anything
        with creating(final):
            work = (
                partial_location(final)
                if final.local and not final.fs.exists(final.root)
                else final
            )
            keep, left_out, copier = copy_files(src, work, manifest, include_incomplete, jobs)
            if not publish(
                work, final, manifest, raw, keep
            ):  # a writer created the store meanwhile
                keep, left_out, copier = copy_files(src, final, manifest, include_incomplete, jobs)
                publish(final, final, manifest, raw, keep)
                final.fs.rm(work.root, recursive=True)
    log.info(
        f"{final.url}: {copier.copied} files copied ({copier.bytes / 1e6:.2f} MB), {copier.skipped} "
        f"already present and skipped; members: {', '.join(keep) or 'none'}"
    )
    return {
        "src": src.url,
        "dst": final.url,
        "copied": copier.copied,
        "skipped": copier.skipped,
        "bytes_copied": copier.bytes,
        "members": keep,
        "left_out": left_out,
        "seconds": round(time.perf_counter() - t0, 2),
    }
