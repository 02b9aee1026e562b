"""Inference: restore a folder of degraded images with target + encoder + a trained PTG-RM.

Run: `python -m pipeline restore --in DIR --out DIR --run deblur` (what `make restore` calls).
The target and encoder are rebuilt from the specs recorded in the run, and checked against the
weights hashes the run was trained with. A non-blind target (the demo's `wiener`) reads the
blur kernel from `<image stem>.json` beside each image (`{"kernel": [[...]]}`).
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.log import bars
from common.metrics import to_uint8
from common.privacy import local_path
from ptgrm.images import save_png
from ptgrm.predictor import load_predictor, predict_g
from ptgrm.refine import load_model, refine

from .encoders import build_encoder, spec_dtype
from .names import is_user_encoder, weights_arg
from .sources import IMAGE_SUFFIXES, SourceError, read_image
from .targets import TARGETS, build_target

log = logging.getLogger(__name__)


def require_named(name: str, kind: str, allow_code) -> None:
    """A run never decides what code runs: its user `module:factory` only when the user names it."""
    if name not in allow_code:
        raise ValueError(
            f"the run's {kind} {name!r} imports and runs code: pass --{kind} {name} to "
            f"`python -m pipeline restore` if you trust it (its file must hash as recorded)"
        )


def target_from_spec(spec: dict, target_weights: str | None = None, allow_code=()):
    """The frozen target a store member was made with, from the spec recorded in its key; a user
    target only when named in `allow_code`."""
    if spec.get("network") == "user":
        require_named(str(spec.get("factory")), "target", allow_code)
    if spec.get(
        "network"
    ):  # a network: rebuilt from its checkpoint, which must hash to the spec's sha256
        from .networks import packaged_checkpoint
        from .networks import target_from_spec as network_from_spec

        # random weights are drawn again from their seed; shipped ones (sci-*) are found in the project
        if (
            not target_weights
            and spec.get("checkpoint_sha256")
            and not packaged_checkpoint(spec.get("target", ""))
        ):
            raise ValueError(
                f"the run's target {spec.get('target')} is a network: pass --target-weights FILE "
                f"(sha256 {str(spec.get('checkpoint_sha256'))[:12]}...)"
            )
        return network_from_spec(spec, target_weights)
    name = spec.get("target")
    if name not in TARGETS:
        raise ValueError(
            f"the run's target {name!r} cannot be rebuilt here; known: {', '.join(sorted(TARGETS))}"
        )
    accepted = inspect.signature(TARGETS[name]).parameters
    return build_target(name, **{k: v for k, v in spec.items() if k in accepted})


def encoders_from_run(build: list[dict], clip_weights: str | None = None, allow_code=()) -> list:
    """The encoders a run was trained with; weights must hash to what the store recorded; a user
    encoder only when named in `allow_code`, its module file hashing as recorded."""
    out = []
    for b in build:
        spec = b["spec"]
        if is_user_encoder(b["name"]):
            require_named(b["name"], "encoder", allow_code)
        random = spec.get("weights") == "random"
        recorded = local_path(
            weights_arg(b["name"], clip_weights or b.get("clip_weights"), b.get("sd_weights"))
        )
        enc = build_encoder(
            local_path(b["name"]),
            None if random else recorded,
            allow_random=random,
            init_seed=b.get("init_seed") or 0,
            module_sha256=spec.get("module_sha256"),
            dtype=spec_dtype(spec),
        )
        if enc.weights.get("sha256") != spec.get("weights_sha256") or enc.weights[
            "weights"
        ] != spec.get("weights"):
            raise ValueError(
                f"encoder {b['name']}: weights {enc.weights['weights']} "
                f"(sha256 {str(enc.weights.get('sha256'))[:12]}) differ from the run's "
                f"({spec.get('weights')}, sha256 {str(spec.get('weights_sha256'))[:12]}); "
                f"pass the same --clip-weights"
            )
        out.append(enc)
    return out


def predicted_g(predictor, images: list[np.ndarray]) -> np.ndarray:
    """(N, 1, D): the predictor's g for each unflipped image."""
    return np.stack([predict_g(predictor, img) for img in images])[:, None]


def restore_folder(
    src: Path,
    dst: Path,
    run_dir: Path,
    clip_weights: str | None = None,
    osf: str = "encoder",
    target_weights: str | None = None,
    allow_code=(),
) -> list[Path]:
    """`osf='encoder'` runs the pre-trained encoder(s); `'distilled'` predicts g with the run's
    distilled predictor instead (no pre-trained model at inference). `allow_code`: the user
    `module:factory` targets and encoders the user trusts (`--target`, `--encoder`)."""
    model, sidecar = load_model(run_dir)
    info = sidecar["train_store"]
    target = target_from_spec(
        info["target_spec"], target_weights or info.get("target_weights"), allow_code
    )
    if osf == "distilled":
        predictor = load_predictor(run_dir)
        encoders = [lambda imgs: predicted_g(predictor, imgs)]
    else:
        encoders = encoders_from_run(info["encoder_build"], clip_weights, allow_code)
    images = sorted(p for p in Path(src).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {src}")
    log.info(
        f"restoring {len(images)} images from {src} with target {target.id}, g from "
        f"{'the distilled predictor' if osf == 'distilled' else ', '.join(e.name for e in encoders)} "
        f"(weights: {sidecar['weights']}) and run {run_dir}"
    )
    written = []
    for path in tqdm(images, unit="img", desc="restore", dynamic_ncols=True, disable=not bars()):
        lq, _ = read_image(path)
        meta_file = path.with_suffix(".json")
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        # the store keeps base as float16; the module was trained on exactly that
        base = target(lq.astype(np.float32) / 255, meta).astype(np.float16).astype(np.float32)
        g = np.concatenate([e([lq])[0, 0] for e in encoders])  # unflipped variant
        out = to_uint8(refine(model, lq, base, g))
        written.append(save_png(Path(dst) / f"{path.stem}.png", out))
    return written
