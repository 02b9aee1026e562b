"""Process settings shared by both stages (extraction and training run on the CPU as well):
the allocator, and CPU threads sized to the CPUs the process may use (see quiet_threads).

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
    if not sys.platform.startswith("linux") or os.environ.get("PTGRM_MALLOC_TUNE", "1") == "0" \
            or any(k.startswith("MALLOC_") for k in os.environ) \
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = [mallopt(opt, value) == 1 for opt, value in
               ((M_MMAP_THRESHOLD, _MMAP_MAX), (M_TRIM_THRESHOLD, _TRIM), (M_TOP_PAD, _TOP_PAD),
                (M_ARENA_MAX, _ARENAS))]
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
# OpenMP worker threads (torch's intra-op pool, OpenBLAS) spin on their core for a while after
# each parallel region, waiting for the next one. Alone on a machine that saves a wake-up; with a
# second process on the same cores, the spinning threads burn the time slices the other process's
# threads need, and both slow down many times over (two demo trainings on 2 cores fell from 7 to
# 1.3 and 0.13 steps/s). Sleeping waits cost a few microseconds per region instead.
WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}


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
        if controllers == "":  # v2: /sys/fs/cgroup/<path>/cpu.max holds "max 100000" or "<quota> <period>"
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
    """Call first in an entry point, before numpy or torch load: waiting OpenMP threads sleep
    instead of spinning, and pools are sized to cpu_count() (variables you set win)."""
    for k, v in WAIT_ENV.items():
        os.environ.setdefault(k, v)
    n = str(cpu_count())
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(k, n)


def set_torch_threads(n: int = 0) -> int:
    """torch's intra-op threads: `n`, or cpu_count() when 0; returns the number set."""
    import torch

    n = n or cpu_count()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
