"""Which target and encoder names import and run a user's code (`module.path:factory`).

Here, not in pipeline/names.py, because `stores repair` must refuse such a name recorded in a
store without importing the pipeline (pipeline/names.py builds on these).
"""

from __future__ import annotations

BUILTIN_TARGETS = (
    *(f"restormer-{t}" for t in ("deblur", "defocus", "derain", "denoise", "denoise-gaussian")),
    *(f"mprnet-{t}" for t in ("deblur", "derain", "denoise")),
    "uformer-b",
    "snr-aware",
    "sci-easy",
    "sci-medium",
    "sci-difficult",
)
SD_NAMES = ("sd-vae", "sd-unet")


def is_user_target(name: str) -> bool:
    """`module.path:factory`: a user's network, whose code may change between runs."""
    return ":" in name and name.split(":")[0] not in BUILTIN_TARGETS


def is_user_encoder(name: str) -> bool:
    """`module.path:factory` (a user's backbone), as opposed to `openclip:`, `sd-*:` names."""
    head = name.split(":")[0]
    return ":" in name and head not in ("openclip", *SD_NAMES) and "/" not in head
