"""SLURM glue (submitit job arrays for extraction, requeue-safe training) and the scripts that
start a local single-node cluster for tests. Reuses the `pipeline` and `training` entry points.

Not built yet: the launchers arrive with the SLURM issue; the local commands work without them.
"""
