"""Coordination between writers of one store: task leases and the manifest lock.

Two users running the same extraction at once never write the same shards: each task range is
claimed with a lease file (`_leases/<start>-<stop>.json`, created exclusively) that its owner
renews while it works; a lease not renewed for `ttl` seconds (its owner died) is taken over.
Manifest updates happen under `_locks/manifest.lock`. `python -m stores gc` removes expired
leases and stale locks.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

LEASE_DIR, LOCK_DIR = "_leases", "_locks"
STALE_LOCK_SECONDS = 60.0
_held = threading.local()


def _create_exclusive(path: Path, payload: dict) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _retire(path: Path) -> bool:
    """Move an expired file aside atomically; only one of several contenders succeeds."""
    try:
        os.rename(path, path.with_name(f".{path.name}.expired-{uuid.uuid4().hex[:8]}"))
        return True
    except FileNotFoundError:
        return False


@contextmanager
def store_lock(store_path, timeout: float = 120.0):
    """Exclusive lock on a store's manifest (re-entrant within a thread)."""
    key = str(Path(store_path).resolve())
    depth = getattr(_held, "locks", {})
    _held.locks = depth
    if depth.get(key):
        depth[key] += 1
        try:
            yield
        finally:
            depth[key] -= 1
        return
    lock = Path(store_path) / LOCK_DIR / "manifest.lock"
    deadline = time.time() + timeout
    while not _create_exclusive(lock, {"owner": owner_id(), "since": time.time()}):
        if _age(lock) > STALE_LOCK_SECONDS:
            _retire(lock)
        elif time.time() > deadline:
            raise TimeoutError(f"{store_path}: manifest lock held for over {timeout:.0f} s by {lock.read_text()}")
        time.sleep(0.02)
    depth[key] = 1
    try:
        yield
    finally:
        depth[key] = 0
        lock.unlink(missing_ok=True)


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Leases:
    """Task leases of one writer on one store, renewed by a heartbeat thread while held."""

    def __init__(self, store_path, ttl: float = 120.0):
        self.dir = Path(store_path) / LEASE_DIR
        self.ttl = ttl
        self.owner = f"{owner_id()}:{uuid.uuid4().hex[:8]}"
        self.held: set[Path] = set()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._renew, daemon=True)

    def __enter__(self) -> "Leases":
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join()
        for path in list(self.held):
            self._drop(path)

    def _path(self, r) -> Path:
        return self.dir / f"{r[0]}-{r[1]}.json"

    def claim(self, r) -> bool:
        """True if this writer now holds range r (free, already ours, or expired and taken over)."""
        path = self._path(r)
        if path in self.held:
            return True
        payload = {"owner": self.owner, "ttl": self.ttl}
        if not _create_exclusive(path, payload):
            if _age(path) <= self.ttl or not _retire(path) or not _create_exclusive(path, payload):
                return False
        self.held.add(path)
        return True

    def release(self, r) -> None:
        self._drop(self._path(r))

    def _drop(self, path: Path) -> None:
        if path in self.held:
            self.held.discard(path)
            path.unlink(missing_ok=True)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            for path in list(self.held):
                try:
                    os.utime(path)
                except FileNotFoundError:
                    pass

