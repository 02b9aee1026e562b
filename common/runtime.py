"""Process settings shared by both stages (extraction and training run on the CPU as well):
the allocator, and CPU threads sized to the CPUs the process may use and shared fairly among the
processes on them (see the CPU threads section).

glibc's default allocator hands every large buffer (a conv activation, an image canvas) back to
the kernel when it is freed and page-faults it in again on the next allocation. Frozen forward
passes and training steps allocate and free the same large buffers over and over, so on a CPU a
third of the wall time went to page faults (measured with getrusage: 8.7 s of system time per
17 s of extraction). Keeping freed memory in the process removes that.
"""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager, suppress

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8
_MMAP_MAX = 32 << 20  # glibc's largest accepted mmap threshold on 64-bit
_TRIM = 1 << 30  # return heap memory to the kernel only once 1 GiB is free at the top
_TOP_PAD = 64 << 20
# Extraction's loader and writer threads and zarr's codec threads would each get a malloc arena of
# their own, each keeping what it freed (up to _TRIM): peak RSS then crept up with the number of
# shards (+14 % from 48 to 96 Rain13K-size images). Two arenas, the main thread's and one for the
# rest, let every thread reuse what the others freed.
_ARENAS = 2

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Make glibc keep freed large buffers for reuse (idempotent; returns whether it applied).

    Skipped on other C libraries (macOS, musl), when the user set any MALLOC_* variable or
    glibc.malloc tunable (their settings win), and with PTGRM_MALLOC_TUNE=0. The price: each
    process (and each of its two malloc arenas) may keep up to 1 GiB of freed memory for reuse.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if (
        not sys.platform.startswith("linux")
        or os.environ.get("PTGRM_MALLOC_TUNE", "1") == "0"
        or any(k.startswith("MALLOC_") for k in os.environ)
        or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = [
        mallopt(opt, value) == 1
        for opt, value in (
            (M_MMAP_THRESHOLD, _MMAP_MAX),
            (M_TRIM_THRESHOLD, _TRIM),
            (M_TOP_PAD, _TOP_PAD),
            (M_ARENA_MAX, _ARENAS),
        )
    ]
    _tuned = all(applied)
    return _tuned


def release_memory() -> None:
    """Hand the memory freed so far back to the kernel (glibc's malloc_trim, every arena), when
    tune_allocator applied. Extraction calls it after each shard is written: the buffers kept for
    reuse serve one shard's allocations, but over many shards the kept memory fragments and the
    peak crept up with the number of shards; trimming once per shard costs a few page faults per
    shard, not per buffer."""
    if not _tuned or os.environ.get("PTGRM_TRIM", "1") == "0":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- CPU threads ---------------------------------------------------------------------------------
# OpenMP worker threads (torch's intra-op pool, OpenBLAS) wait for the next parallel region after
# each one. Spinning waits cost nothing to a lone process but take the time slices a second
# process's threads need (two demo trainings on 2 cores, both spinning, fell from 7 to 1.3 and 0.13
# steps/s); sleeping waits (OMP_WAIT_POLICY=PASSIVE) cost a futex wake-up per region, hundreds per
# training step, which made a lone demo training about 1.6x slower. So:
# - waits spin for a bounded while, then sleep (GOMP_SPINCOUNT 300,000: libgomp's own default
#   without a policy, under which a lone demo training ran 5.2-7 steps/s on 2 cores): the gaps
#   between the regions of a step are shorter, so a lone process pays no wake-ups, and an idle
#   pool sleeps;
# - processes that train or extract register in a folder (CpuShare) and each runs cpu_count()
#   divided by the registered processes sharing its CPUs, at least 1 (follow_cpu_share, once a
#   second during training): two trainings on 2 cores run one thread each (no parallel regions,
#   nothing spins) and a lone one takes both back when the other ends.
WAIT_ENV = {"GOMP_SPINCOUNT": "300000"}
SHARE_ENV = "PTGRM_CPU_SHARE_DIR"  # the registration folder; "off": each process on its own
FOLLOW_S = 1.0  # seconds between two looks at the registrations (training, extraction)


def cpu_count() -> int:
    """The CPUs this process may use: the smallest of its affinity mask, the cgroup CPU quota
    (cpu.max, v2; cfs_quota_us / cfs_period_us, v1), SLURM_CPUS_PER_TASK, and os.cpu_count()."""
    counts = [os.cpu_count() or 1]
    if hasattr(os, "sched_getaffinity"):
        counts.append(len(os.sched_getaffinity(0)))
    quota = _cgroup_quota()
    if quota:
        counts.append(max(1, int(quota + 0.5)))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        counts.append(int(slurm))
    return max(1, min(counts))


def _cgroup_quota() -> float | None:
    """CPUs allowed by this process's cgroup quota, or None when unlimited or unknown."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (
            controllers == ""
        ):  # v2: /sys/fs/cgroup/<path>/cpu.max holds "max 100000" or "<quota> <period>"
            for d in _parents("/sys/fs/cgroup", path):
                try:
                    quota, period = open(f"{d}/cpu.max").read().split()
                except (OSError, ValueError):
                    continue
                if quota != "max":
                    return int(quota) / int(period)
        elif "cpu" in controllers.split(","):
            for base in ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"):
                for d in _parents(base, path):
                    try:
                        quota = int(open(f"{d}/cpu.cfs_quota_us").read())
                        period = int(open(f"{d}/cpu.cfs_period_us").read())
                    except (OSError, ValueError):
                        continue
                    if quota > 0:
                        return quota / period
    return None


def _parents(base: str, path: str) -> list[str]:
    """base/path and its parents up to base (a limit may be set on any of them)."""
    parts = [p for p in path.strip("/").split("/") if p]
    return [os.path.join(base, *parts[:k]) for k in range(len(parts), -1, -1)]


def quiet_threads() -> None:
    """Call first in an entry point, before numpy or torch load: waiting OpenMP threads spin only
    briefly, and pools are sized to cpu_count() (variables you set win)."""
    for k, v in WAIT_ENV.items():
        os.environ.setdefault(k, v)
    n = str(cpu_count())
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(k, n)


class CpuShare:
    """This process's registration among those that share CPUs: a file `<pid>-<random>.cpus` in
    `folder` holding its CPU set, locked (flock) while the process (or a forked child) lives, so a
    killed process's file is known stale and removed by the next look."""

    def __init__(self, folder: str):
        import fcntl
        import json
        import secrets

        self.folder, self.cpus = (
            folder,
            sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
        )
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
        if not os.path.isdir(folder) or os.path.islink(folder) or st.st_uid != os.getuid():
            raise OSError(f"{folder}: not a folder of this user")
        if st.st_mode & 0o022:  # others could plant registrations and take this user's threads
            raise OSError(f"{folder}: writable by other users")
        self.pid, self.name = os.getpid(), f"{os.getpid()}-{secrets.token_hex(4)}.cpus"
        tmp = os.path.join(folder, f".{self.name}")  # hidden: never counted, never removed as stale
        self.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            os.write(self.fd, json.dumps({"pid": os.getpid(), "cpus": self.cpus}).encode())
            os.rename(tmp, os.path.join(folder, self.name))  # visible only once locked and written
        except BaseException:
            os.close(self.fd)
            with suppress(OSError):
                os.unlink(tmp)
            raise

    def sharing(self) -> int:
        """Registered live processes whose CPUs overlap this one's, this one included."""
        import fcntl
        import json

        count, mine = 1, set(self.cpus)
        for name in os.listdir(self.folder):
            if name == self.name or name.startswith(".") or not name.endswith(".cpus"):
                continue  # this one, another still being registered, or not a registration
            path = os.path.join(self.folder, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue  # gone meanwhile
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:  # locked: its process lives
                    cpus = set(json.loads(os.read(fd, 1 << 16) or b"{}").get("cpus", []))
                    if not cpus or not mine or cpus & mine:
                        count += 1
                else:  # nobody holds it: its process ended without removing it (killed)
                    os.unlink(path)
            except (OSError, ValueError, AttributeError):
                pass  # a damaged or foreign file: not counted
            finally:
                os.close(fd)
        return count

    def close(self) -> None:
        if (
            os.getpid() != self.pid or self.fd < 0
        ):  # a forked child (a loader worker) leaves it to its parent
            return
        try:
            os.unlink(os.path.join(self.folder, self.name))
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


_share: CpuShare | None = None
_auto, _next_look = False, 0.0


def _join_share() -> bool:
    """Register this process (once; False when sharing is off or impossible, or it already was)."""
    global _share
    folder = os.environ.get(SHARE_ENV) or os.path.join(_tempdir(), f"ptgrm-cpus-{os.getuid()}")
    if _share is not None or folder == "off" or not sys.platform.startswith("linux"):
        return False
    import atexit

    try:
        _share = CpuShare(folder)
    except OSError as e:
        import warnings

        warnings.warn(
            f"CPU threads not shared with other trainings ({e}); set {SHARE_ENV} to a "
            f"folder of yours, or to 'off'"
        )
        return False
    atexit.register(_share.close)
    return True


def _leave_share() -> None:
    global _share
    if _share is not None:
        import atexit

        atexit.unregister(_share.close)
        _share.close()
        _share = None


def _tempdir() -> str:
    import tempfile

    return tempfile.gettempdir()


def fair_threads() -> int:
    """cpu_count() shared among the registered processes on these CPUs, at least 1."""
    return max(1, cpu_count() // (_share.sharing() if _share else 1))


def set_torch_threads(n: int = 0) -> int:
    """torch's intra-op threads: `n`, or fair_threads() when 0 (then kept fair by follow_cpu_share,
    during training and extraction); returns the number set. Registers this process, until it ends, among those
    sharing the CPUs (see cpu_share for a registration that ends with a block)."""
    global _auto, _next_look
    import time

    import torch

    _join_share()
    _auto, _next_look = not n, time.monotonic() + FOLLOW_S
    n = n or fair_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextmanager
def cpu_share(n: int = 0):
    """set_torch_threads(n) for a block (a training): this process counts among those sharing the
    CPUs while the block runs, not after it."""
    global _auto
    joined = _join_share()
    try:
        yield set_torch_threads(n)
    finally:
        _auto = False
        if joined:
            _leave_share()


def follow_cpu_share(force: bool = False) -> int:
    """Once a training step (from the thread that runs the model): when set_torch_threads chose the
    threads, look again at the processes sharing the CPUs (at most once a FOLLOW_S) and resize
    torch's pool to fair_threads(). Returns torch's thread count."""
    global _next_look
    import time

    import torch

    now = time.monotonic()
    if _auto and (force or now >= _next_look):
        _next_look = now + FOLLOW_S
        n = fair_threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return torch.get_num_threads()


@contextmanager
def cudnn_benchmark(on: bool):
    """cuDNN picks its fastest kernels (timed once per input shape) inside the block: for the
    encoders, whose input is always the network's size; network targets, which see every image
    size, keep the default."""
    import torch

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def ahead(items):
    """`items`, each one made in a background thread while the caller works on the one before
    (extraction's read and degrade stages). The order and the items are those
    of `items`; an error in making one is raised where it would have been."""
    from concurrent.futures import ThreadPoolExecutor

    end = object()
    it = iter(items)
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(next, it, end)
        while (item := nxt.result()) is not end:
            nxt = pool.submit(next, it, end)
            yield item
