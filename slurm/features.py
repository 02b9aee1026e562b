"""Stage 1 on a cluster: `python -m slurm features --task deblur --shards 64 [--partition P]`.

Plans every split here (`plan_split`: the only step that lists the dataset folder) and opens its
store (`SplitJob.open`: members, their ranges and the per-sample source descriptors are written
before anything runs), then submits one SLURM job array with one array task per unfinished
(split, range) and a finalize job that waits for all of them, verifies and marks the members
complete. An array task reads the store's manifest and the descriptor files of its own range
(pipeline/descriptors.py), never the dataset folder's listing; the finalize job reads only the
store. Finished ranges keep their done markers, so rerunning the same command submits only what is
missing; a complete store submits nothing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from common.log import configure as configure_logging
from common.log import flags as log_flags
from common.log import verbosity
from pipeline.extract import FeaturesConfig, SplitJob, build_models, finalize_members, wds_stream
from pipeline.plan import SplitPlan, export_split, plan_features
from stores import Store
from stores.cli import config_from

from . import submit

log = logging.getLogger(__name__)


def open_jobs(cfg: FeaturesConfig, plans: list[SplitPlan]) -> dict[str, SplitJob]:
    """split -> its SplitJob (opening it writes the store's members, their ranges and the sample
    descriptors): the submitting node's step, before any array task runs."""
    _, target, encoders = build_models(cfg)
    return {p.split: SplitJob.open(p, target, encoders) for p in plans}


def run_task(
    cfg: FeaturesConfig, split: str, start: int, stop: int, cwd: str, store: str, levels=(0, 0)
) -> dict:
    """One array task: compute range [start, stop) of one split's `store` (opened by `open_jobs`) for every member
    that lacks it, reading only the manifest and the sample descriptors of the range. A range
    another live writer holds is waited for (or taken over when its lease expires)."""
    os.chdir(cwd)
    configure_logging(*levels)
    t0 = time.perf_counter()
    task, target, encoders = build_models(replace(cfg, splits=(split,)))
    job = SplitJob.of_store(cfg, task, store, target, encoders)
    wds = wds_stream(job) if cfg.wds else None
    while (start, stop) in job.work():
        if not job.run([(start, stop)], wds=wds):
            time.sleep(2.0)
    files = job.descriptors.read_files
    log.info(
        f"{job.path.name}: [{start}, {stop}) done in {time.perf_counter() - t0:.1f} s "
        f"(sample descriptor files read: {files})"
    )
    return {
        "split": split,
        "range": [start, stop],
        "store": str(job.path),
        "descriptor_files": files,
    }


def finalize(cfg: FeaturesConfig, cwd: str, stores: dict, levels=(0, 0)) -> list[str]:
    """The job after the arrays: for each store opened (`{split: {"path", "members", "export"}}`),
    verify the members' shards and mark them complete, `python -m stores verify` it, and with
    --wds complete its WebDataset export; reads the stores only, never the dataset folder."""
    from stores.__main__ import main as stores_main

    os.chdir(cwd)
    configure_logging(*levels)
    paths = []
    for todo in stores.values():
        store = Store(todo["path"], mode="a")
        log.info(f"{store.path.name}:")
        finalize_members(store, todo["members"], cfg.max_bad)
        if stores_main(["verify", *log_flags(), str(store.path)]) != 0:
            raise RuntimeError(f"{store.path}: `python -m stores verify` found damage (see above)")
        if cfg.wds:
            export_split(store.path, *todo["export"])
        paths.append(str(store.path))
    return paths


def to_finalize(jobs: dict[str, SplitJob]) -> dict:
    """What the finalize job needs of each split: its store's path, the members to do, the export's."""
    return {
        s: {
            "path": str(j.path),
            "members": [m.path for m in j.todo],
            "export": j.members.exported(),
        }
        for s, j in jobs.items()
    }


def submit_features(args) -> int:
    """Plan, submit the arrays and the finalize job, record them; with --wait, wait for them."""
    cfg = config_from(FeaturesConfig, args)
    plans = plan_features(cfg)  # the dataset is listed here, once
    if (
        all(p.complete() for p in plans) and not cfg.wds
    ):  # stat cache and manifests: no network built
        for p in plans:
            log.info(f"{p.path.name}: complete; nothing to submit")
        log.info("every member is complete: no job submitted")
        return 0
    jobs = open_jobs(cfg, plans)
    for j in jobs.values():
        if not j.todo:
            log.info(
                f"{j.path.name}: complete ({', '.join(m.path for m in j.members)}); nothing to submit"
            )
            if cfg.wds:  # the export of complete stores is written here (no job needed)
                export_split(j.path, *j.members.exported())
    if not any(j.todo for j in jobs.values()):
        log.info("every member is complete: no job submitted")
        return 0
    tasks = [(s, a, b) for s, j in jobs.items() for a, b in sorted(j.work())]
    cwd = os.getcwd()
    arrays = submit_arrays(args, cfg, tasks, cwd, {s: str(j.path) for s, j in jobs.items()})
    ids = sorted({submit.array_id(j.job_id) for j in arrays})
    if args.cluster == "local":  # the local executor has no dependencies: wait here
        submit.wait_all(arrays)
        if any(submit.failure(j) for j in arrays):
            return report_failures(arrays, [])
    # afterany, not afterok: when an array task fails, an afterok job stays queued forever as
    # DependencyNeverSatisfied (seen on SLURM 22-23 even with kill-on-invalid-dep) when nobody
    # waits; this one runs after the array whatever happened, and fails at once naming the tasks
    # not done, so it always leaves the queue by itself
    dep = (
        {"slurm_additional_parameters": {"dependency": "afterany:" + ":".join(ids)}}
        if ids and args.cluster == "slurm"
        else {}
    )
    fin = submit.executor(args, "ptgrm-finalize", gpus=0, **dep).submit(
        finalize, cfg, cwd, to_finalize(jobs), verbosity()
    )
    path = submit.write_record(
        args.logs, "features", record_of(args, jobs, tasks, arrays, fin, cwd)
    )
    log.info(
        f"submitted {len(tasks)} task(s) in array job(s) {', '.join(ids) or '-'} "
        f"({', '.join(f'{s}[{a}:{b}]' for s, a, b in tasks) or 'all computed'}); finalize job {fin.job_id}"
    )
    log.info(f"record {path}\nstatus: python -m slurm status --logs {args.logs}")
    if not (args.wait or args.cluster == "local"):
        return 0
    return wait_and_report(arrays, fin)


def record_of(args, jobs: dict, tasks: list, arrays: list, fin, cwd: str) -> dict:
    """What `python -m slurm status` reads back: stores, members to do, each task's job and log."""
    return {
        "cluster": args.cluster,
        "cwd": cwd,
        "stores": {s: str(j.path) for s, j in jobs.items()},
        "members": {s: [m.path for m in j.todo] for s, j in jobs.items()},
        "finalize": submit.log_paths(fin),
        "tasks": [
            {"split": s, "range": [a, b], **submit.log_paths(j)}
            for (s, a, b), j in zip(tasks, arrays, strict=True)
        ],
    }


def wait_and_report(arrays: list, fin) -> int:
    submit.wait_all(arrays)
    if any(submit.failure(j) for j in arrays):
        return report_failures(arrays, [fin])
    submit.wait_all([fin])
    problem = submit.failure(fin)
    log.info(
        f"finalize job {fin.job_id}: "
        + (problem or "complete; stores verified")
        + f" (log {fin.paths.stdout})"
    )
    return 1 if problem else 0


def submit_arrays(args, cfg: FeaturesConfig, tasks: list, cwd: str, stores: dict) -> list:
    """One map_array per MaxArraySize tasks (`stores`: split -> its store); returns the jobs
    in task order."""
    if not tasks:
        return []
    ex = submit.executor(args, "ptgrm-features", slurm_array_parallelism=args.max_parallel)
    out = []
    for part in submit.chunks(tasks, submit.max_array_size(args.cluster)):
        out += ex.map_array(
            run_task,
            [cfg] * len(part),
            [s for s, _, _ in part],
            [a for _, a, _ in part],
            [b for _, _, b in part],
            [cwd] * len(part),
            [stores[s] for s, _, _ in part],
            [verbosity()] * len(part),
        )
    return out


def report_failures(arrays: list, dependents: list) -> int:
    """Name each failed task and its log; cancel the jobs that waited on them."""
    for j in arrays:
        problem = submit.failure(j)
        if problem:
            log.error(f"task {j.job_id} failed: {problem} (log {j.paths.stderr})")
    submit.cancel([str(d.job_id) for d in dependents])
    log.info(
        "the finished tasks are kept; run the same command again to submit only the missing ones"
    )
    return 1
