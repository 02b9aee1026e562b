"""Stage 1 reads once from plan to write: `python -m pipeline features` goes
__main__ -> plan -> extract -> stages -> stores, and no file on that path calls back into one
before it (docs/design.md, "make features, file by file"). Checked on a real run with a profiler
that records which project file calls which, in every thread."""

import sys
import threading
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = [
    "pipeline/__main__.py",
    "pipeline/plan.py",
    "pipeline/extract.py",
    "pipeline/stages.py",
    "stores",
]


def step(filename: str) -> int | None:
    """The file's place on the main path (None: not on it)."""
    rel = filename[len(str(ROOT)) + 1 :] if filename.startswith(str(ROOT)) else ""
    return (
        ORDER.index("stores")
        if rel.startswith("stores/")
        else (ORDER.index(rel) if rel in ORDER else None)
    )


def calls_between_files(argv: list[str]) -> dict:
    """(caller's place, callee's place) -> {caller -> callee function names} while main(argv) runs."""
    from pipeline.__main__ import main

    edges = defaultdict(set)

    def profile(frame, event, arg):
        if event != "call" or (callee := step(frame.f_code.co_filename)) is None:
            return
        back = frame.f_back
        while back is not None and step(back.f_code.co_filename) is None:  # through library frames
            back = back.f_back
        if back is not None and (caller := step(back.f_code.co_filename)) != callee:
            edges[(caller, callee)].add(f"{back.f_code.co_name} -> {frame.f_code.co_name}")

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        assert main(argv) == 0
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return edges


def test_make_features_goes_from_plan_to_stores_without_calling_back(tmp_path, tiny_clip):
    argv = [
        "features",
        "--data",
        "demo",
        "--splits",
        "test",
        "--encoder",
        f"openclip:{tiny_clip}",
        "--store-root",
        str(tmp_path),
    ]
    for run in ("computes", "no-op"):
        edges = calls_between_files(argv)
        back = {
            f"{ORDER[a]} -> {ORDER[b]}": sorted(names) for (a, b), names in edges.items() if a > b
        }
        assert back == {}, (run, back)
        assert (ORDER.index("pipeline/__main__.py"), ORDER.index("pipeline/plan.py")) in edges
    assert (
        ORDER.index("pipeline/extract.py"),
        ORDER.index("pipeline/stages.py"),
    ) not in edges  # no-op: no stage
