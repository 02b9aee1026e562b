"""Stage 2 on a cluster: `python -m slurm train --task deblur --run deblur [--gpus 4]`.

Submits one requeue-safe job: it always trains with `--resume` semantics, so after a
preemption, a timeout (submitit checkpoints and requeues it) or `scontrol requeue`, the restarted
job continues from the run's last checkpoint (every --ckpt-every steps) to the same weights as an
uninterrupted run. Several tasks (one per GPU, or --tasks-per-node on CPU) train with torch DDP
(nccl on GPUs, gloo on CPUs): SLURM's task ids become RANK / WORLD_SIZE / LOCAL_RANK.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import submitit

from common.log import configure as configure_logging
from common.log import verbosity
from stores.cli import config_from

from . import submit

log = logging.getLogger(__name__)


def config_from_args(args):
    from training.train import TrainConfig

    return config_from(TrainConfig, args)


class TrainJob(submitit.helpers.Checkpointable):
    """The training job. submitit calls `checkpoint()` on timeout or preemption and requeues the
    same job; the run folder holds the state to continue from, so the job needs no other state."""

    def __init__(self, cfg, cwd: str, levels=(0, 0)):
        self.cfg, self.cwd, self.verbosity = cfg, cwd, levels

    def __call__(self) -> dict:
        from training.train import train

        os.chdir(self.cwd)
        configure_logging(*getattr(self, "verbosity", (0, 0)))
        distributed_env()
        exit_on_sigterm()
        return train(replace(self.cfg, resume=True))

    def checkpoint(self, *args, **kwargs):
        log.info("checkpoint: requeued; the job resumes from the run's last saved step")
        return super().checkpoint(*args, **kwargs)


def distributed_env() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM when the job has several tasks
    (what training.train.setup_distributed reads); each task then uses cuda:LOCAL_RANK."""
    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )


_saving = {"now": False, "term": False}


def exit_on_sigterm() -> None:
    """On SIGTERM (scancel, requeue, preemption) stop at once, except while a checkpoint is being
    written: then stop right after it, so the run folder never holds half of two checkpoints.
    (submitit itself ignores SIGTERM and would train on until SIGKILL.)"""
    import training.train as tt

    def on_term(signum, frame):
        if _saving["now"]:
            _saving["term"] = True
        else:
            _stop()

    save = tt.save_checkpoint

    def guarded_save(*a, **k):
        _saving["now"] = True
        try:
            save(*a, **k)
        finally:
            _saving["now"] = False
        if _saving["term"]:
            _stop()

    if getattr(save, "__name__", "") != "guarded_save":
        tt.save_checkpoint = guarded_save
    signal.signal(signal.SIGTERM, on_term)


def _stop() -> None:
    print("SIGTERM: stopping; a requeued job resumes from the last checkpoint", flush=True)
    sys.stderr.flush()
    os._exit(143)


def submit_train(args) -> int:
    cfg = config_from_args(args)
    tasks = args.tasks_per_node or max(args.gpus, 1)
    run_dir = Path(cfg.runs_dir) / (cfg.run or cfg.task)
    ex = submit.executor(args, f"ptgrm-train-{run_dir.name}", tasks=tasks)
    job = ex.submit(TrainJob(cfg, os.getcwd(), verbosity()))
    path = submit.write_record(
        args.logs,
        "train",
        {
            "cluster": args.cluster,
            "cwd": os.getcwd(),
            "run_dir": str(run_dir),
            "tasks": tasks,
            **submit.log_paths(job),
        },
    )
    log.info(
        f"submitted training job {job.job_id} ({tasks} task(s)) -> {run_dir}; log {job.paths.stdout}"
    )
    log.info(f"record {path}\nstatus: python -m slurm status --logs {args.logs}")
    if not (args.wait or args.cluster == "local"):
        return 0
    submit.wait_all([job])
    problem = submit.failure(job)
    log.info(f"training job {job.job_id}: " + (problem or f"done, {run_dir}/eval.json written"))
    return 1 if problem else 0
