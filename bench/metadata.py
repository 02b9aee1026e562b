"""The metadata path of a store at 1M samples, without pixels: `python bench/metadata.py [--n 1000000]`.

Runs the project's own code on a store whose members have every array created (zarr.json per
bucket and array) but no chunk written: the layout and plan, the manifest, one done marker per
task, the completeness check a re-run and a finaliser make, `stores ls` / `info`, `python -m slurm
status` of a submission of every task, the per-sample source descriptors, and what a SLURM array
task reads for its own range. Prints the counts and times and writes bench/results-metadata.json.
Run at several N (the default runs 250k, 500k, 1M) to see each cost grow with the number of tasks,
not with N squared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stores import TEXT, ArraySpec, Store, make_layout  # noqa: E402
from stores.cli import Parser  # noqa: E402
from stores.store import DONE_DIR, write_json_atomic  # noqa: E402

RAIN_SIZES = [(h, w) for h in (320, 400, 481, 512, 640) for w in (360, 480, 500, 640)]


def clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def simulate(root: Path, n: int) -> dict:
    rng = np.random.default_rng(0)
    hws = [RAIN_SIZES[k] for k in rng.integers(0, len(RAIN_SIZES), n)]
    t_layout, (layout, order) = clock(lambda: make_layout(hws, 64, 16, 64e6))
    path = root / f"sim-{n}"
    t_create, store = clock(
        lambda: Store.open_or_create(
            path,
            {"dataset": "sim", "split": "train", "task": "deblur", "pairs_key": "0" * 64},
            layout,
        )
    )
    arrays = [
        ArraySpec("lq", "uint8", (3,), image=True),
        ArraySpec("gt", "uint8", (3,), image=True),
        ArraySpec("hw", "int32", (2,)),
        ArraySpec("names", TEXT, (64,)),
        ArraySpec("source_index", "int64"),
    ]
    t_begin, _ = clock(lambda: store.begin_member("pairs", "k" * 64, {"sim": n}, arrays))
    plan = store.ranges("pairs")

    def markers():
        for t, (a, b) in enumerate(plan):
            shards = {str(lo): "0" * 64 for _, lo, _ in store.shards_of(a, b)}
            write_json_atomic(
                path / DONE_DIR / "pairs" / f"{t:05d}.json",
                {"task": t, "samples": [a, b], "shards": {"lq": shards}, "stats": {}},
            )

    t_markers, _ = clock(markers)
    t_check, done = clock(lambda: Store(path).done_ranges("pairs"))
    assert len(done) == len(plan)
    t_array_task, _ = clock(
        lambda: Store(path).ranges("pairs")[len(plan) // 2]
    )  # manifest once, its range
    from slurm.status import (
        features_lines,  # `python -m slurm status` of a submission of every task
    )

    rec = {
        "tasks": [
            {"job": f"1_{t}", "split": "train", "range": list(r), "stderr": f"logs/1_{t}.err"}
            for t, r in enumerate(plan)
        ],
        "finalize": {"job": "2", "stdout": "logs/2.out"},
        "cluster": "local",
        "stores": {"train": str(path)},
        "members": {"train": ["pairs"]},
        "time": "now",
        "record": "sim",
    }
    t_status, lines = clock(lambda: features_lines(rec))
    assert f"{len(plan)} done" in lines[0], lines[0]
    # per-sample source descriptors: written once by the planner; an array task reads its range's file(s)
    from types import SimpleNamespace

    from pipeline.descriptors import Descriptors, folder, write_descriptors

    samples = [
        SimpleNamespace(
            name=f"train/gt/{i:07d}.png",
            hw=hw,
            ref={"gt": {"file": f"train/gt/{i:07d}.png"}, "lq": {"file": f"train/lq/{i:07d}.png"}},
        )
        for i, hw in enumerate(hws)
    ]
    t_desc, _ = clock(
        partial(write_descriptors, path, SimpleNamespace(samples=samples, paired=True), order)
    )
    del samples
    a, b = plan[len(plan) // 2]

    def task_reads():
        d = Descriptors(path, Path("/data"))
        return [d.sample_at(i) for i in range(a, b)], d.read_files

    t_task_desc, (_, read_files) = clock(task_reads)
    desc_bytes = sum(f.stat().st_size for f in folder(path).iterdir())
    store._update_member("pairs", status="complete", bytes=0)
    t_info, _ = clock(
        lambda: subprocess.run(
            [sys.executable, "-m", "stores", "info", str(path), "--json"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    )
    t_ls, _ = clock(
        lambda: subprocess.run(
            [sys.executable, "-m", "stores", "ls", str(root)],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    )
    files = sum(1 for p in path.rglob("*") if p.is_file())
    return {
        "n": n,
        "buckets": len(layout.buckets),
        "tasks": len(plan),
        "manifest_bytes": (path / "manifest.json").stat().st_size,
        "metadata_files": files,
        "layout_s": t_layout,
        "create_s": t_create,
        "begin_member_s": t_begin,
        "done_markers_write_s": t_markers,
        "completeness_check_s": t_check,
        "array_task_plan_s": t_array_task,
        "stores_info_s": t_info,
        "stores_ls_s": t_ls,
        "slurm_status_s": t_status,
        "descriptors_write_s": t_desc,
        "descriptor_files": len(list(folder(path).iterdir())),
        "descriptor_bytes": desc_bytes,
        "array_task_descriptors_s": t_task_desc,
        "array_task_descriptor_files_read": len(read_files),
        "chunk_files_when_written": len(layout.shards()) * len(arrays),
    }  # one shard/chunk file per array


def main(argv=None) -> int:
    p = Parser(
        prog="python bench/metadata.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", default="250000,500000,1000000")
    p.add_argument("--out", default=str(ROOT / "bench" / "results-metadata.json"))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-meta-") as d:
        for n in map(int, args.n.split(",")):
            rows.append(simulate(Path(d), n))
            print(json.dumps(rows[-1]), flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
