"""The allocator setting both stages apply: on by default on glibc, off when the user chose; memory
kept for reuse is handed back once per shard."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = "from common.runtime import tune_allocator as t; print(t(), t())"


def run(env: dict) -> str:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MALLOC_", "PTGRM_MALLOC", "GLIBC_TUN"))
    }
    return subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=ROOT,
        env={**clean, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_tuned_once_unless_the_user_chose():
    assert run({}) == ["True", "True"]
    assert run({"MALLOC_ARENA_MAX": "2"}) == [
        "False",
        "False",
    ]  # the user's own MALLOC_* settings win
    assert run({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == ["False", "False"]
    assert run({"PTGRM_MALLOC_TUNE": "0"}) == ["False", "False"]


RELEASE = """
import os, numpy as np
from common.runtime import release_memory, tune_allocator
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
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PTGRM_", "GLIBC_TUN"))
    }
    out = subprocess.run(
        [sys.executable, "-c", RELEASE],
        cwd=ROOT,
        env=clean,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    before, after = map(float, out)
    assert before - after > 200, (
        before,
        after,
    )  # MB: the 29 freed buffers were still held, now returned


SHARE = """
import sys
from common.runtime import follow_cpu_share, set_torch_threads
import torch
print(set_torch_threads(int(sys.argv[1])), flush=True)
for line in sys.stdin:  # a training step: follow the processes that share the CPUs
    print(follow_cpu_share(force=True), torch.get_num_threads(), flush=True)
"""


def test_trainings_sharing_the_cpus_split_them_and_a_lone_one_takes_them_back(tmp_path):
    """Two processes on the same CPUs run cpu_count() // 2 threads each (one on 2 cores: no
    spinning OpenMP waits taking the other's time slices), follow each other while they run, and a
    killed one stops counting; an explicit --threads is kept."""
    from common.runtime import cpu_count

    n = cpu_count()
    if n < 2:
        pytest.skip("one usable CPU: every process runs one thread anyway")
    env = {**os.environ, "PTGRM_CPU_SHARE_DIR": str(tmp_path / "share")}

    def start(threads: int = 0):
        return subprocess.Popen(
            [sys.executable, "-c", SHARE, str(threads)],
            cwd=ROOT,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def step(p) -> list[int]:
        p.stdin.write("\n")
        p.stdin.flush()
        return [int(v) for v in p.stdout.readline().split()]

    first = start()
    try:
        assert int(first.stdout.readline()) == n  # alone: every usable CPU
        second = start()
        assert int(second.stdout.readline()) == n // 2
        assert step(first) == [n // 2, n // 2]  # the first one follows at its next step
        pinned = start(3)
        assert int(pinned.stdout.readline()) == 3  # --threads 3: kept, but it counts for the others
        assert step(first) == [max(1, n // 3)] * 2
        pinned.kill()
        second.kill()  # killed: its registration is stale and no longer counts
        second.wait(), pinned.wait()
        assert step(first) == [n, n]
    finally:
        first.stdin.close()
        first.wait(timeout=60)
    assert (
        first.returncode == 0 and list((tmp_path / "share").iterdir()) == []
    )  # nothing left behind


def test_a_registration_in_progress_is_never_removed_and_an_open_folder_is_refused(tmp_path):
    """A registration is written under a hidden name and renamed once locked: another process's
    look must not take the hidden file (unlocked for a moment) for a dead process's and remove it.
    A share folder others may write to is refused: they could plant registrations."""
    from common.runtime import CpuShare

    share = tmp_path / "share"
    mine = CpuShare(str(share))
    in_progress = share / ".999-deadbeef.cpus"
    in_progress.write_text('{"pid": 999, "cpus": [0]}')
    dead = share / "998-deadbeef.cpus"
    dead.write_text('{"pid": 998, "cpus": [0]}')  # unlocked: its process was killed
    assert mine.sharing() == 1
    assert in_progress.exists() and not dead.exists()
    mine.close()
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o777)
    open_folder.chmod(0o777)
    with pytest.raises(OSError, match="writable by other users"):
        CpuShare(str(open_folder))


EXTRACT = """
import os, sys
import numpy as np
import torch
import common.runtime as runtime
from pipeline import stages

runtime.FOLLOW_S = 0.0  # look at every shard
print(runtime.set_torch_threads(), flush=True)  # as build_models does


class Encoder:  # what the network sees: the threads torch runs it on
    dim = 1
    def __call__(self, images):
        print(torch.get_num_threads(), flush=True)
        return np.zeros((len(images), 4, 1), np.float32)


class Target:
    id = "t"
    def __call__(self, lq, meta):
        print(torch.get_num_threads(), flush=True)
        return lq


def shards():
    for k in range(2):
        if k == 1:  # another extraction or training starts on these CPUs meanwhile
            other = runtime.CpuShare(os.environ["PTGRM_CPU_SHARE_DIR"])
        s = stages.Shard((0, 2), k, k + 1)
        s.jobs = [(type("M", (), {"path": p}), 0) for p in ("targets/t", "osf/e")]
        s.data = {"hw": [(2, 2)], "lq": [np.zeros((2, 2, 3), np.uint8)], "meta": ["{}"]}
        yield s


it = stages.encode(stages.target(shards(), member="targets/t", net=Target()), member="osf/e",
                   encoder=Encoder(), batch=8)
for _ in it:
    pass
"""


def test_an_extraction_follows_the_cpu_share_from_shard_to_shard(tmp_path):
    """Extraction registers like a training and looks again before each shard's networks run: a
    training started beside it halves its threads from the next shard on (it set them once and
    kept them before: 2 extractions, or one beside a training, took all the cores each)."""
    from common.runtime import cpu_count

    n = cpu_count()
    if n < 2:
        pytest.skip("one usable CPU: every process runs one thread anyway")
    env = {**os.environ, "PTGRM_CPU_SHARE_DIR": str(tmp_path / "share")}
    out = subprocess.run(
        [sys.executable, "-c", EXTRACT], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    # set at start; shard 0: target, encoder alone; shard 1: target, encoder shared
    assert [int(v) for v in out.stdout.split()] == [n, n, n, n // 2, n // 2]
