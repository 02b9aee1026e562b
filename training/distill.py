"""A small OSF predictor trained on cached (lq, g) pairs: PTG-RM without the pre-trained model.

Run: `python -m training distill --task deblur --run deblur` (what `make distill` calls). The
paper claims the pre-trained model is not needed at inference but its module takes g at every
call; this predictor makes the claim true. It writes `runs/<run>/distill/` and adds the refined
PSNR/SSIM with predicted g beside the ones with true g in `eval.json`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from stores import atomic_path, write_json_atomic

from .evaluate import evaluate

SIZE = 112  # predictor input: the whole image resized, as the encoder sees it


class OSFPredictor(nn.Module):
    """lq (B,3,H,W) in [0,1] -> unit vector (B,D): a 5-stage strided CNN, ~1.1 M parameters (D=512)."""

    def __init__(self, dim: int, width: int = 32):
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 8, width * 8]
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], dim)
        self.dim, self.width = dim, width

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(lq, size=(SIZE, SIZE), mode="bicubic", antialias=True, align_corners=False)
        x = self.features(x).mean((2, 3))  # (B, 8w)
        return F.normalize(self.head(x), dim=-1)


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 600
    batch: int = 16
    lr: float = 1e-3
    seed: int = 0


def whole_images(split, idx: np.ndarray, flips: np.ndarray) -> torch.Tensor:
    """Valid-size lq of samples `idx` with flips (0..3), each resized to SIZE: (B,3,SIZE,SIZE)."""
    out = []
    for i, f in zip(idx, flips):
        lq = torch.from_numpy(np.ascontiguousarray(split.image(int(i))["lq"])).permute(2, 0, 1)[None].float() / 255
        lq = lq.flip(-1) if f & 1 else lq
        lq = lq.flip(-2) if f & 2 else lq
        out.append(F.interpolate(lq, size=(SIZE, SIZE), mode="bicubic", antialias=True, align_corners=False))
    return torch.cat(out)


def usable_samples(split) -> np.ndarray:
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
    for step in tqdm(range(cfg.steps), unit="step", desc="distill", dynamic_ncols=True):
        rng = np.random.default_rng([cfg.seed, step])
        idx, flips = usable[rng.integers(0, len(usable), cfg.batch)], rng.integers(0, 4, cfg.batch)
        x = torch.cat([cache.setdefault((int(i), int(f)), whole_images(split, [i], [f])) for i, f in zip(idx, flips)])
        g = torch.from_numpy(np.stack([split.g(int(i), int(f)) for i, f in zip(idx, flips)]))
        loss = (1 - F.cosine_similarity(model(x), g, dim=-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.eval(), losses


class PredictedG:
    """A split whose g comes from the predictor instead of the store (same interface)."""

    def __init__(self, split, predictor: OSFPredictor):
        self.split, self.predictor = split, predictor

    def __getattr__(self, name):
        return getattr(self.split, name)

    @torch.no_grad()
    def image(self, i: int) -> dict:
        s = dict(self.split.image(i))
        lq = torch.from_numpy(np.ascontiguousarray(s["lq"])).permute(2, 0, 1)[None].float() / 255
        s["g"] = self.predictor(lq)[0].numpy()
        return s


def save_predictor(run_dir: Path, model: OSFPredictor, meta: dict) -> None:
    d = Path(run_dir) / "distill"
    with atomic_path(d / "predictor.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json_atomic(d / "predictor.json", {"dim": model.dim, "width": model.width, "size": SIZE, **meta})


def load_predictor(run_dir: Path) -> OSFPredictor:
    d = Path(run_dir) / "distill"
    if not (d / "predictor.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no distilled OSF predictor; run `make distill RUN={Path(run_dir).name}`")
    meta = json.loads((d / "predictor.json").read_text())
    model = OSFPredictor(meta["dim"], meta["width"])
    model.load_state_dict(load_file(str(d / "predictor.safetensors")))
    return model.eval()


def distill(run_dir: Path, model, train_split, test_split, cfg: DistillConfig, log=print) -> dict:
    """Train the predictor, then evaluate the run with predicted g beside true g in eval.json."""
    dim = train_split.info()["osf_dim"]
    predictor, losses = train_predictor(train_split, dim, cfg)
    cos = float(np.mean([np.dot(PredictedG(test_split, predictor).image(i)["g"], test_split.g(i))
                         for i in usable_samples(test_split)]))
    save_predictor(run_dir, predictor, {"steps": cfg.steps, "final_loss": float(np.mean(losses[-20:])),
                                        "test_cosine": cos, "train_store": train_split.info()["store"]})
    true_g = evaluate(model, test_split)
    predicted = evaluate(model, PredictedG(test_split, predictor))
    eval_path = Path(run_dir) / "eval.json"
    result = json.loads(eval_path.read_text()) if eval_path.is_file() else true_g
    result.update({"psnr_refined_true_g": true_g["psnr_refined"], "ssim_refined_true_g": true_g["ssim_refined"],
                   "psnr_refined_predicted_g": predicted["psnr_refined"],
                   "ssim_refined_predicted_g": predicted["ssim_refined"], "distill_test_cosine": cos})
    write_json_atomic(eval_path, result)
    log(f"distilled OSF predictor: test cosine to true g {cos:.3f}; refined PSNR with true g "
        f"{true_g['psnr_refined']:.2f} dB, with predicted g {predicted['psnr_refined']:.2f} dB "
        f"(base {true_g['psnr_base']:.2f})")
    return result
