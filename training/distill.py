"""A small OSF predictor trained on cached (lq, g) pairs: PTG-RM without the pre-trained model.

Run: `python -m training distill --task deblur --run deblur` (what `make distill` calls). The
paper claims the pre-trained model is not needed at inference but its module takes g at every
call; this predictor makes the claim true. It writes `runs/<run>/distill/` and adds the refined
PSNR/SSIM with predicted g beside the ones with true g in `eval.json`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.log import bars
from ptgrm.images import flip, image_tensor
from ptgrm.predictor import SIZE, OSFPredictor, predict_g, save_predictor
from stores import write_json_atomic

from .data import SplitLike
from .evaluate import evaluate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 600
    batch: int = 16
    lr: float = 1e-3
    seed: int = 0


def whole_images(split: SplitLike, idx: np.ndarray, flips: np.ndarray) -> torch.Tensor:
    """Valid-size lq of samples `idx` with flips (0..3), each resized to SIZE: (B,3,SIZE,SIZE)."""
    out = []
    for i, f in zip(idx, flips):
        lq = flip(image_tensor(split.image(int(i))["lq"]), int(f))
        out.append(
            F.interpolate(
                lq, size=(SIZE, SIZE), mode="bicubic", antialias=True, align_corners=False
            )
        )
    return torch.cat(out)


def usable_samples(split: SplitLike) -> np.ndarray:
    """Indices of the samples the pipeline did not exclude (excluded ones have size (0, 0))."""
    usable = np.flatnonzero(np.asarray(split.hw)[:, 0] > 0)
    if not len(usable):
        raise ValueError(f"{split.path}: every sample is excluded; nothing to distill from")
    return usable


def train_predictor(split, dim: int, cfg: DistillConfig) -> tuple[OSFPredictor, list[float]]:
    """Fit g = P(lq) with cosine loss over all samples and their 4 flip variants."""
    torch.manual_seed(cfg.seed)
    model = OSFPredictor(dim)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    usable = usable_samples(split)
    cache = {}  # resized inputs are tiny: keep them
    losses = []
    for step in tqdm(
        range(cfg.steps), unit="step", desc="distill", dynamic_ncols=True, disable=not bars()
    ):
        rng = np.random.default_rng([cfg.seed, step])
        idx, flips = usable[rng.integers(0, len(usable), cfg.batch)], rng.integers(0, 4, cfg.batch)
        x = torch.cat(
            [
                cache.setdefault((int(i), int(f)), whole_images(split, [i], [f]))
                for i, f in zip(idx, flips)
            ]
        )
        g = torch.from_numpy(np.stack([split.g(int(i), int(f)) for i, f in zip(idx, flips)]))
        loss = (1 - F.cosine_similarity(model(x), g, dim=-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.eval(), losses


class PredictedG:
    """A split whose g comes from the predictor instead of the store (a SplitLike)."""

    def __init__(self, split: SplitLike, predictor: OSFPredictor):
        self.split, self.predictor = split, predictor

    @property
    def path(self):
        return self.split.path

    @property
    def hw(self) -> np.ndarray:
        return self.split.hw

    @property
    def names(self) -> list[str]:
        return self.split.names

    @property
    def metric_space(self) -> str:
        return self.split.metric_space

    def info(self) -> dict:
        return self.split.info()

    def image(self, i: int) -> dict:
        s = dict(self.split.image(i))
        s["g"] = predict_g(self.predictor, s["lq"])
        return s


def distill(run_dir: Path, model, train_split, test_split, cfg: DistillConfig) -> dict:
    """Train the predictor, then evaluate the run with predicted g beside true g in eval.json."""
    dim = train_split.info()["osf_dim"]
    predictor, losses = train_predictor(train_split, dim, cfg)
    cos = float(
        np.mean(
            [
                np.dot(PredictedG(test_split, predictor).image(i)["g"], test_split.g(i))
                for i in usable_samples(test_split)
            ]
        )
    )
    save_predictor(
        run_dir,
        predictor,
        {
            "steps": cfg.steps,
            "final_loss": float(np.mean(losses[-20:])),
            "test_cosine": cos,
            "train_store": train_split.info()["store"],
        },
    )
    true_g = evaluate(model, test_split)
    predicted = evaluate(model, PredictedG(test_split, predictor))
    eval_path = Path(run_dir) / "eval.json"
    result = json.loads(eval_path.read_text()) if eval_path.is_file() else true_g
    result.update(
        {
            "psnr_refined_true_g": true_g["psnr_refined"],
            "ssim_refined_true_g": true_g["ssim_refined"],
            "psnr_refined_predicted_g": predicted["psnr_refined"],
            "ssim_refined_predicted_g": predicted["ssim_refined"],
            "distill_test_cosine": cos,
        }
    )
    write_json_atomic(eval_path, result)
    log.info(
        f"distilled OSF predictor: test cosine to true g {cos:.3f}; refined PSNR with true g "
        f"{true_g['psnr_refined']:.2f} dB, with predicted g {predicted['psnr_refined']:.2f} dB "
        f"(base {true_g['psnr_base']:.2f})"
    )
    return result
