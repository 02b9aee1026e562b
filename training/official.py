"""The authors' released PTG-RM weights <-> this project's PTGRM: one name table, both directions.

Run: `python -m training import-official CKPT --run NAME` (and `export-official --run NAME OUT.pth`).
The authors' code (github.com/xiaogang00/pretrain_model_boost_restoration,
models/archs/low_light_transformer648_final.py, class `refinement2`) holds the module as the
attribute `refinement11` of its joint SNR-Aware network, so its parameters are saved as
`refinement11.<name>`. Every tensor has the same shape on both sides: only names change.
A checkpoint is read with `torch.load(weights_only=True)`, so loading one never runs code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from ptgrm.checkpoints import CheckpointError, load_checkpoint
from ptgrm.model import PTGRM, PTGRMConfig, count_parameters
from ptgrm.refine import load_model
from stores import atomic_path, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

PREFIX = "refinement11."
N_BLOCKS = 4  # the official module has num_blocks[0] = 4 Restormer blocks

# The one table: (official name, project name), in the order of the project's state dict.
MAPPING = (
    [
        ("r1.weight", "enc_conv1.weight"),
        ("r1norm.weight", "enc_norm1.weight"),
        ("r1norm.bias", "enc_norm1.bias"),
        ("r2.weight", "enc_conv2.weight"),
        ("r2norm.weight", "enc_norm2.weight"),
        ("r2norm.bias", "enc_norm2.bias"),
        ("r22.weight", "enc_conv3.weight"),
        ("mapp_position1.weight", "pos_m.0.weight"),
        ("mapp_position2.weight", "pos_m.2.weight"),
        ("mapp_space1.weight", "osf_m.0.weight"),
        ("mapp_space2.weight", "osf_m.2.weight"),
        ("r1_mask.weight", "mask.0.weight"),
        ("r2_mask.weight", "mask.2.weight"),
        ("resnet.conv1.weight", "short.conv1.weight"),
        ("resnet.conv1.bias", "short.conv1.bias"),
        ("resnet.conv2.weight", "short.conv2.weight"),
        ("resnet.conv2.bias", "short.conv2.bias"),
    ]
    + [
        (f"transformer.{i}.{official}", f"blocks.{i}.{ours}")
        for i in range(N_BLOCKS)
        for official, ours in (
            ("norm1.body.weight", "norm1.weight"),
            ("norm1.body.bias", "norm1.bias"),
            ("attn.temperature", "attn.temperature"),
            ("attn.qkv.weight", "attn.qkv.weight"),
            ("attn.qkv_dwconv.weight", "attn.qkv_dw.weight"),
            ("attn.project_out.weight", "attn.proj.weight"),
            ("norm2.body.weight", "norm2.weight"),
            ("norm2.body.bias", "norm2.bias"),
            ("ffn.project_in.weight", "ffn.project_in.weight"),
            ("ffn.dwconv.weight", "ffn.dw.weight"),
            ("ffn.project_out.weight", "ffn.project_out.weight"),
        )
    ]
    + [
        ("mapp_space11.weight", "osf_c.0.weight"),
        ("mapp_space22.weight", "osf_c.2.weight"),
        ("mapping11.weight", "chan_att.0.weight"),
        ("mapping12.weight", "chan_att.2.weight"),
        ("mapp_position11.weight", "pos_c.0.weight"),
        ("mapp_position22.weight", "pos_c.2.weight"),
        ("mapp11.weight", "kernel_pred.0.weight"),
        ("mapp12.weight", "kernel_pred.2.weight"),
        ("mapp1.weight", "spat_out.1.weight"),
        ("refine11.weight", "fuse.weight"),
        ("r1_decoder.weight", "dec_up1.weight"),
        ("r2_decoder.weight", "dec_up2.weight"),
        ("conv_last2.weight", "dec_conv.weight"),
        ("conv_last2.bias", "dec_conv.bias"),
        ("conv_last3.weight", "dec_out.weight"),
        ("conv_last3.bias", "dec_out.bias"),
    ]
)


class OfficialMismatch(ValueError):
    """A state dict does not fit the table and the module's shapes; the message lists why."""


def project_shapes(cfg: PTGRMConfig) -> dict[str, tuple]:
    """Parameter shapes of PTGRM(cfg), built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in PTGRM(cfg).state_dict().items()}


def config_for(sd: dict, name: str) -> PTGRMConfig:
    """The official layout is the full module; only the OSF width follows the checkpoint."""
    w = sd.get(name)
    return (
        PTGRMConfig(osf_dim=int(w.shape[1]))
        if isinstance(w, torch.Tensor) and w.ndim == 2
        else PTGRMConfig()
    )


def translate(sd: dict, pairs: list, want: dict[str, tuple], side: str) -> dict:
    """Rename `sd` by `pairs` (source -> destination) into exactly the names and shapes of `want`.

    Raises OfficialMismatch listing leftover sources, unfilled destinations and shape mismatches.
    """
    rename = dict(pairs)
    back = {dst: src for src, dst in pairs}
    out, unused, bad = {}, [], []
    for name, value in sd.items():
        dst = rename.get(name)
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        if dst is None or dst not in want:
            unused.append(f"{name} {shape}")
        elif shape != want[dst]:
            bad.append(f"{name} {shape} -> {dst} expects {want[dst]}")
        else:
            out[dst] = value
    missing = [
        f"{dst} {shape} <- expects {back.get(dst, '?')}"
        for dst, shape in want.items()
        if dst not in out and back.get(dst) not in sd
    ]
    if unused or missing or bad:
        parts = [f"{side}: the state dict does not match the PTG-RM name table"]
        for title, rows in (
            ("unused source parameters", unused),
            ("unfilled parameters", missing),
            ("shape mismatches", bad),
        ):
            if rows:
                parts.append(f"  {title} ({len(rows)}):\n" + "\n".join(f"    {r}" for r in rows))
        raise OfficialMismatch("\n".join(parts))
    return out


def strip_prefix(state_dict: dict) -> tuple[dict, int]:
    """The refinement module's own entries, and how many other entries were ignored.

    A leading `module.` (DataParallel) is dropped. When any key starts with `refinement11.`, only
    those keys are kept (the rest is the joint network's restorer); otherwise every key must be
    a refinement-module name.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if not any(k.startswith(PREFIX) for k in sd):
        return sd, 0
    own = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    return own, len(sd) - len(own)


def import_official(state_dict: dict) -> dict:
    """Official (joint-network or bare) state dict -> PTGRM state dict, every name used once."""
    sd, _ = strip_prefix(state_dict)
    cfg = config_for(sd, "mapp_space1.weight")
    return translate(sd, MAPPING, project_shapes(cfg), "import")


def export_official(project_state_dict: dict, prefix: str = PREFIX) -> dict:
    """PTGRM state dict -> the official names (under `prefix`), every name used once."""
    shapes = project_shapes(config_for(project_state_dict, "osf_m.0.weight"))
    want = {official: shapes[ours] for official, ours in MAPPING}
    out = translate(
        project_state_dict, [(ours, official) for official, ours in MAPPING], want, "export"
    )
    return {prefix + k: v for k, v in out.items()}


def load_official(path) -> dict:
    """A state dict from a .pth file: plain, or wrapped under a common key such as 'state_dict'."""
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        raise OfficialMismatch(str(e)) from None


def import_run(ckpt, run: str, runs_dir: str = "runs") -> Path:
    """Write `runs_dir/run/` (model.safetensors + model.json) from an official checkpoint."""
    ckpt = Path(ckpt)
    run_dir = Path(runs_dir) / run
    if (run_dir / "model.json").is_file():
        raise ValueError(f"{run_dir} already holds a run; choose another --run or remove it")
    raw = load_official(ckpt)
    sd = import_official(raw)
    _, ignored = strip_prefix(raw)
    model = PTGRM(config_for(sd, "osf_m.0.weight"))
    model.load_state_dict(sd, strict=True)
    with atomic_path(run_dir / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    sidecar = {
        "model": model.cfg.to_dict(),
        "params": count_parameters(model),
        "weights": "pretrained",
        "source": {
            "official_checkpoint": str(ckpt),
            "sha256": sha256_file(ckpt),
            "imported": len(sd),
            "ignored": ignored,
        },
    }
    write_json_atomic(run_dir / "model.json", sidecar)
    log.info(
        f"run {run_dir}: {len(sd)} tensors ({sidecar['params']:,} parameters) from {ckpt}"
        + (f", {ignored} tensors of the joint network ignored" if ignored else "")
    )
    return run_dir


def export_run(run: str, out, runs_dir: str = "runs", prefix: str = PREFIX) -> Path:
    """Write a run's weights as a .pth state dict with the official names (atomically)."""
    run_dir = Path(runs_dir) / run
    if not (run_dir / "model.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no run here (model.json missing)")
    model, _ = load_model(run_dir)
    sd = export_official({k: v.detach().clone() for k, v in model.state_dict().items()}, prefix)
    out = Path(out)
    with atomic_path(out) as tmp:
        torch.save(sd, tmp)
    log.info(
        f"{out}: {len(sd)} tensors with official names" + (f" under {prefix!r}" if prefix else "")
    )
    return out
