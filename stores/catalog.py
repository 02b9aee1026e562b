"""What a root of stores holds, read from manifests only: `python -m stores ls|info` on a local
folder, a shared path or `s3://bucket/prefix`, and `python -m stores catalog`.

A remote store is described by its `manifest.json` and a listing of its done markers (names, not
contents): no array data is read, so listing a team's root costs a few KB per store. Each store is
compared with the local store root (`--local`, default data/stores): whether a copy is there and
which of its members are complete with the same keys.
"""
from __future__ import annotations

import json
import posixpath
from pathlib import Path

from .privacy import scrub
from .remote import Location, open_location, plain_errors, read_manifest
from .store import DONE_DIR, MANIFEST, Store, StoreError, check_member_name, check_schema


def is_url(root) -> bool:
    return "://" in str(root)


def local_done(store: Store, members) -> dict[str, int]:
    return {m: len(store.done_tasks(m)) for m in members}


def remote_done(loc: Location, members) -> dict[str, int]:
    """Done markers per member, from one listing of `_done/` (no file is read)."""
    prefix = loc.path(DONE_DIR)
    found = loc.fs.find(prefix) if loc.fs.exists(prefix) else []
    counts = dict.fromkeys(members, 0)
    for p in found:
        member = posixpath.dirname(posixpath.relpath(p, prefix))
        if member in counts and p.endswith(".json") and not posixpath.basename(p).startswith("."):
            counts[member] += 1
    return counts


def with_status(manifest: dict, done: dict[str, int]) -> dict:
    """The manifest with each member's `tasks_done` and status recomputed from its done markers."""
    for name, info in manifest["members"].items():
        info["tasks_done"] = f"{done.get(name, 0)}/{info.get('tasks', 0)}"
        if info.get("status") == "complete" and done.get(name, 0) != info.get("tasks", 0):
            info["status"] = "damaged"
    return manifest


def read_store(path) -> dict:
    """A store's manifest with recomputed status, from a local path or a URL (manifest and a
    listing only)."""
    if not is_url(path):
        store = Store(path)
        return with_status(store.manifest(), local_done(store, store.manifest()["members"]))
    with plain_errors(str(path)):
        loc = open_location(str(path))
        m = json.loads(read_manifest(loc))
    check_schema(loc.url, m)
    for member in m["members"]:
        check_member_name(loc.url, member)
    with plain_errors(str(path)):
        return with_status(m, remote_done(loc, m["members"]))


def store_paths(root) -> list[str]:
    """The stores (folders holding a manifest.json) directly under `root`, sorted."""
    if not is_url(root):
        return [str(p.parent) for p in sorted(Path(root).glob(f"*/{MANIFEST}"))]
    with plain_errors(str(root)):
        loc = open_location(str(root))
        loc.fs.invalidate_cache()
        found = loc.fs.glob(loc.path(f"*/{MANIFEST}"))
        return sorted(loc.child(posixpath.basename(posixpath.dirname(p))).url for p in found)


def local_copy(local_root, name: str, manifest: dict) -> dict:
    """Whether `local_root/name` holds the store, and each member's status there (with the same key)."""
    path = Path(local_root) / name
    if not (path / MANIFEST).is_file():
        return {"path": str(path), "exists": False, "complete": False, "members": {}}
    try:
        mine = read_store(path)["members"]
    except StoreError as e:
        return {"path": str(path), "exists": True, "complete": False, "members": {}, "error": scrub(str(e))}
    members = {}
    for m, info in manifest["members"].items():
        got = mine.get(m)
        members[m] = "missing" if got is None else "other key" if got.get("key") != info.get("key") \
            else got.get("status", "incomplete")
    wanted = [m for m, i in manifest["members"].items() if i.get("status") == "complete"]
    return {"path": str(path), "exists": True, "complete": all(members[m] == "complete" for m in wanted),
            "members": members}


def same_folder(a, b) -> bool:
    return not is_url(a) and not is_url(b) and Path(a).resolve() == Path(b).resolve()


def summary(path: str, manifest: dict, local_root=None) -> dict:
    """One row of `ls`: the store, its members (status, short key, weights, bytes, provenance)."""
    name = posixpath.basename(str(path).rstrip("/"))
    row = {"store": name, "path": str(path), "created": manifest.get("created"),
           "members": {m: i.get("status", "incomplete") for m, i in manifest["members"].items()},
           "details": {m: {"status": i.get("status", "incomplete"), "key": str(i.get("key", ""))[:12],
                           "weights": i.get("weights"), "bytes": i.get("bytes"), "tasks_done": i.get("tasks_done"),
                           "completed": i.get("completed"), "provenance": i.get("provenance")}
                       for m, i in manifest["members"].items()}}
    if local_root is not None and not same_folder(posixpath.dirname(str(path).rstrip("/")), local_root):
        row["local"] = local_copy(local_root, name, manifest)
    return row


def list_root(root, local_root=None) -> list[dict]:
    """A row per store under `root` (one damaged store is named; the others are still listed)."""
    rows = []
    for path in store_paths(root):
        try:
            rows.append(summary(path, read_store(path), local_root))
        except StoreError as e:
            rows.append({"store": posixpath.basename(path), "path": path, "members": {}, "error": scrub(str(e))})
    return rows
