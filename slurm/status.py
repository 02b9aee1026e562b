"""What the last submissions are doing: `python -m slurm status [--logs slurm_logs]`.

Per extraction task: done (its done markers are in the store), or the job's SLURM state
(pending, running, failed, ...) from `sacct`, with the task's log; the finalize job; the
training job with the run's last checkpointed step.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import submit


def unfinished_ranges(store_path: str, members: list[str]) -> set[tuple]:
    """The ranges of a store that some member still to do has no done marker for: one manifest
    read and one listing of each member's done markers, whatever the number of tasks."""
    from stores import Store

    store = Store(store_path)
    out: set[tuple] = set()
    for m in members:
        if (store.member_info(m) or {}).get("status") == "complete":
            continue
        done = store.done_ranges(m)
        out |= {tuple(r) for t, r in enumerate(store.ranges(m)) if t not in done}
    return out


def features_lines(rec: dict) -> list[str]:
    ids = [t["job"] for t in rec["tasks"]] + [rec["finalize"]["job"]]
    states = submit.sacct_states(ids) if rec["cluster"] == "slurm" else {}
    counts: dict[str, int] = {}
    rows, failed = [], []
    unfinished = {s: unfinished_ranges(p, rec["members"][s]) for s, p in rec["stores"].items()}
    for t in rec["tasks"]:
        done = tuple(t["range"]) not in unfinished[t["split"]]
        state = "done" if done else states.get(t["job"], "not done").lower()
        counts[state] = counts.get(state, 0) + 1
        log = "" if done else f"  log {t['stderr']}"
        where = f"{t['split']} [{t['range'][0]}, {t['range'][1]})"
        rows.append(f"  {where:24s} {state:10s} job {t['job']}{log}")
        if state not in ("done", "running", "pending", "completing"):
            failed.append(f"{where} ({state})")
    fin = rec["finalize"]
    complete = all(member_complete(rec["stores"][s], ms) for s, ms in rec["members"].items())
    fin_state = "completed" if complete else states.get(fin["job"], "?").lower()
    head = (
        f"features submitted {rec['time']} ({rec['record']}): {len(rec['tasks'])} task(s): "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    )
    if failed and not complete and fin_state in ("pending", "?"):
        fin_state = "cancelled"  # left the queue with its array (kill-on-invalid-dep)
    advice = (
        [
            f"  failed: {', '.join(failed)}; see their logs above. Rerun the same `python -m slurm features` "
            f"(or make slurm-features) command: it submits only these unfinished tasks, then a new finalize"
        ]
        if failed
        else []
    )
    return [
        head,
        *rows,
        f"  {'finalize':24s} {fin_state:10s} job {fin['job']}  log {fin['stdout']}",
        *(
            f"  store {p}: {'complete' if member_complete(p, rec['members'][s]) else 'incomplete'}"
            for s, p in rec["stores"].items()
        ),
        *advice,
    ]


def member_complete(store_path: str, members: list[str]) -> bool:
    from stores import Store

    store = Store(store_path)
    return all(store.status(m) == "complete" for m in members)


def train_lines(rec: dict) -> list[str]:
    state = (
        submit.sacct_states([rec["job"]]).get(rec["job"], "?") if rec["cluster"] == "slurm" else "?"
    )
    sidecar = Path(rec["run_dir"]) / "model.json"
    step = json.loads(sidecar.read_text()).get("step") if sidecar.is_file() else None
    finished = (Path(rec["run_dir"]) / "eval.json").is_file()
    return [
        f"train submitted {rec['time']} ({rec['record']}): job {rec['job']} {state.lower()}, "
        f"{rec['run_dir']}: "
        + ("finished (eval.json)" if finished else f"last checkpoint at step {step}"),
        f"  log {rec['stdout']}",
    ]


def show_status(logs: str) -> int:
    """The command's output (stdout, whatever -q says): one line per job and range."""
    records = submit.latest_records(logs)
    if not records:
        print(f"no submissions recorded under {logs}/submissions")
        return 1
    if "features" in records:
        for line in features_lines(records["features"]):
            print(line)
    if "train" in records:
        for line in train_lines(records["train"]):
            print(line)
    return 0
