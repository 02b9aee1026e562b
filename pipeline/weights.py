"""Where the frozen encoders' weights are looked up, and the error when none are found.

Shared by `pipeline/encoders.py` (OpenCLIP, backbones) and `pipeline/sd_encoders.py` (Stable
Diffusion); everything here is offline: a local path or the Hugging Face cache, never a download.
"""
from __future__ import annotations

import os


class WeightsNotFound(RuntimeError):
    """No weights for an encoder where they were looked for (the message says where)."""


def hf_home() -> str:
    """The Hugging Face hub cache folder (`HF_HUB_CACHE`, else `$HF_HOME/hub`)."""
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
