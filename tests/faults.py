"""Fault injection from the tests' own side: production code carries no test switch.

In-process, a fixture monkeypatches the function that should fail (`cut_copies_after`); for
processes the tests start (SLURM array tasks), `env` puts tests/fault_injection/sitecustomize.py
on PYTHONPATH, which patches the function at interpreter start-up."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(__file__).resolve().parent / "fault_injection"


def env(**faults) -> dict:
    """Environment for a child process with faults on (e.g. PTGRM_TEST_FAIL_TASK="test:11"); the
    checkout under test comes first on its path."""
    path = os.pathsep.join([str(SITE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"PYTHONPATH": path, **faults}


def cut_copies_after(monkeypatch, n: int) -> None:
    """stores.remote copies fail (RemoteError) once `n` files were copied and verified."""
    from stores.remote import Copier, RemoteError

    check = Copier.check

    def failing(self, *args):
        check(self, *args)
        if self.copied >= n:
            raise RemoteError(f"stopping after {self.copied} files (test fault)")

    monkeypatch.setattr(Copier, "check", failing)
