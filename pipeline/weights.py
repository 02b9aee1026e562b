"""Where the frozen encoders' weights are looked up, and the error when none are found.

Shared by `pipeline/encoders.py` (OpenCLIP, backbones) and `pipeline/sd_encoders.py` (Stable
Diffusion), and the folder of downloaded target checkpoints (`pipeline/networks.py`); everything
here is offline: a local path or a cache, never a download (`pipeline/download.py` downloads).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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

    entry = TARGET_WEIGHTS.get(name)
    path = weights_home() / entry.file if entry and entry.file else None
    return path if path is not None and path.is_file() else None


# Where each built-in target's published checkpoint is (`python -m pipeline weights get` reads it;
# `make features` looks for the file under its name in weights_home()).
GITHUB = "https://github.com"
RESTORMER_RELEASE = f"{GITHUB}/swz30/Restormer/releases/download/v1.0/"
MPRNET_README = "github.com/swz30/MPRNet README ('To test the pre-trained models of ...')"


@dataclass(frozen=True)
class Published:
    """Where a target's published checkpoint is: a direct URL, or only a web page."""

    file: str  # the published file name: its name in weights_home()
    page: str  # where the authors publish it
    url: str | None = None  # a direct download, if there is one
    sha256: str | None = None  # checked when known


TARGET_WEIGHTS: dict[str, Published] = {
    **{
        f"restormer-{task}": Published(
            file, "github.com/swz30/Restormer, release v1.0", RESTORMER_RELEASE + file
        )
        for task, file in (
            ("deblur", "motion_deblurring.pth"),
            ("defocus", "single_image_defocus_deblurring.pth"),
            ("derain", "deraining.pth"),
            ("denoise", "real_denoising.pth"),
        )
    },
    "restormer-denoise-gaussian": Published(
        "",
        "github.com/swz30/Restormer, release v1.0: one file per noise level, "
        + ", ".join(
            RESTORMER_RELEASE + f"gaussian_color_denoising_{s}.pth"
            for s in ("sigma15", "sigma25", "sigma50", "blind")
        ),
    ),
    "mprnet-deblur": Published(
        "model_deblurring.pth",
        f"https://drive.google.com/file/d/1QwQUVbk6YVOJViCsOKYNykCsdJSVGRtb ({MPRNET_README})",
    ),
    "mprnet-derain": Published(
        "model_deraining.pth",
        f"https://drive.google.com/file/d/1O3WEJbcat7eTY6doXWeorAbQ1l_WmMnM ({MPRNET_README})",
    ),
    "mprnet-denoise": Published(
        "model_denoising.pth",
        f"https://drive.google.com/file/d/1LODPt9kYmxwU98g96UrRA0_Eh5HYcsRw ({MPRNET_README})",
    ),
    "uformer-b": Published(
        "Uformer_B.pth",
        "the SIDD link under 'Pretrained model' in the README of "
        "github.com/ZhendongWang6/Uformer (SharePoint)",
    ),
    "snr-aware": Published(
        "SID.pth",
        "github.com/xiaogang00/pretrain_model_boost_restoration README (SID.pth: "
        "SNR-Aware and PTG-RM for SID), or github.com/dvlab-research/SNR-Aware README "
        "(LOLv1.pth, LOLv2_real.pth, sid_G.pth)",
    ),
}
