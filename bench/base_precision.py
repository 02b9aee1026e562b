"""The stored float16 base against the official float32 -> uint8 conversion: mean base PSNR difference.

Run: `python bench/base_precision.py sci synthetic [tiny]` (numbers in docs/networks.md, "Stored base
precision"). sci: the published SCI weights on the lowlight demo's 33 test tiles; synthetic: the
same tiles plus Gaussian error at 25-45 dB (the PSNRs of the paper's bases); tiny: small random
networks (the mechanism only).
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.metrics import psnr, to_uint8  # noqa: E402
from pipeline.degrade import DEGRADATIONS, sample_rng  # noqa: E402
from pipeline.networks import build_network_target  # noqa: E402
from pipeline.sources import open_source  # noqa: E402


def demo(task_deg, seed=0):
    src = open_source("demo", "test")
    fn, params = DEGRADATIONS[task_deg]
    for i, s in enumerate(src.samples):
        gt = s.load()[0]
        lq_f, _ = fn(gt.astype(np.float32) / 255, sample_rng(seed, i), **params)
        yield gt, np.round(lq_f * 255).astype(np.uint8)


def row(name, pairs):
    p32, p16, moved = [], [], []
    for gt, base in pairs:
        a, b = to_uint8(base), to_uint8(base.astype(np.float16))
        p32.append(psnr(a, gt))
        p16.append(psnr(b, gt))
        moved.append((a != b).mean())
    p32, p16 = np.array(p32), np.array(p16)
    print(
        f"{name:40s} n={len(p32)} base {p32.mean():.3f} dB  fp16-fp32 mean {p16.mean() - p32.mean():+.4f} dB  "
        f"per-sample max |d| {np.abs(p16 - p32).max():.4f} dB  uint8 moved {100 * np.mean(moved):.2f} %"
    )


which = sys.argv[1:]
if "sci" in which:
    for v in ("easy", "medium", "difficult"):
        t = build_network_target(f"sci-{v}", device="cpu")
        row(
            f"sci-{v} on demo lowlight",
            ((gt, t(lq.astype(np.float32) / 255, {})) for gt, lq in demo("lowlight")),
        )
if "synthetic" in which:
    rng = np.random.default_rng(0)
    gts = [gt for gt, _ in demo("denoise25")]
    for target_db in (25, 30, 35, 40, 45):
        s = 255 * 10 ** (-target_db / 20)
        row(
            f"gt + N(0, {s:.2f}/255) ({target_db} dB)",
            ((gt, gt / 255 + rng.normal(0, s / 255, gt.shape).astype(np.float32)) for gt in gts),
        )
if "tiny" in which:
    for name, task in (
        ("mprnet-deblur:n_feat=8:scale_unetfeats=4:scale_orsnetfeats=4:num_cab=1", "deblur"),
        ("uformer-b:embed_dim=8:depths=1,1,1,1,1,1,1,1,1", "denoise25"),
    ):
        t = build_network_target(name, allow_random=True, device="cpu")
        row(
            f"{name.split(':')[0]} tiny random, {task}",
            ((gt, t(lq.astype(np.float32) / 255, {})) for gt, lq in demo(task)),
        )
