"""SLURM launchers: `python -m slurm features|train|status` (`make slurm-features`, `make slurm-train`),
and `slurm/cluster.sh up|down|status` (`make slurm-up`), a local single-node cluster for tests.

- `features.py`: plans every split's store on the submitting machine, then one submitit job
  array over only the unfinished (split, range) tasks, and a finalize job (afterok) that marks
  the members complete and runs `stores verify`. Reruns submit only what is missing.
- `train.py`: one requeue-safe training job (always `--resume`), DDP over one task per GPU.
- `status.py`: done / running / failed tasks and their logs, from the stores and `sacct`.
- `submit.py`: the cluster options, executors, limits, job states and submission records.

Reuses the `pipeline` and `training` parsers and code; the local commands work without SLURM.
"""
