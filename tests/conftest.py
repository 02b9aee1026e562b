"""Shared fixtures: a tiny random OpenCLIP model saved as a real OpenCLIP folder."""

import json
import os
import tempfile

import pytest

import common.startup  # noqa: F401 (OpenMP settings as the entry points have them)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A training runs as many threads as its share of the CPUs among the registered processes
# (common.runtime.CpuShare), and CPU results follow the thread count: the session's own folder
# keeps other sessions' trainings on this machine from changing the threads of the runs a test compares.
os.environ.setdefault("PTGRM_CPU_SHARE_DIR", tempfile.mkdtemp(prefix="ptgrm-test-cpus-"))

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A folder with open_clip_config.json + open_clip_model.safetensors (random weights, seed 0),
    loaded by the pipeline through OpenCLIP's own `local-dir:` loader."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_clip_b(tmp_path_factory):
    """A second tiny OpenCLIP folder (seed 1): another encoder."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip_b"), seed=1)


def make_tiny_clip(folder, seed):
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CLIP)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    (folder / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": TINY_CLIP,
                "preprocess_cfg": {
                    "mean": [0.48145466, 0.4578275, 0.40821073],
                    "std": [0.26862954, 0.26130258, 0.27577711],
                },
            }
        )
    )
    return folder


import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/toys.py
