"""Test-only fault injection for processes the tests start but cannot monkeypatch (SLURM array
tasks run in other processes, on other nodes in a real cluster). Put this folder on PYTHONPATH
(`faults.env`) with PTGRM_TEST_FAIL_TASK=<split>:<start>: Python imports this module at start-up,
and `slurm.features.run_task` then raises for that one array task. Production code has no switch.
"""

import os

_spec = os.environ.get("PTGRM_TEST_FAIL_TASK")
if _spec:
    import functools

    import slurm.features as _features

    _real = _features.run_task

    @functools.wraps(_real)  # same module and name: submitit pickles it by reference
    def run_task(cfg, split, start, *args, **kwargs):
        if f"{split}:{start}" == _spec:
            raise RuntimeError(f"test fault: failing array task {_spec} on purpose")
        return _real(cfg, split, start, *args, **kwargs)

    _features.run_task = run_task

# PTGRM_TEST_PERTURB_TARGET=<delta>: every target output of this process is offset by delta, a
# stand-in for a network target whose bytes differ between GPUs or CPUs (bench/stress.py).
_delta = os.environ.get("PTGRM_TEST_PERTURB_TARGET")
if _delta:
    import functools

    import pipeline.stages as _stages

    _real_target = _stages.run_target

    @functools.wraps(_real_target)
    def run_target(net, data, excluded):
        return [
            None if b is None else (b.astype("float32") + float(_delta)).astype(b.dtype)
            for b in _real_target(net, data, excluded)
        ]

    _stages.run_target = run_target
