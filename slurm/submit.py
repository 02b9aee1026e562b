"""Cluster plumbing shared by `python -m slurm features|train|status`: the cluster options,
submitit executors, the cluster's limits, job states from `sacct`, and submission records.

A record (`<logs>/submissions/<time>-<kind>.json`) is what `python -m slurm status` reads: the
stores or run, each job id and where its log is.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from stores.files import new_file


def add_cluster_args(p: argparse.ArgumentParser, time_min: int) -> None:
    """The options every submission shares (the job's own flags come from its stage's parser)."""
    g = p.add_argument_group("cluster")
    g.add_argument(
        "--partition", default=None, help="SLURM partition (default: the cluster's default)"
    )
    g.add_argument(
        "--time",
        type=int,
        default=time_min,
        help="time limit per job in minutes (default: %(default)s)",
    )
    g.add_argument("--cpus", type=int, default=2, help="CPUs per task (default: %(default)s)")
    g.add_argument("--gpus", type=int, default=0, help="GPUs per node (default: %(default)s)")
    g.add_argument(
        "--mem-gb", type=float, default=None, help="memory per node in GB (default: the cluster's)"
    )
    g.add_argument(
        "--account", default=None, help="SLURM account to charge (default: your default account)"
    )
    g.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        help="array tasks running at once (default: no cap beyond submitit's 256)",
    )
    g.add_argument(
        "--logs",
        default="slurm_logs",
        help="submitit folder: job logs, pickles and submission "
        "records (default: %(default)s; on a filesystem the nodes share)",
    )
    g.add_argument(
        "--cluster",
        choices=("slurm", "local"),
        default="slurm",
        help="'slurm', or 'local' (submitit's "
        "local executor: the same jobs as subprocesses here, no SLURM needed) (default: %(default)s)",
    )
    g.add_argument(
        "--wait", action="store_true", help="block until the jobs end; exit 1 if any failed"
    )


def executor(args, name: str, gpus: int | None = None, tasks: int = 1, **extra):
    """A submitit executor with the cluster options; `extra` is passed to update_parameters."""
    import submitit

    ex = submitit.AutoExecutor(folder=Path(args.logs) / "%j", cluster=args.cluster)
    params = {
        "name": name,
        "timeout_min": args.time,
        "cpus_per_task": args.cpus,
        "tasks_per_node": tasks,
        "gpus_per_node": args.gpus if gpus is None else gpus,
        "mem_gb": args.mem_gb,
    }
    if args.cluster == "slurm":
        params.update(slurm_partition=args.partition, slurm_account=args.account)
    ex.update_parameters(**{k: v for k, v in {**params, **extra}.items() if v is not None})
    return ex


def max_array_size(cluster: str) -> int:
    """Tasks one array may hold (`MaxArraySize` of `scontrol show config`); no cap locally."""
    if cluster != "slurm":
        return 1 << 30
    out = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(m.group(1)) if m else 1001


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def array_id(job_id: str) -> str:
    """The array's own id ('123' of '123_4'), which `afterok:` waits on as a whole."""
    return str(job_id).split("_")[0]


def _expand(ids: str) -> list[int]:
    out = []
    for part in ids.split("%")[0].split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """job id ('123' or '123_4') -> SLURM state; pending array tasks ('123_[2-3]') are expanded."""
    ids = sorted({array_id(j) for j in job_ids})
    if not ids or not shutil.which("sacct"):
        return {}
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(ids)],
        capture_output=True,
        text=True,
    ).stdout
    states = {}
    for line in out.splitlines():
        jid, _, state = line.partition("|")
        state = state.split()[0] if state else "UNKNOWN"
        m = re.fullmatch(r"(\d+)_\[(.+)\]", jid)
        for t in _expand(m.group(2)) if m else []:
            states[f"{m.group(1)}_{t}"] = state
        states[jid] = state
    return states


def log_paths(job) -> dict:
    return {
        "job": str(job.job_id),
        "stdout": str(job.paths.stdout),
        "stderr": str(job.paths.stderr),
    }


def write_record(logs: str, kind: str, record: dict) -> Path:
    folder = Path(logs) / "submissions"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}-{kind}.json"
    with new_file(path) as f:  # a new name: never an existing file, never through a link
        f.write(
            json.dumps(
                {"kind": kind, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **record}, indent=1
            )
        )
    return path


def latest_records(logs: str) -> dict[str, dict]:
    """kind -> the most recent record of that kind."""
    out = {}
    for path in sorted((Path(logs) / "submissions").glob("*.json")):
        rec = json.loads(path.read_text())
        out[rec["kind"]] = {**rec, "record": str(path)}
    return out


def wait_all(jobs: list, poll: float = 1.0) -> None:
    """Until every job has ended (result file written, or sacct says it ended)."""
    while not all(j.done() for j in jobs):
        time.sleep(poll)


def failure(job) -> str | None:
    """None when the job succeeded, else its state and the end of its error."""
    try:
        exc = job.exception()
    except Exception as e:  # noqa: BLE001 - submitit raises when a job left no result (killed, cancelled)
        exc = e
    if exc is None:
        return None
    text = str(exc).split("\n----------------------\nYou can check")[0].strip()
    return f"{job.state}: {text.splitlines()[-1] if text else type(exc).__name__}"


def cancel(job_ids: list[str]) -> None:
    if job_ids and shutil.which("scancel"):
        subprocess.run(["scancel", *job_ids], check=False)
