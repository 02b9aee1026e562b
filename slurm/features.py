"""Stage 1 on a cluster: `python -m slurm features --task deblur --shards 64 [--partition P]`.

Plans every split's store here (members and task plans are written before anything runs), then
submits one SLURM job array over only the unfinished (split, range) tasks and a finalize job
that waits for all of them (afterok), verifies and marks the members complete. Finished tasks
keep their done markers, so rerunning the same command submits only what is missing; a
complete store submits nothing.
"""
from __future__ import annotations

import os
import time
from dataclasses import fields, replace

from pipeline.extract import FeaturesConfig, SplitJob, build_models, complete_store
from pipeline.tasks import get_task

from . import submit

FAULT_ENV = "PTGRM_SLURM_FAIL_RANGE"  # tests: "<split>:<start>" makes that array task raise


def config_from_args(args) -> FeaturesConfig:
    names = {f.name for f in fields(FeaturesConfig)} - {"splits"}
    return FeaturesConfig(**{k: v for k, v in vars(args).items() if k in names},
                          splits=tuple(args.splits.split(",")))


def plan(cfg: FeaturesConfig) -> dict[str, SplitJob]:
    """split -> its SplitJob (constructing it writes the store's plan)."""
    task, target, encoders = build_models(cfg)
    return {split: SplitJob(cfg, task, split, target, encoders) for split in cfg.splits}


def run_task(cfg: FeaturesConfig, split: str, start: int, stop: int, cwd: str) -> dict:
    """One array task: compute range [start, stop) of one split for every member that lacks it.
    A range another live writer holds is waited for (or taken over when its lease expires)."""
    os.chdir(cwd)
    if os.environ.get(FAULT_ENV) == f"{split}:{start}":
        raise RuntimeError(f"{FAULT_ENV}={split}:{start}: failing this task on purpose (test fault switch)")
    t0 = time.perf_counter()
    job = plan(replace(cfg, splits=(split,)))[split]
    while (start, stop) in job.work():
        if not job.run([(start, stop)]):
            time.sleep(2.0)
    print(f"{job.path.name}: [{start}, {stop}) done in {time.perf_counter() - t0:.1f} s", flush=True)
    return {"split": split, "range": [start, stop], "store": str(job.path)}


def finalize(cfg: FeaturesConfig, cwd: str) -> list[str]:
    """The job after the arrays: verify every member's shards, mark them complete, then
    `python -m stores verify` each store."""
    from stores.__main__ import main as stores_main

    os.chdir(cwd)
    paths = []
    for job in plan(cfg).values():
        print(f"{job.path.name}:", flush=True)
        job.finalize()
        if stores_main(["verify", str(job.path)]) != 0:
            raise RuntimeError(f"{job.path}: `python -m stores verify` found damage (see above)")
        paths.append(str(job.path))
    return paths


def submit_features(args, log=print) -> int:
    """Plan, submit the arrays and the finalize job, record them; with --wait, wait for them."""
    cfg = config_from_args(args)
    task = get_task(cfg.task)
    found = [complete_store(cfg, task, split)[0] for split in cfg.splits]
    if all(found):  # from the stat cache and the manifests: no network built, nothing listed but the sources
        for path in found:
            log(f"{path.name}: complete; nothing to submit")
        log("every member is complete: no job submitted")
        return 0
    jobs = plan(cfg)
    for j in jobs.values():
        if not j.todo:
            log(f"{j.path.name}: complete ({', '.join(m.path for m in j.members)}); nothing to submit")
    if not any(j.todo for j in jobs.values()):
        log("every member is complete: no job submitted")
        return 0
    tasks = [(s, a, b) for s, j in jobs.items() for a, b in sorted(j.work())]
    cwd = os.getcwd()
    arrays = submit_arrays(args, cfg, tasks, cwd)
    ids = sorted({submit.array_id(j.job_id) for j in arrays})
    if args.cluster == "local":  # the local executor has no dependencies: wait here
        submit.wait_all(arrays)
        if any(submit.failure(j) for j in arrays):
            return report_failures(arrays, [], log)
    # afterany, not afterok: when an array task fails, an afterok job stays queued forever as
    # DependencyNeverSatisfied (seen on SLURM 22-23 even with kill-on-invalid-dep) when nobody
    # waits; this one runs after the array whatever happened, and fails at once naming the tasks
    # not done, so it always leaves the queue by itself
    dep = {"slurm_additional_parameters": {"dependency": "afterany:" + ":".join(ids)}} \
        if ids and args.cluster == "slurm" else {}
    fin = submit.executor(args, "ptgrm-finalize", gpus=0, **dep).submit(finalize, cfg, cwd)
    path = submit.write_record(args.logs, "features", record_of(args, jobs, tasks, arrays, fin, cwd))
    log(f"submitted {len(tasks)} task(s) in array job(s) {', '.join(ids) or '-'} "
        f"({', '.join(f'{s}[{a}:{b}]' for s, a, b in tasks) or 'all computed'}); finalize job {fin.job_id}")
    log(f"record {path}\nstatus: python -m slurm status --logs {args.logs}")
    if not (args.wait or args.cluster == "local"):
        return 0
    return wait_and_report(arrays, fin, log)


def record_of(args, jobs: dict, tasks: list, arrays: list, fin, cwd: str) -> dict:
    """What `python -m slurm status` reads back: stores, members to do, each task's job and log."""
    return {"cluster": args.cluster, "cwd": cwd, "stores": {s: str(j.path) for s, j in jobs.items()},
            "members": {s: [m.path for m in j.todo] for s, j in jobs.items()}, "finalize": submit.log_paths(fin),
            "tasks": [{"split": s, "range": [a, b], **submit.log_paths(j)}
                      for (s, a, b), j in zip(tasks, arrays, strict=True)]}


def wait_and_report(arrays: list, fin, log=print) -> int:
    submit.wait_all(arrays)
    if any(submit.failure(j) for j in arrays):
        return report_failures(arrays, [fin], log)
    submit.wait_all([fin])
    problem = submit.failure(fin)
    log(f"finalize job {fin.job_id}: " + (problem or "complete; stores verified") + f" (log {fin.paths.stdout})")
    return 1 if problem else 0


def submit_arrays(args, cfg: FeaturesConfig, tasks: list, cwd: str) -> list:
    """One map_array per MaxArraySize tasks; returns the jobs in task order."""
    if not tasks:
        return []
    ex = submit.executor(args, "ptgrm-features", slurm_array_parallelism=args.max_parallel)
    out = []
    for part in submit.chunks(tasks, submit.max_array_size(args.cluster)):
        out += ex.map_array(run_task, [cfg] * len(part), [s for s, _, _ in part], [a for _, a, _ in part],
                            [b for _, _, b in part], [cwd] * len(part))
    return out


def report_failures(arrays: list, dependents: list, log=print) -> int:
    """Name each failed task and its log; cancel the jobs that waited on them."""
    for j in arrays:
        problem = submit.failure(j)
        if problem:
            log(f"task {j.job_id} failed: {problem} (log {j.paths.stderr})")
    submit.cancel([str(d.job_id) for d in dependents])
    log("the finished tasks are kept; run the same command again to submit only the missing ones")
    return 1
