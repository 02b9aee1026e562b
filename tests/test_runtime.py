"""The allocator setting both stages apply: on by default on glibc, off when the user chose."""
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
