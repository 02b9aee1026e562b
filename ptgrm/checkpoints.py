"""Reading checkpoint files safely: `.safetensors`, or `torch.load(weights_only=True)`.

A checkpoint never runs code: a file that needs pickled Python objects is refused. The one reader
of every checkpoint: the network targets and effnet-lite0 (`pipeline.networks`), the VGG19
perceptual loss and `python -m training import-official`.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

# wrappers around a state dict, tried in this order (BasicSR/Restormer use params / params_ema)
WRAPPERS = ("params", "params_ema", "state_dict", "model", "net", "netG", "network")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, refused, or does not fit the network."""


def load_checkpoint(path) -> dict:
    """The state dict of a checkpoint file, unwrapped (`params`, `params_ema`, `state_dict`,
    `model`, in that order) and without a leading `module.` (DataParallel)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    obj = _read(path)
    for _ in range(len(WRAPPERS)):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
        inner = [obj[k] for k in WRAPPERS if isinstance(obj, dict) and isinstance(obj.get(k), dict)]
        if not inner:
            break
        obj = inner[0]
    top = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: no state dict of tensors found (top level: {top})")


def _read(path: Path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only allows tensors and plain containers only
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused: it holds pickled Python objects{what}, not only tensors, and "
            f"a checkpoint never runs code here. Save the state dict instead: "
            f"torch.save({{'params': model.state_dict()}}, ...) or safetensors"
        ) from None
    except (
        RuntimeError,
        OSError,
        EOFError,
        IndexError,
        KeyError,
        ValueError,
    ) as e:  # bytes that are no checkpoint
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})"
        ) from None
