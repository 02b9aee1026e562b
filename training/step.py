"""One optimisation step of PTG-RM: eager, or captured once as a CUDA graph and replayed.

PTG-RM is small (0.67 M parameters): on a GPU a step is ~850 kernels of a few microseconds each,
so eager training is bound by Python and kernel launches, not by the GPU. `--cuda-graph` captures
the whole step (forward, loss, backward, Adam) once and replays it: one launch per step.

What capture needs, and how this module provides it:
- static inputs: each batch is copied into the same device buffers (`non_blocking` from pinned
  host memory), which the graph reads;
- no host synchronisation inside the step: the loss statistics are summed on the device
  (`loss_sum`) and read only on log steps;
- an optimizer whose step lives on the device: Adam with `fused=True, capturable=True` and the
  learning rate as a device tensor, which the scheduler fills outside the graph;
- warm-up before capture (cuBLAS/cuDNN workspaces, autocast without its weight cache): the first
  `WARMUP` steps run eagerly on a side stream. They are real steps of the run.

On a CPU (and under DDP, or for a batch whose shape differs from the captured one) the same code
runs eagerly, with the same static buffers and fused Adam: the capture path is exercised
everywhere, and only the capture itself is skipped, with the reason said once.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext

import torch

from .losses import charbonnier

log = logging.getLogger(__name__)

WARMUP = 3  # eager steps on a side stream before the capture
KEYS = ("lq", "base", "gt", "g")


def make_optimizer(params, lr: float, device: torch.device, graph: bool) -> torch.optim.Adam:
    """Adam as the paper trains it; for `--cuda-graph` fused, and on a GPU capturable with the
    learning rate as a device tensor (so the captured step reads the scheduler's current rate)."""
    if not graph:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))
    capturable = device.type == "cuda"
    return torch.optim.Adam(
        params,
        lr=torch.tensor(lr, device=device),
        betas=(0.9, 0.99),
        fused=True,
        capturable=capturable,
    )


def float_lrs(state: dict) -> dict:
    """An optimizer or scheduler state dict whose learning rates are plain floats: checkpoints of
    eager and graph runs are interchangeable (a run may resume in the other mode, or elsewhere)."""
    plain = lambda v: float(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
    for group in state.get("param_groups", []):
        for k in ("lr", "initial_lr"):
            if k in group:
                group[k] = plain(group[k])
    for k in ("base_lrs", "_last_lr"):
        if k in state:
            state[k] = [plain(v) for v in state[k]]
    return state


IMPLEMENTATION = (
    "fused",
    "capturable",
    "foreach",
    "differentiable",
)  # how, not what, Adam computes


def load_optimizer(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state into `opt` as this run built it. load_state_dict alone
    would take the checkpoint's implementation flags (an eager run's `capturable=False` into a
    graph run, whose tensor rate then fails and whose capture is refused; a graph run's `fused`
    into an eager one) and its float rates (which a captured step would bake in). Here the flags
    stay this run's (they also place the loaded per-parameter state) and the rates their form."""
    mine = [
        {k: g[k] for k in (*IMPLEMENTATION, "lr", "initial_lr") if k in g} for g in opt.param_groups
    ]
    groups = [
        {**saved, **{k: m[k] for k in IMPLEMENTATION if k in m}}
        for saved, m in zip(state["param_groups"], mine)
    ]
    opt.load_state_dict({**state, "param_groups": groups})
    for group, m in zip(opt.param_groups, mine):
        for k in ("lr", "initial_lr"):
            if isinstance(m.get(k), torch.Tensor):  # the checkpoint's rate in this run's tensor
                group[k] = m[k].fill_(float(group[k]))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_bf16(precision: str, device) -> bool:
    """Whether a training's forward pass runs under bfloat16 autocast (--precision): 'bf16', or
    'auto' on a CUDA GPU and on a CPU with native bfloat16."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--precision {precision!r}: expected auto, bf16 or fp32")
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    return precision == "bf16" or (precision == "auto" and native)


def train_step(
    net,
    batch: dict,
    device,
    perceptual,
    weight: float,
    world: int,
    no_ref=None,
    cache: bool = True,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, base's loss) of one (local) batch, summed over pixels (moved to `device` first: a
    no-op for the static buffers). Scaled by
    the world size so DDP's gradient average equals the gradient of the single-process summed loss.
    `no_ref(refined, lq, base)`: a no-reference loss, which never reads the ground truth (the base's
    loss is then the same loss of the clamped base). `bf16`: the forward pass under bfloat16
    autocast (`autocast_bf16` decides it for a training)."""
    lq, base, gt, g = to_device(batch, device).values()
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
        if bf16
        else nullcontext()
    )
    with amp:
        refined = net(base, lq, g)
    refined = refined.float()
    if no_ref is not None:
        with torch.no_grad():
            base_loss = no_ref(base.float().clamp(0, 1), lq, base)
        return no_ref(refined, lq, base) * world, base_loss * world
    loss = charbonnier(refined, gt)
    if perceptual is not None:
        loss = loss + weight * perceptual(refined, gt)
    # the unrefined base's loss on the same crops: the reference a run must beat
    with torch.no_grad():
        base_loss = charbonnier(base.float().clamp(0, 1), gt)
    return loss * world, base_loss * world


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device` (channels_last images on a GPU)."""
    cl = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    out = {k: batch[k].to(device, non_blocking=True) for k in KEYS}
    out["lq"], out["base"] = (out[k].contiguous(memory_format=cl) for k in ("lq", "base"))
    return out


class Step:
    """`step(batch)` trains on one batch and returns its loss tensor (on the device, not read);
    `loss_sum` holds (refined, base) loss per pixel summed over the steps since it was zeroed."""

    def __init__(
        self,
        net,
        opt,
        device,
        world: int,
        perceptual=None,
        weight: float = 0.0,
        no_ref=None,
        graph: bool = False,
        bf16: bool | None = None,
    ):
        self.net, self.opt, self.device, self.world = net, opt, device, world
        self.args = (perceptual, weight, world, no_ref)
        self.bf16 = autocast_bf16("auto", device) if bf16 is None else bf16
        self.loss_sum = torch.zeros(2, device=device)
        self.graph, self.static, self.captured, self.loss = graph, None, None, None
        self.steps = 0
        if graph:
            why = (
                "not on a GPU"
                if device.type != "cuda"
                else "DDP (several processes)"
                if world > 1
                else None
            )
            if why:
                log.info(
                    f"--cuda-graph: capture skipped ({why}); the step runs eagerly with static buffers and fused Adam"
                )
                self.graph = False
            self.static = {}

    def _eager(self, batch: dict, cache: bool = True) -> torch.Tensor:
        perceptual, weight, world, no_ref = self.args
        loss, base_loss = train_step(
            self.net, batch, self.device, perceptual, weight, world, no_ref, cache, self.bf16
        )
        self.loss_sum += torch.stack([loss.detach(), base_loss]) / (batch["gt"].numel() * world)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def _stage(self, batch: dict) -> bool:
        """Copy the batch into the static buffers; False when its shapes differ from theirs."""
        if not self.static:
            self.static.update(to_device(batch, self.device))
            return True
        if any(self.static[k].shape != batch[k].shape for k in KEYS):
            return False
        for k in KEYS:
            self.static[k].copy_(batch[k], non_blocking=True)
        return True

    def __call__(self, batch: dict) -> torch.Tensor:
        self.steps += 1
        if self.static is None:  # plain eager
            return self._eager(batch)
        if not self._stage(batch):
            if self.captured is not None or self.graph:
                warnings.warn(
                    "--cuda-graph: a batch of another shape runs eagerly (the graph was captured "
                    f"for {tuple(self.static['lq'].shape)})"
                )
            return self._eager(batch)
        if not self.graph:
            return self._eager(self.static)
        if self.captured is None and self.steps <= WARMUP:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loss = self._eager(self.static, cache=False)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return loss
        if self.captured is None:
            self.captured = torch.cuda.CUDAGraph()
            self.opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(self.captured):
                self.loss = self._capture_body()
        self.captured.replay()
        return self.loss

    def _capture_body(self) -> torch.Tensor:
        perceptual, weight, world, no_ref = self.args
        loss, base_loss = train_step(
            self.net, self.static, self.device, perceptual, weight, world, no_ref, False, self.bf16
        )
        self.loss_sum += torch.stack([loss.detach(), base_loss]) / (
            self.static["gt"].numel() * world
        )
        loss.backward()
        self.opt.step()
        return loss
