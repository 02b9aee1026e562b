"""Process settings shared by both stages (extraction and training run on the CPU as well).

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

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_MAX = 32 << 20  # glibc's largest accepted mmap threshold on 64-bit
_TRIM = 1 << 30  # return heap memory to the kernel only once 1 GiB is free at the top
_TOP_PAD = 64 << 20

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Make glibc keep freed large buffers for reuse (idempotent; returns whether it applied).

    Skipped on other C libraries (macOS, musl), when the user set any MALLOC_* variable or
    glibc.malloc tunable (their settings win), and with PTGRM_MALLOC_TUNE=0. The price: each
    process (and each malloc arena) may keep up to 1 GiB of freed memory for reuse.
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
               ((M_MMAP_THRESHOLD, _MMAP_MAX), (M_TRIM_THRESHOLD, _TRIM), (M_TOP_PAD, _TOP_PAD))]
    _tuned = all(applied)
    return _tuned
