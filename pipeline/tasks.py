"""Restoration tasks: each names its synthetic degradation, default target and default encoder.

Registry: TASKS at the bottom; `get_task(name)`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    degradation: str  # key of pipeline.degrade.DEGRADATIONS (used when the data has no lq)
    target: str  # default frozen target (pipeline.targets.TARGETS)
    encoder: str = "clip-vit-b32"
    metric_space: str = "rgb"  # "rgb", or "y" for deraining as in the paper's tables
    demo_tiles: tuple = (192, 64, 48)  # demo training tiles: size, stride, most per photo


TASKS = {
    "deblur": Task("deblur", degradation="deblur", target="wiener"),
    "defocus": Task("defocus", degradation="defocus", target="wiener"),
    "lowlight": Task(
        "lowlight", degradation="lowlight", target="sci-medium"
    ),  # TARGET=gamma: classical
    "derain": Task("derain", degradation="derain", target="streaks", metric_space="y"),
    "denoise": Task("denoise", degradation="denoise25", target="nlmeans"),
    "denoise15": Task("denoise15", degradation="denoise15", target="nlmeans"),
    "denoise50": Task("denoise50", degradation="denoise50", target="nlmeans"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]
