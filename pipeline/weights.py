"""Where the frozen encoders' weights are looked up, and the error when none are found.

Shared by `pipeline/encoders.py` (OpenCLIP, backbones) and `pipeline/sd_encoders.py` (Stable
Diffusion), and the folder of downloaded target checkpoints (`pipeline/networks.py`); everything
here is offline: a local path or a cache, never a download (`pipeline/download.py` downloads).
"""

from __future__ import annotations

import os
from pathlib import Path


class WeightsNotFound(RuntimeError):
    """No weights for an encoder where they were looked for (the message says where)."""


def hf_home() -> str:
    """The Hugging Face hub cache folder (`HF_HUB_CACHE`, else `$HF_HOME/hub`)."""
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )


def weights_home() -> Path:
    """The folder of downloaded target checkpoints (`python -m pipeline weights get NAME`):
    `$PTGRM_WEIGHTS`, else `$XDG_CACHE_HOME/ptgrm/weights` (`~/.cache/ptgrm/weights`)."""
    if os.environ.get("PTGRM_WEIGHTS"):
        return Path(os.environ["PTGRM_WEIGHTS"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ptgrm" / "weights"


def cached_target_checkpoint(name: str) -> Path | None:
    """The published checkpoint of built-in target `name` in `weights_home()`, if it is there
    (put there by `weights get`, or by hand under its published file name)."""
    from .download import TARGET_WEIGHTS

    entry = TARGET_WEIGHTS.get(name)
    path = weights_home() / entry.file if entry and entry.file else None
    return path if path is not None and path.is_file() else None
