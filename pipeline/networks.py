"""Frozen networks as targets (Restormer, user modules): `python -m pipeline features --target restormer-deblur`.

A checkpoint never runs code: `.safetensors`, or `torch.load(weights_only=True)`; a file that
needs pickled Python objects is refused. Network code does run: Restormer is ours
(`pipeline/restormer.py`); `module.path:factory` imports the user's module, which is code the
user chose to run. The spec (member key) holds the network, its configuration, the pad factor,
the tiling and the checkpoint's sha256, so another checkpoint gives another member.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stores import sha256_file

from training.checkpoints import CheckpointError, load_checkpoint

from .restormer import PAD_FACTOR, Restormer

RESTORMER_BASE = {"inp_channels": 3, "out_channels": 3, "dim": 48, "num_blocks": [4, 6, 6, 8],
                  "num_refinement_blocks": 4, "heads": [1, 2, 4, 8], "ffn_expansion_factor": 2.66,
                  "bias": False, "LayerNorm_type": "WithBias", "dual_pixel_task": False}
# task -> (LayerNorm_type, the official checkpoint file it matches); from the official Options/*.yml
RESTORMER_TASKS = {"deblur": ("WithBias", "motion_deblurring.pth"),
                   "defocus": ("WithBias", "single_image_defocus_deblurring.pth"),
                   "derain": ("WithBias", "deraining.pth"),
                   "denoise": ("BiasFree", "real_denoising.pth"),
                   "denoise-gaussian": ("BiasFree", "gaussian_color_denoising_{sigma15,sigma25,sigma50,blind}.pth")}
NETWORK_TARGETS = tuple(f"restormer-{t}" for t in RESTORMER_TASKS)


def load_into(net: nn.Module, path) -> str:
    """Load a checkpoint into `net` (strict); returns its sha256. Mismatches list the names."""
    state = load_checkpoint(path)
    missing, unexpected = _mismatch(net.state_dict(), state)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit {type(net).__name__}: {len(missing)} missing key(s) "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:  # same names, other shapes (another configuration)
        sizes = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise CheckpointError(f"{path} does not fit {type(net).__name__}: {'; '.join(sizes[:3]) or e}") from None
    return sha256_file(path)


def _mismatch(expected: dict, got: dict) -> tuple[list, list]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


class NetworkTarget:
    """A frozen network as a target: reflect-pad to a multiple of `factor`, run (in tiles of
    `tile` px overlapping by `overlap` px when `tile` is set; each output pixel comes from the
    tile where it lies furthest from a cut), crop back. float32, unclamped, batch of one."""

    def __init__(self, net: nn.Module, target_id: str, spec: dict, sha256: str | None = None, factor: int = 1,
                 tile: int | None = None, overlap: int = 32, device: str | None = None, checkpoint=None):
        if tile is not None and (tile % factor or tile - overlap < factor or overlap < 0):
            raise ValueError(f"tile {tile} must be a multiple of {factor} and exceed the overlap {overlap} "
                             f"by at least {factor}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.eval().requires_grad_(False).to(self.device)
        self.id, self.factor, self.tile, self.overlap = target_id, factor, tile, overlap
        self.sha256, self.checkpoint = sha256, None if checkpoint is None else str(checkpoint)
        self.weights = "pretrained" if sha256 else "random"
        self._spec = {"target": target_id, **spec, "factor": factor, "tile": tile,
                      "overlap": overlap if tile else None, "weights": self.weights, "checkpoint_sha256": sha256}

    def spec(self) -> dict:
        return dict(self._spec)

    def __call__(self, lq: np.ndarray, meta: dict) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(lq, np.float32)).permute(2, 0, 1)[None].to(self.device)
        h, w = x.shape[-2:]
        x = _pad_to(x, self.factor)  # (1, 3, H', W'), H' and W' multiples of factor
        with torch.no_grad():
            y = self.net(x) if self.tile is None else self._tiled(x)
        return y[0, :, :h, :w].permute(1, 2, 0).float().cpu().numpy()  # (h, w, 3)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        rows = _spans(x.shape[-2], self.tile, self.overlap, self.factor)
        cols = _spans(x.shape[-1], self.tile, self.overlap, self.factor)
        out = None
        for r0, r1, k0, k1 in rows:
            for c0, c1, j0, j1 in cols:
                y = self.net(x[..., r0:r1, c0:c1])  # (1, C, tile, tile)
                if out is None:
                    out = y.new_zeros((1, y.shape[1], *x.shape[-2:]))
                out[..., k0:k1, j0:j1] = y[..., k0 - r0:k1 - r0, j0 - c0:j1 - c0]
        return out


def _pad_to(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Reflect-pad bottom/right to a multiple of `factor` (replicate where the image is too small)."""
    ph, pw = -x.shape[-2] % factor, -x.shape[-1] % factor
    if not ph and not pw:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _spans(length: int, tile: int, overlap: int, factor: int) -> list[tuple[int, int, int, int]]:
    """Along one axis: (tile start, tile end, kept start, kept end). Tiles start on multiples of
    `factor` and overlap by >= `overlap`; cuts lie mid-overlap, so every kept pixel is at least
    overlap // 2 px from an inner tile edge."""
    if length <= tile:
        return [(0, length, 0, length)]
    stride = (tile - overlap) // factor * factor
    starts = list(range(0, length - tile, stride)) + [length - tile]
    cuts = [0] + [(starts[i - 1] + tile + starts[i]) // 2 for i in range(1, len(starts))] + [length]
    return [(s, s + tile, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]


def restormer_config(task: str, **overrides) -> dict:
    """The published Restormer configuration of a task; `overrides` change it (tests, variants)."""
    if task not in RESTORMER_TASKS:
        raise ValueError(f"unknown Restormer task {task!r}; known: {', '.join(RESTORMER_TASKS)}")
    unknown = set(overrides) - set(RESTORMER_BASE)
    if unknown:
        raise ValueError(f"unknown Restormer argument(s) {sorted(unknown)}; known: {sorted(RESTORMER_BASE)}")
    return {**RESTORMER_BASE, "LayerNorm_type": RESTORMER_TASKS[task][0], **overrides}


def build_restormer_target(task: str, checkpoint, tile: int | None = None, overlap: int = 32,
                           device: str | None = None, config: dict | None = None) -> NetworkTarget:
    """`restormer-<task>` with the published configuration (`config` overrides it) and the
    checkpoint (e.g. `motion_deblurring.pth` for `deblur`; see RESTORMER_TASKS)."""
    cfg = restormer_config(task, **(config or {}))
    net = Restormer(**cfg)
    try:
        sha = load_into(net, checkpoint)
    except CheckpointError as e:
        if "body.bias" not in str(e):
            raise
        raise CheckpointError(f"{e}. Only LayerNorm biases differ: a checkpoint of another task? The denoising "
                              f"models are BiasFree, deblur/defocus/derain WithBias") from None
    return NetworkTarget(net, f"restormer-{task}", {"network": "restormer", "task": task, "config": cfg}, sha,
                         PAD_FACTOR, tile, overlap, device, checkpoint)


def build_user_target(factory: str, checkpoint, tile: int | None = None, overlap: int = 32,
                      device: str | None = None, factor: int | None = None) -> NetworkTarget:
    """`module.path:factory`: the module is imported (from the PYTHONPATH), `factory()` must
    return an nn.Module, and the checkpoint is loaded into it (strict). The pad factor is
    `factor`, else the module's `pad_factor` attribute, else 1."""
    net, code_sha = call_factory(factory)
    sha = load_into(net, checkpoint)
    factor = int(factor or getattr(net, "pad_factor", 1))
    mod, fn = factory.split(":")
    tid = "user-" + re.sub(r"[^A-Za-z0-9_.]", "_", mod) + "-" + fn
    spec = {"network": "user", "factory": factory, "module_sha256": code_sha}
    return NetworkTarget(net, tid, spec, sha, factor, tile, overlap, device, checkpoint)


def call_factory(factory: str, kind: str = "target", allow_tuple: bool = False) -> tuple:
    """Import `module.path:factory` and call it: (its nn.Module, or with `allow_tuple` a
    (module, extra) pair; the module file's sha256)."""
    mod_name, sep, fn_name = factory.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"user {kind} {factory!r} must be 'module.path:factory'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"user {kind} {factory!r}: cannot import module {mod_name!r} ({e}); "
                         f"is its folder on the PYTHONPATH?") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"user {kind} {factory!r}: module {mod_name!r} has no callable {fn_name!r}")
    out = fn()
    net = out[0] if allow_tuple and isinstance(out, tuple) and len(out) == 2 else out
    if not isinstance(net, nn.Module):
        expected = "a torch.nn.Module or (nn.Module, preprocess dict)" if allow_tuple else "a torch.nn.Module"
        raise ValueError(f"user {kind} {factory!r}: {fn_name}() returned {type(out).__name__}, not {expected}")
    source = inspect.getsourcefile(module)
    return out, (hashlib.sha256(Path(source).read_bytes()).hexdigest() if source else None)


def is_network_target(name: str) -> bool:
    return name in NETWORK_TARGETS or ":" in name


def build_network_target(name: str, checkpoint=None, **kw) -> NetworkTarget:
    """`restormer-<task>` or `module.path:factory`, with its checkpoint (required)."""
    if checkpoint is None:
        raise ValueError(f"target {name!r} is a network: give its checkpoint (--target-weights FILE)")
    if name.startswith("restormer-") and name in NETWORK_TARGETS:
        return build_restormer_target(name.removeprefix("restormer-"), checkpoint, **kw)
    if ":" in name:
        return build_user_target(name, checkpoint, **kw)
    raise ValueError(f"unknown network target {name!r}; known: {', '.join(NETWORK_TARGETS)}, module.path:factory")


def target_from_spec(spec: dict, checkpoint, device: str | None = None) -> NetworkTarget:
    """Rebuild the target a member was made with; the checkpoint must hash to the spec's sha256."""
    tiling = {"tile": spec.get("tile"), "overlap": spec.get("overlap") or 32, "device": device}
    if spec.get("network") == "restormer":
        target = build_restormer_target(spec["task"], checkpoint, config=spec["config"], **tiling)
    elif spec.get("network") == "user":
        target = build_user_target(spec["factory"], checkpoint, factor=spec.get("factor"), **tiling)
        if spec.get("module_sha256") not in (None, target.spec()["module_sha256"]):
            raise ValueError(f"target {spec['factory']}: the module's source differs from the one the store "
                             f"was made with")
    else:
        raise ValueError(f"spec of target {spec.get('target')!r} is not a network target")
    if target.sha256 != spec.get("checkpoint_sha256"):
        raise ValueError(f"target {spec.get('target')}: checkpoint {checkpoint} (sha256 {target.sha256[:12]}) "
                         f"differs from the one the store was made with (sha256 "
                         f"{str(spec.get('checkpoint_sha256'))[:12]})")
    return target
