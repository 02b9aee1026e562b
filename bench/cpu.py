"""Demo trainings on the CPU, alone and side by side: steady steps/s (bench/run.py's CPU rows,
bench/scale.py's sharing rows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# OpenMP wait settings the CPU rows can compare (name -> environment of the trainings)
WAITS = {
    "default": {},  # common.runtime.WAIT_ENV: a bounded spin, threads shared among registered trainings
    "short-spin": {"GOMP_SPINCOUNT": "10000"},
    "sleeping": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},  # the default before
    "spinning": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "30000000000"},
}


def train_rates(
    store_root: Path, runs: Path, count: int, steps: int, env: dict | None = None, extra=()
) -> list[float]:
    """Steps/s of `count` demo trainings started together, each over the window in which all of
    them were training (from metrics.jsonl as it grows: start-up and the last steps excluded)."""
    runs.mkdir(parents=True, exist_ok=True)
    names = [f"cpu{count}-{k}-{time.monotonic_ns()}" for k in range(count)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "training",
                "train",
                "--task",
                "deblur",
                "--data",
                "demo",
                "--store-root",
                str(store_root),
                "--runs-dir",
                str(runs),
                "--run",
                name,
                "--steps",
                "1500",
                "--stop-at",
                str(steps),
                "--log-every",
                "5",
                "--eval-every",
                "0",
                "--ckpt-every",
                "100000",
                *extra,
            ],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=open(runs / f"{name}.log", "w"),
        )
        for name in names
    ]
    seen = [{} for _ in names]  # step -> time first seen, per run

    def look() -> None:
        now = time.perf_counter()
        for name, s in zip(names, seen):
            path = runs / name / "metrics.jsonl"
            for line in path.read_text().splitlines() if path.is_file() else []:
                if '"loss"' in line:
                    s.setdefault(json.loads(line)["step"], now)

    while any(p.poll() is None for p in procs):
        look()
        time.sleep(0.05)
    look()
    failed = [name for name, p in zip(names, procs) if p.returncode]
    if failed:
        raise RuntimeError(f"demo training failed: see {runs / failed[0]}.log")
    first, last = max(min(s.values()) for s in seen), min(max(s.values()) for s in seen)
    rates = []
    for s in seen:
        both = sorted((t, step) for step, t in s.items() if first <= t <= last)
        if len(both) < 2:
            raise RuntimeError(
                f"{steps} steps are too few to see {count} trainings at once (start-up took "
                f"most of them); give more steps"
            )
        (t0, s0), (t1, s1) = both[0], both[-1]
        rates.append((s1 - s0) / (t1 - t0))
    return rates
