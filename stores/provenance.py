"""What made a member: recorded in the manifest as `provenance`, shown by `python -m stores info`.

Provenance describes; keys decide reuse: it is never part of a key, so two members made by other
versions or devices with the same settings are the same member. Read with importlib.metadata and
git only (no heavy module is imported for it), and passed through `shareable` like everything a
store records: no user name, host name or home path.
"""

from __future__ import annotations

import platform
import subprocess
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from common.privacy import shareable

PROJECT = "ptgrm-pipeline"
LIBRARIES = {
    "torch": "torch",
    "open_clip": "open_clip_torch",
    "diffusers": "diffusers",
    "zarr": "zarr",
    "numpy": "numpy",
}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit(folder: Path) -> str | None:
    """HEAD of the checkout `folder` is (the root of), with `+dirty` when files differ from it;
    None when it is no checkout or git is not installed."""
    if not (folder / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return head.stdout.strip() + (
            "+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
        )
    except (OSError, subprocess.SubprocessError):
        return None


@lru_cache(maxsize=1)
def _static() -> dict:
    project = {"version": _version(PROJECT)}
    commit = git_commit(Path(__file__).resolve().parents[1])
    if commit:
        project["commit"] = commit
    return {
        "project": project,
        "libraries": {k: _version(d) for k, d in LIBRARIES.items()},
        "arch": platform.machine() or None,
    }


def provenance(device: str | None = None) -> dict:
    """This process's provenance: project version (and git commit from a checkout), library
    versions, `device` ('cpu' or the GPU's name; None: not known here), CPU architecture, UTC time."""
    return shareable(
        {**_static(), "device": device, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    )


def describe(prov: dict | None) -> str:
    """One line for people; 'unknown' for a member made before provenance was recorded."""
    if not isinstance(prov, dict):
        return "unknown"
    project = prov.get("project") or {}
    version = f"ptgrm {project.get('version') or '?'}"
    if project.get("commit"):
        version += (
            f" ({project['commit'][:12]}{'+dirty' if project['commit'].endswith('+dirty') else ''})"
        )
    libs = " ".join(f"{k} {v}" for k, v in (prov.get("libraries") or {}).items() if v)
    where = f"device {prov.get('device') or '?'} ({prov.get('arch') or '?'})"
    return f"{version}; {libs}; {where}; {prov.get('time') or '?'}"
