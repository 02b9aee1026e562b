"""Frozen networks as targets: the paper's target networks with their official parameter names
(Restormer, MPRNet, Uformer-B, SNR-Aware, SCI), or user modules: `python -m pipeline features --target mprnet-deblur`.

A checkpoint never runs code: `.safetensors`, or `torch.load(weights_only=True)`; a file that
needs pickled Python objects is refused. Network code does run: the built-in networks are ours
(`pipeline/restormer.py`, `mprnet.py`, `uformer.py`, `snr_aware.py`); `module.path:factory`
imports the user's module, which is code the user chose to run. The spec (member key) holds the
network, its configuration, the pad factor, the tiling and the checkpoint's sha256 (or, for
random weights, the init seed), so another checkpoint gives another member.

Built-in names take configuration overrides after colons (`mprnet-deblur:n_feat=8:num_cab=1`,
lists comma-separated: `uformer-b:depths=1,1,1,1,1,1,1,1,1`); the member keeps the plain name
and the key holds the configuration. See docs/networks.md.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ptgrm.checkpoints import CheckpointError, load_checkpoint
from ptgrm.tiling import pad_square, pad_to, tiled
from stores import sha256_file

from .mprnet import MPRNET_TASKS, MPRNet, mprnet_config
from .restormer import PAD_FACTOR, Restormer
from .sci import SCI, SCI_CONFIG, SCI_WEIGHTS, TRAINING_ONLY_PREFIX, WEIGHTS_DIR
from .snr_aware import SNRAware, with_snr_map
from .uformer import UFORMER_B, Uformer
from .weights import cached_target_checkpoint

RESTORMER_BASE = {
    "inp_channels": 3,
    "out_channels": 3,
    "dim": 48,
    "num_blocks": [4, 6, 6, 8],
    "num_refinement_blocks": 4,
    "heads": [1, 2, 4, 8],
    "ffn_expansion_factor": 2.66,
    "bias": False,
    "LayerNorm_type": "WithBias",
    "dual_pixel_task": False,
}
# task -> (LayerNorm_type, the official checkpoint file it matches); from the official Options/*.yml
RESTORMER_TASKS = {
    "deblur": ("WithBias", "motion_deblurring.pth"),
    "defocus": ("WithBias", "single_image_defocus_deblurring.pth"),
    "derain": ("WithBias", "deraining.pth"),
    "denoise": ("BiasFree", "real_denoising.pth"),
    "denoise-gaussian": (
        "BiasFree",
        "gaussian_color_denoising_{sigma15,sigma25,sigma50,blind}.pth",
    ),
}
SNR_AWARE = {
    "nf": 64,
    "front_RBs": 1,
    "back_RBs": 1,
    "light_RBs": 6,
    "n_layers": 6,
    "heads": 8,
    "d_head": 64,
    "patch": 4,
}
SID_REFINEMENT_PREFIX = (
    "refinement11."  # PTG-RM inside the authors' joint SNR-Aware network (SID.pth)
)


@dataclass(frozen=True)
class Builtin:
    """A built-in target network: its class, published configuration and checkpoints."""

    network: str  # spec "network": the architecture family
    task: str | None
    make: Callable[..., nn.Module]
    config: Callable[..., dict]  # (**overrides) -> configuration; unknown names raise ValueError
    checkpoints: str  # the published files it loads and where they are published
    factor: int | Callable[[dict], int]  # pad factor, or a function of the configuration
    prepare: Callable | None = (
        None  # (1, 3, H, W) -> network input, on the whole image before padding/tiling
    )
    ignore_prefix: str | None = (
        None  # checkpoint keys under it belong to another network and are skipped
    )
    extra_spec: dict = field(default_factory=dict)
    packaged: tuple[Path, str] | None = (
        None  # (file, its sha256): weights shipped with the project, the default
    )
    square: bool = False  # pad as Uformer's tests (`expand2square`), not reflect bottom/right

    def pad_factor(self, cfg: dict) -> int:
        return self.factor(cfg) if callable(self.factor) else self.factor


def _fixed_config(what: str, base: dict) -> Callable[..., dict]:
    def config(**overrides) -> dict:
        unknown = set(overrides) - set(base)
        if unknown:
            raise ValueError(f"unknown {what} argument(s) {sorted(unknown)}; known: {sorted(base)}")
        return {**base, **overrides}

    return config


def _mprnet_config(task: str) -> Callable[..., dict]:
    def config(**overrides) -> dict:
        return _fixed_config("MPRNet", mprnet_config(task))(**overrides)

    return config


def _restormer_config(task: str) -> Callable[..., dict]:
    return lambda **overrides: restormer_config(task, **overrides)


BUILTINS: dict[str, Builtin] = {
    **{
        f"restormer-{t}": Builtin(
            "restormer",
            t,
            Restormer,
            _restormer_config(t),
            f"{ckpt} (github.com/swz30/Restormer, release page)",
            PAD_FACTOR,
        )
        for t, (_, ckpt) in RESTORMER_TASKS.items()
    },
    **{
        f"mprnet-{t}": Builtin(
            "mprnet",
            t,
            MPRNet,
            _mprnet_config(t),
            f"{ckpt} (github.com/swz30/MPRNet, {d}/pretrained_models/README.md)",
            8,
        )
        for (t, (_, ckpt)), d in zip(MPRNET_TASKS.items(), ("Deblurring", "Deraining", "Denoising"))
    },
    "uformer-b": Builtin(
        "uformer",
        "denoise",
        Uformer,
        _fixed_config("Uformer", UFORMER_B),
        "the Uformer_B SIDD checkpoint (github.com/ZhendongWang6/Uformer, README "
        "'Pretrained model', SIDD link)",
        lambda cfg: 16 * cfg["win_size"],
        square=True,
    ),
    "snr-aware": Builtin(
        "snr-aware",
        "lowlight",
        SNRAware,
        _fixed_config("SNR-Aware", SNR_AWARE),
        "SID.pth (restorer part; github.com/xiaogang00/pretrain_model_boost_restoration), "
        "LOLv1.pth, LOLv2_real.pth, sid_G.pth (github.com/dvlab-research/SNR-Aware)",
        4,
        prepare=with_snr_map,
        ignore_prefix=SID_REFINEMENT_PREFIX,
        extra_spec={
            "snr_map": "cv2.blur(lq * 255, (5, 5)) / 255 of the whole input; "
            "luma 0.299/0.587/0.114 of channels 0/1/2"
        },
    ),
    **{
        f"sci-{v}": Builtin(
            "sci",
            "lowlight",
            SCI,
            _fixed_config("SCI", SCI_CONFIG),
            f"{v}.pt (github.com/vis-opt-group/SCI, weights/), shipped in {WEIGHTS_DIR}",
            1,
            ignore_prefix=TRAINING_ONLY_PREFIX,
            packaged=(WEIGHTS_DIR / f"{v}.pt", sha),
            extra_spec={"output": "clamp(x / clamp(sigmoid(out_conv) + x, 1e-4, 1), 0, 1)"},
        )
        for v, sha in SCI_WEIGHTS.items()
    },
}
NETWORK_TARGETS = tuple(BUILTINS)


def packaged_checkpoint(name: str) -> Path | None:
    """The weights a built-in target ships with (`sci-*`), loaded when no checkpoint is given."""
    spec = BUILTINS.get(name.split(":")[0])
    return spec.packaged[0] if spec and spec.packaged else None


def load_into(net: nn.Module, path, ignore_prefix: str | None = None) -> str:
    """Load a checkpoint into `net` (strict); returns its sha256. Keys under `ignore_prefix`
    belong to another network and are skipped. A checkpoint that does not fit raises
    CheckpointError naming every missing, unexpected and mis-shaped key."""
    load_state(net, load_checkpoint(path), path, ignore_prefix)
    return sha256_file(path)


def load_state(net: nn.Module, state: dict, source, ignore_prefix: str | None = None) -> None:
    """`net.load_state_dict(state, strict=True)`, after checking every name and shape so that a
    mismatch is reported as CheckpointError naming `source` and the keys."""
    if ignore_prefix:
        state = {k: v for k, v in state.items() if not k.startswith(ignore_prefix)}
    expected = net.state_dict()
    missing, unexpected = _mismatch(expected, state)
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)}, network {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        parts = [
            f"{len(rows)} {title} {_listing(rows)}"
            for title, rows in (
                ("missing key(s)", missing),
                ("unexpected key(s)", unexpected),
                ("mis-shaped key(s) (size mismatch)", misshaped),
            )
            if rows
        ]
        raise CheckpointError(f"{source} does not fit {type(net).__name__}: " + "; ".join(parts))
    net.load_state_dict(state, strict=True)


def _mismatch(expected: dict, got: dict) -> tuple[list, list]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def _listing(rows: list, n: int = 5) -> str:
    return f"{rows[:n]}{' ...' if len(rows) > n else ''}"


BUDGET_MB = 1024.0  # default activation memory of one network call (--target-budget-mb)
LIVE_FACTOR = 6  # peak activation memory over the largest single module output (skips, residuals,
#                 temporaries): measured 4.5-5.6 on Restormer and Uformer-B on the CPU
PROBE = 128  # px: edge of the probe that measures a network's activation bytes per pixel


COMPILE_BACKEND = "inductor"  # torch.compile's backend for --target-compile


class _ChannelsLast(nn.Module):
    """`net` on its input in channels_last memory format (a compiled target's layout)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last))


SQUARE_PADDING = (
    "expand2square: zeros around the centred image to a square whose side is a multiple of the "
    "factor, output cropped back (Uformer's test scripts)"
)


class NetworkTarget:
    """A frozen network as a target: reflect-pad to a multiple of `factor` (with `square`, zero-pad
    to a centred square as Uformer's tests do), run (in tiles of
    `tile` px overlapping by `overlap` px when `tile` is set; each output pixel comes from the
    tile where it lies furthest from a cut), crop back. float32, unclamped, batch of one.

    Without `tile`, an image whose padded size exceeds `max_pixels` runs in tiles of `auto_tile`
    px (memory follows the tile, not the photo), and smaller images run whole. Both numbers
    follow from `budget_mb` and the network's activation bytes per pixel, measured once on a
    small probe (`activation_bytes_per_pixel`): they depend on the architecture and the budget,
    not on the machine, and the spec (member key) records them.

    With `compile`, the network runs in channels_last under `torch.compile` (inductor; recompiled
    once with dynamic shapes when the input size changes). Its outputs are close to eager ones but
    not the same bits, so the spec records `compile` (backend, memory format, torch version) and
    a compiled target is another member; without it the spec is what it was."""

    def __init__(
        self,
        net: nn.Module,
        target_id: str,
        spec: dict,
        sha256: str | None = None,
        factor: int = 1,
        tile: int | None = None,
        overlap: int = 32,
        device: str | None = None,
        checkpoint=None,
        prepare: Callable | None = None,
        init_seed: int | None = None,
        budget_mb: float | None = None,
        square: bool = False,
        compile: bool = False,
    ):
        if tile is not None and (tile % factor or tile - overlap < factor or overlap < 0):
            raise ValueError(
                f"tile {tile} must be a multiple of {factor} and exceed the overlap {overlap} "
                f"by at least {factor}"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.eval().requires_grad_(False).to(self.device)
        self.id, self.factor, self.tile, self.overlap = target_id, factor, tile, overlap
        self.sha256, self.checkpoint = sha256, None if checkpoint is None else str(checkpoint)
        self.weights = "pretrained" if sha256 else "random"
        self.prepare, self.square = prepare, square
        self.max_pixels = self.auto_tile = None
        budget = BUDGET_MB if budget_mb is None else float(budget_mb)
        auto = tile is None and budget != float(
            "inf"
        )  # inf: never tiled (a spec made before the budget)
        if auto:
            per_px = activation_bytes_per_pixel(self.net, factor, self.device, prepare)
            self.max_pixels = int(budget * 2**20 / (LIVE_FACTOR * per_px))
            smallest = -(-(2 * overlap + factor) // factor) * factor
            self.auto_tile = max(smallest, int(self.max_pixels**0.5) // factor * factor)
        self._spec = {
            "target": target_id,
            **spec,
            "factor": factor,
            "tile": tile,
            "overlap": overlap if tile else None,
            "weights": self.weights,
            "checkpoint_sha256": sha256,
        }
        if square:  # only then: the keys of reflect-padded targets stay as they were
            self._spec["padding"] = SQUARE_PADDING
        if auto:  # what decides how a large image is cut (none is, below max_pixels)
            self._spec["auto_tile"] = {
                "budget_mb": budget,
                "max_pixels": self.max_pixels,
                "tile": self.auto_tile,
                "overlap": overlap,
            }
        if sha256 is None and init_seed is not None:  # random weights: how to draw them again
            self._spec["init"] = {"seed": init_seed, "torch": torch.__version__.split("+")[0]}
        self.compiled = compile
        self._run = self.net
        if compile:  # other kernels, other bits: another member
            self.net = self.net.to(memory_format=torch.channels_last)
            self._run = torch.compile(_ChannelsLast(self.net), backend=COMPILE_BACKEND)
            self._spec["compile"] = {
                "backend": COMPILE_BACKEND,
                "memory_format": "channels_last",
                "torch": torch.__version__.split("+")[0],
            }

    def spec(self) -> dict:
        return dict(self._spec)

    def __call__(self, lq: np.ndarray, meta: dict) -> np.ndarray:
        x = (
            torch.from_numpy(np.ascontiguousarray(lq, np.float32))
            .permute(2, 0, 1)[None]
            .to(self.device)
        )
        h, w = x.shape[-2:]
        if self.prepare is not None:  # whole-image inputs (SNR map), before padding and tiling
            x = self.prepare(x)
        top, left = 0, 0
        if self.square:
            x, (top, left) = pad_square(x, self.factor)
        x = pad_to(x, self.factor)  # (1, 3, H', W'), H' and W' multiples of factor
        tile = self.tile_for(*x.shape[-2:])
        with torch.no_grad():
            y = (
                self._run(x)
                if tile is None
                else tiled(self._run, (x,), tile, self.overlap, self.factor)
            )
        return (
            y[0, :, top : top + h, left : left + w].permute(1, 2, 0).float().cpu().numpy()
        )  # (h, w, 3)

    def tile_for(self, h: int, w: int) -> int | None:
        """The tile edge an (h, w) padded input runs in; None: whole."""
        if self.tile is not None:
            return self.tile
        return self.auto_tile if self.max_pixels is not None and h * w > self.max_pixels else None


def activation_bytes_per_pixel(
    net: nn.Module, factor: int, device, prepare: Callable | None = None
) -> float:
    """The largest output of any module of `net` on a PROBE x PROBE input (rounded up to the pad
    factor), in bytes per input pixel: with LIVE_FACTOR, an estimate of a call's peak activation
    memory per pixel (convolutional and windowed networks scale linearly with the pixels)."""
    edge = -(-PROBE // factor) * factor
    largest = [0]

    def hook(_module, _inputs, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                largest[0] = max(largest[0], t.numel() * t.element_size())

    x = torch.full((1, 3, edge, edge), 0.5, device=device)
    handles = [m.register_forward_hook(hook) for m in net.modules()]
    try:
        with torch.no_grad():
            net(prepare(x) if prepare is not None else x)
    finally:
        for h in handles:
            h.remove()
    return max(largest[0], 3 * 4 * edge * edge) / (edge * edge)


def restormer_config(task: str, **overrides) -> dict:
    """The published Restormer configuration of a task; `overrides` change it (tests, variants)."""
    if task not in RESTORMER_TASKS:
        raise ValueError(f"unknown Restormer task {task!r}; known: {', '.join(RESTORMER_TASKS)}")
    unknown = set(overrides) - set(RESTORMER_BASE)
    if unknown:
        raise ValueError(
            f"unknown Restormer argument(s) {sorted(unknown)}; known: {sorted(RESTORMER_BASE)}"
        )
    return {**RESTORMER_BASE, "LayerNorm_type": RESTORMER_TASKS[task][0], **overrides}


def parse_options(name: str) -> tuple[str, dict]:
    """'mprnet-deblur:n_feat=8:depths=1,1' -> ('mprnet-deblur', {'n_feat': 8, 'depths': [1, 1]})."""
    base, *opts = name.split(":")
    out = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise ValueError(f"target {name!r}: option {opt!r} must be name=value")
        items = [_value(v) for v in value.split(",")]
        out[key] = items if "," in value else items[0]
    return base, out


def _value(text: str):
    try:
        return json.loads(text)  # numbers, true/false
    except json.JSONDecodeError:
        return text


def build_builtin_target(
    name: str,
    checkpoint=None,
    tile: int | None = None,
    overlap: int = 32,
    device: str | None = None,
    config: dict | None = None,
    allow_random: bool = False,
    init_seed: int = 0,
    budget_mb: float | None = None,
    compile: bool = False,
) -> NetworkTarget:
    """A built-in network (`BUILTINS`) with its published configuration (`config` overrides it)
    and the checkpoint; without one, seeded random weights when `allow_random` (the demo), which
    the spec and manifest record as `weights: random`. `compile`: see NetworkTarget."""
    spec = BUILTINS.get(name)
    if spec is None:
        raise ValueError(f"unknown network target {name!r}; known: {', '.join(NETWORK_TARGETS)}")
    cfg = spec.config(**(config or {}))
    if checkpoint is None and spec.packaged:  # shipped weights: never random
        checkpoint = spec.packaged[0]
    if checkpoint is None and not allow_random:
        raise ValueError(
            f"target {name!r} is a network: give its checkpoint (--target-weights FILE; published: "
            f"{spec.checkpoints}; `python -m pipeline weights get {name}` (make weights NAME={name}) "
            f"downloads it when online), or --allow-random-weights for a test with random weights"
        )
    with torch.random.fork_rng(devices=[]):  # random weights are drawn from init_seed alone
        torch.manual_seed(init_seed)
        net = spec.make(**cfg)
    sha = None
    if checkpoint is not None:
        try:
            sha = load_into(net, checkpoint, spec.ignore_prefix)
        except CheckpointError as e:
            if spec.network == "restormer" and "body.bias" in str(e):
                raise CheckpointError(
                    f"{e}. Only LayerNorm biases differ: a checkpoint of another task? The "
                    f"denoising models are BiasFree, deblur/defocus/derain WithBias"
                ) from None
            raise
        shipped = Path(checkpoint).resolve()
        if spec.packaged and shipped == spec.packaged[0] and sha != spec.packaged[1]:
            raise CheckpointError(
                f"{shipped}: sha256 {sha[:12]}... is not the published file's "
                f"({spec.packaged[1][:12]}...): the copy shipped with the project is damaged; "
                f"restore it (git checkout -- {shipped.name} in {shipped.parent})"
            )
    extra = {
        **spec.extra_spec,
        **({"ignored_prefix": spec.ignore_prefix} if spec.ignore_prefix else {}),
    }
    return NetworkTarget(
        net,
        name,
        {"network": spec.network, "task": spec.task, "config": cfg, **extra},
        sha,
        spec.pad_factor(cfg),
        tile,
        overlap,
        device,
        checkpoint,
        spec.prepare,
        None if sha else init_seed,
        budget_mb,
        spec.square,
        compile,
    )


def build_restormer_target(
    task: str,
    checkpoint,
    tile: int | None = None,
    overlap: int = 32,
    device: str | None = None,
    config: dict | None = None,
) -> NetworkTarget:
    """`restormer-<task>` with the published configuration (`config` overrides it) and the
    checkpoint (e.g. `motion_deblurring.pth` for `deblur`; see RESTORMER_TASKS)."""
    restormer_config(task)  # unknown task: ValueError
    return build_builtin_target(f"restormer-{task}", checkpoint, tile, overlap, device, config)


def build_user_target(
    factory: str,
    checkpoint,
    tile: int | None = None,
    overlap: int = 32,
    device: str | None = None,
    factor: int | None = None,
    budget_mb: float | None = None,
    module_sha256: str | None = None,
    compile: bool = False,
) -> NetworkTarget:
    """`module.path:factory`: the module is imported (from the PYTHONPATH; with `module_sha256`,
    only a file of that hash), `factory()` must return an nn.Module, and the checkpoint is loaded
    into it (strict). The pad factor is `factor`, else the module's `pad_factor` attribute, else 1."""
    net, code_sha = call_factory(factory, module_sha256=module_sha256)
    sha = load_into(net, checkpoint)
    factor = int(factor or getattr(net, "pad_factor", 1))
    mod, fn = factory.split(":")
    tid = "user-" + re.sub(r"[^A-Za-z0-9_.]", "_", mod) + "-" + fn
    spec = {"network": "user", "factory": factory, "module_sha256": code_sha}
    return NetworkTarget(
        net,
        tid,
        spec,
        sha,
        factor,
        tile,
        overlap,
        device,
        checkpoint,
        budget_mb=budget_mb,
        compile=compile,
    )


def module_file(mod_name: str) -> Path | None:
    """The file `import mod_name` executes, found without executing anything (not even a parent
    package's `__init__`, which `importlib.util.find_spec` of a dotted name would import)."""
    if mod_name in sys.modules:
        spec = sys.modules[mod_name].__spec__
    else:
        top, *rest = mod_name.split(".")
        spec = importlib.util.find_spec(top)  # a top-level name is found, not imported
        for i in range(1, len(rest) + 1):
            if spec is None or not spec.submodule_search_locations:
                return None
            spec = importlib.machinery.PathFinder.find_spec(
                ".".join([top, *rest[:i]]), spec.submodule_search_locations
            )
    return Path(spec.origin) if spec is not None and spec.has_location and spec.origin else None


def call_factory(
    factory: str, kind: str = "target", allow_tuple: bool = False, module_sha256: str | None = None
) -> tuple:
    """Import `module.path:factory` and call it: (its nn.Module, or with `allow_tuple` a
    (module, extra) pair; the module file's sha256). With `module_sha256` (what a store or run
    recorded) the module's file must hash to it before it is imported."""
    mod_name, sep, fn_name = factory.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"user {kind} {factory!r} must be 'module.path:factory'")
    if module_sha256 is not None:
        try:
            path = module_file(mod_name)
        except (ImportError, ValueError):
            path = None
        found = sha256_file(path) if path is not None and path.is_file() else None
        if found != module_sha256:
            raise ValueError(
                f"user {kind} {factory!r}: {path or 'its module file (not found)'} has sha256 "
                f"{str(found)[:12]}, not the {module_sha256[:12]} it was recorded with; refused before "
                f"importing it (put the module's recorded version on the PYTHONPATH)"
            )
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(
            f"user {kind} {factory!r}: cannot import module {mod_name!r} ({e}); "
            f"is its folder on the PYTHONPATH?"
        ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(
            f"user {kind} {factory!r}: module {mod_name!r} has no callable {fn_name!r}"
        )
    out = fn()
    net = out[0] if allow_tuple and isinstance(out, tuple) and len(out) == 2 else out
    if not isinstance(net, nn.Module):
        expected = (
            "a torch.nn.Module or (nn.Module, preprocess dict)"
            if allow_tuple
            else "a torch.nn.Module"
        )
        raise ValueError(
            f"user {kind} {factory!r}: {fn_name}() returned {type(out).__name__}, not {expected}"
        )
    source = inspect.getsourcefile(module)
    return out, (hashlib.sha256(Path(source).read_bytes()).hexdigest() if source else None)


def build_network_target(
    name: str, checkpoint=None, allow_random: bool = False, init_seed: int = 0, **kw
) -> NetworkTarget:
    """A built-in network (`mprnet-deblur`, with optional `:name=value` configuration overrides)
    or `module.path:factory`, with its checkpoint (random weights only for a built-in network
    with `allow_random`)."""
    if name.split(":")[0] in BUILTINS:
        base, options = parse_options(name)
        if (
            checkpoint is None and not options
        ):  # the published configuration: a downloaded checkpoint
            checkpoint = cached_target_checkpoint(base)
        return build_builtin_target(
            base, checkpoint, config=options, allow_random=allow_random, init_seed=init_seed, **kw
        )
    if checkpoint is None:
        raise ValueError(
            f"target {name!r} is a network: give its checkpoint (--target-weights FILE)"
        )
    if ":" in name:
        return build_user_target(name, checkpoint, **kw)
    raise ValueError(
        f"unknown network target {name!r}; known: {', '.join(NETWORK_TARGETS)}, module.path:factory"
    )


def target_from_spec(spec: dict, checkpoint, device: str | None = None) -> NetworkTarget:
    """Rebuild the target a member was made with; the checkpoint must hash to the spec's sha256
    (random weights: drawn again from the recorded seed; `checkpoint` is then None)."""
    auto = spec.get("auto_tile") or {}
    tiling = {
        "tile": spec.get("tile"),
        "overlap": spec.get("overlap") or auto.get("overlap") or 32,
        "device": device,
        "budget_mb": auto.get("budget_mb", None if spec.get("tile") else float("inf")),
        "compile": "compile" in spec,
    }  # older specs: whole
    if spec.get("target") in BUILTINS and spec.get("network") == BUILTINS[spec["target"]].network:
        random = spec.get("weights") == "random"
        if checkpoint is None and not random:
            checkpoint = cached_target_checkpoint(spec["target"])
        target = build_builtin_target(
            spec["target"],
            None if random else checkpoint,
            config=spec["config"],
            allow_random=random,
            init_seed=(spec.get("init") or {}).get("seed", 0),
            **tiling,
        )
        if target.spec().get("padding") != spec.get("padding"):
            raise ValueError(
                f"target {spec['target']}: the store was made padding its inputs "
                f"{spec.get('padding') or 'by reflection, bottom/right'}; this version pads them "
                f"{target.spec().get('padding') or 'by reflection, bottom/right'}: make its features "
                f"again (`make features`) and train on them (see CHANGELOG.md)"
            )
        if random:
            return target
    elif spec.get("network") == "user":
        target = build_user_target(
            spec["factory"],
            checkpoint,
            factor=spec.get("factor"),
            module_sha256=spec.get("module_sha256"),
            **tiling,
        )
    else:
        raise ValueError(f"spec of target {spec.get('target')!r} is not a network target")
    if auto and target.spec().get("auto_tile") != auto:
        raise ValueError(
            f"target {spec.get('target')}: its automatic tiling {target.spec().get('auto_tile')} differs "
            f"from the store's {auto} (another version of the network code?)"
        )
    if target.sha256 != spec.get("checkpoint_sha256"):
        raise ValueError(
            f"target {spec.get('target')}: checkpoint {checkpoint} (sha256 {target.sha256[:12]}) "
            f"differs from the one the store was made with (sha256 "
            f"{str(spec.get('checkpoint_sha256'))[:12]})"
        )
    return target
