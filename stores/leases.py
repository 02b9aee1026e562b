"""Coordination between writers of one store: fenced range leases and the manifest lock.

Range leases (docs/design.md, "Concurrency"): each range has a folder
`_leases/<start>-<stop>/` of generation files `<gen>.json`, each created exclusively (O_EXCL,
which local filesystems, NFSv3+ and Lustre/GPFS honour). The highest generation is the lease; its
owner holds it while no higher generation exists. Taking over an expired lease, or a released one,
is creating generation top+1: of several contenders exactly one create succeeds. The owner's
heartbeat renews its generation file's mtime; a lease counts as expired when this observer has
seen its file unchanged for the `ttl` seconds its holder recorded there (the holder renews at that
pace, whatever the observer's own setting), on the observer's own monotonic clock (no comparison
of clocks across hosts). Renewing, releasing and every check before a shard or a done marker is written
verify that no higher generation exists: a writer that lost its lease (paused past expiry, cut
off) stops before writing that range's done marker and says so.

The manifest lock is an OS lock (fcntl/lockf: POSIX record locks, which Linux forwards to the
server on NFS (lockd or NFSv4) and Lustre mounted with `-o flock`), held on `_locks/manifest.lock`
for the duration of a read-modify-write of manifest.json. The kernel (or the NFS server) releases
it when its holder dies, so it is never taken from a live holder, however slow; the lock file is
never deleted, so releasing it cannot remove another writer's lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from .files import check_inside, open_regular

log = logging.getLogger(__name__)

LEASE_DIR, LOCK_DIR, LOCK_FILE = "_leases", "_locks", "manifest.lock"
_held = threading.local()
_proc_locks: dict[str, threading.RLock] = {}
_proc_guard = threading.Lock()
_SEEN: dict = {}  # lease generation file -> ((mtime_ns, size), monotonic time first seen so)


class LeaseLost(RuntimeError):
    """This writer no longer holds a range's lease: another writer took it over."""


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def create_exclusive(path: Path, payload: dict) -> bool:
    """Create `path` holding `payload` as JSON unless it exists (one winner among contenders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    return True


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
    except OSError:
        return "an unknown process"


@contextmanager
def store_lock(store_path, timeout: float = 300.0):
    """Exclusive lock on a store's manifest (re-entrant within a thread; threads of one process
    exclude each other, processes through the OS lock)."""
    check_inside(store_path, Path(store_path) / LOCK_DIR / LOCK_FILE)
    with file_lock(Path(store_path) / LOCK_DIR / LOCK_FILE, "manifest lock", store_path, timeout):
        yield


@contextmanager
def file_lock(path, what: str, where, timeout: float = 300.0):
    """Exclusive lock held on the file `path` (created if absent, never deleted; a symlink or a
    non-regular file there is refused): re-entrant within a thread, a thread lock between threads,
    an OS lock between processes. Errors say `where`: `what` ...."""
    path = Path(path)
    key = str(path.parent.resolve() / path.name)
    depth = getattr(_held, "locks", None)
    if depth is None:
        depth = _held.locks = {}
    if depth.get(key):
        depth[key] += 1
        try:
            yield
        finally:
            depth[key] -= 1
        return
    with _proc_guard:
        local = _proc_locks.setdefault(key, threading.RLock())
    if not local.acquire(timeout=timeout):
        raise TimeoutError(f"{where}: {what} held by another thread for over {timeout:.0f} s")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise OSError(
                            e.errno,
                            f"{path}: cannot take the {what} ({e.strerror}); on "
                            f"NFS it needs lockd (v3) or v4, on Lustre the flock mount option",
                        ) from e
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{where}: {what} held for over {timeout:.0f} s by "
                            f"{_holder(fd)} (a live process: it is never taken away)"
                        ) from None
                    time.sleep(0.02)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{owner_id()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
            depth[key] = 1
            try:
                yield
            finally:
                depth[key] = 0
                fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        local.release()


def _generations(folder: Path) -> list[int]:
    try:
        return sorted(
            int(p.split(".")[0]) for p in os.listdir(folder) if p.endswith(".json") and p[0] != "."
        )
    except FileNotFoundError:
        return []


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # being written, or cut short by a kill
        return {}


class Leases:
    """Task leases of one writer on one store, renewed by a heartbeat thread while held; a lost
    lease is said as a warning."""

    def __init__(self, store_path, ttl: float = 120.0):
        self.dir = Path(store_path) / LEASE_DIR
        self.ttl = ttl
        self.token = uuid.uuid4().hex[:12]  # this writer's staging folders (Store.staging)
        self.owner = f"{owner_id()}:{self.token[:8]}"
        self.held: dict[tuple, int] = {}  # range -> generation
        self.lost: dict[tuple, str] = {}  # range -> why
        self._seen = _SEEN  # shared by every Leases of this process: a writer retrying keeps its observations
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._renew, daemon=True)

    def __enter__(self) -> "Leases":
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join()
        for r in list(self.held):
            self.release(r)

    def folder(self, r) -> Path:
        return self.dir / f"{int(r[0])}-{int(r[1])}"

    def _gen_path(self, r, gen: int) -> Path:
        path = self.folder(r) / f"{gen:08d}.json"
        check_inside(
            self.dir.parent, path
        )  # no planted link on the way (_leases/, its range folder)
        return path

    def _expired(self, path: Path) -> bool:
        """True once this observer has seen `path` unchanged for the lease time its holder recorded
        (it renews at that pace), or this writer's ttl when none is readable."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        now, sig = time.monotonic(), (st.st_mtime_ns, st.st_size)
        seen = self._seen.get(path)
        if seen is None or seen[0] != sig:
            self._seen[path] = (sig, now)
            return False
        return now - seen[1] > self._holder_ttl(path)

    def _holder_ttl(self, path: Path) -> float:
        ttl = _read(path).get("ttl")
        return float(ttl) if isinstance(ttl, (int, float)) and 0 < ttl < float("inf") else self.ttl

    def claim(self, r) -> bool:
        """True if this writer now holds range r (already ours, free, released, or expired and
        taken over by creating the next generation, which only one contender can)."""
        r = (int(r[0]), int(r[1]))
        if r in self.held:
            return True
        gens = _generations(self.folder(r))
        top = gens[-1] if gens else -1
        if top >= 0:
            path = self._gen_path(r, top)
            if not _read(path).get("released") and not self._expired(path):
                return False
        gen = top + 1
        if not create_exclusive(
            self._gen_path(r, gen),
            {"owner": self.owner, "gen": gen, "ttl": self.ttl, "since": time.time()},
        ):
            return False
        with self._mutex:
            self.held[r] = gen
            self.lost.pop(r, None)
        log.debug(
            f"{self.dir.parent.name}: lease on [{r[0]}, {r[1]}) generation {gen} taken ({self.owner})"
        )
        return True

    def holds(self, r) -> bool:
        """Whether this writer still holds r: no later generation exists."""
        r = (int(r[0]), int(r[1]))
        gen = self.held.get(r)
        return gen is not None and r not in self.lost and not self._gen_path(r, gen + 1).exists()

    def check(self, r, what: str = "write") -> int:
        """The generation of r this writer holds; LeaseLost, naming the new holder, if it lost r."""
        r = (int(r[0]), int(r[1]))
        gen = self.held.get(r, -1)
        if gen >= 0 and self.holds(r):
            return gen
        newer = _generations(self.folder(r))
        who = _read(self._gen_path(r, newer[-1])).get("owner", "?") if newer else "?"
        why = (
            self.lost.get(r)
            or f"generation {gen} superseded by {newer[-1] if newer else '?'} ({who})"
        )
        self._forget(r, why)
        raise LeaseLost(f"lease on range [{r[0]}, {r[1]}) lost ({why}); not writing its {what}")

    def _forget(self, r, why: str) -> None:
        with self._mutex:
            if self.held.pop(r, None) is not None:
                self.lost[r] = why

    def release(self, r) -> None:
        """Give r up (a released generation; another writer may take it at once). Never touches
        a generation this writer does not hold."""
        r = (int(r[0]), int(r[1]))
        with self._mutex:
            gen = self.held.pop(r, None)
        if gen is not None:
            create_exclusive(
                self._gen_path(r, gen + 1), {"released": True, "gen": gen + 1, "by": self.owner}
            )
            log.debug(f"{self.dir.parent.name}: lease on [{r[0]}, {r[1]}) released")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            for r, gen in list(self.held.items()):
                if not self.holds(r):
                    self._forget(
                        r,
                        f"taken over after generation {gen} (this writer was paused or cut off "
                        f"past the {self.ttl:.0f} s lease)",
                    )
                    log.warning(
                        f"lease on range [{r[0]}, {r[1]}) lost: {self.lost.get(r)}; stopping that range"
                    )
                    continue
                try:
                    os.utime(self._gen_path(r, gen), follow_symlinks=False)
                except OSError as e:
                    self._forget(r, f"renewal failed: {e}")
                    log.warning(
                        f"lease on range [{r[0]}, {r[1]}) could not be renewed ({e}); stopping that range"
                    )


def lease_folders(store_path) -> list[Path]:
    d = Path(store_path) / LEASE_DIR
    return sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
