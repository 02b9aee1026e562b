"""The allocator setting both stages apply: on by default on glibc, off when the user chose; memory
kept for reuse is handed back once per shard."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = "from stores.runtime import tune_allocator as t; print(t(), t())"


def run(env: dict) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PTGRM_MALLOC", "GLIBC_TUN"))}
    return subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env={**clean, **env}, check=True,
                          capture_output=True, text=True).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_tuned_once_unless_the_user_chose():
    assert run({}) == ["True", "True"]
    assert run({"MALLOC_ARENA_MAX": "2"}) == ["False", "False"]  # the user's own MALLOC_* settings win
    assert run({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == ["False", "False"]
    assert run({"PTGRM_MALLOC_TUNE": "0"}) == ["False", "False"]


RELEASE = """
import os, numpy as np
from stores.runtime import release_memory, tune_allocator
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
tune_allocator()
keep = [np.ones(10 << 20, np.uint8) for _ in range(30)]  # 300 MB of 10 MB buffers: kept for reuse when freed
del keep[:-1]
before = rss()
release_memory()
print(before, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_memory_kept_for_reuse_goes_back_to_the_kernel_after_a_shard():
    """The tuned allocator keeps freed buffers (no page faults on reuse); extraction hands them back
    once per written shard, so its peak does not creep up with the number of shards."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PTGRM_", "GLIBC_TUN"))}
    out = subprocess.run([sys.executable, "-c", RELEASE], cwd=ROOT, env=clean, check=True, capture_output=True,
                         text=True).stdout.split()
    before, after = map(float, out)
    assert before - after > 200, (before, after)  # MB: the 29 freed buffers were still held, now returned
