"""`make prior-study`: four OSF rows over seeds, paired differences with bootstrap intervals."""

import json
from dataclasses import replace

import numpy as np
from toys import add_osf_member, make_task_stores

from common.log import collect
from training.prior_study import ROWS, paired_bootstrap, prior_study
from training.train import TrainConfig


def test_paired_bootstrap_brackets_the_mean_and_narrows_with_samples():
    rng = np.random.default_rng(0)
    small = rng.normal(0.3, 1.0, (3, 8))
    large = rng.normal(0.3, 1.0, (3, 200))
    lo, hi = paired_bootstrap(small)
    assert lo < small.mean() < hi
    lo2, hi2 = paired_bootstrap(large)
    assert hi2 - lo2 < hi - lo and lo2 > 0  # more samples: a tighter interval that excludes 0
    assert paired_bootstrap(np.zeros((3, 5))) == [0.0, 0.0]


def study_config(tmp_path, clip_dim: int, effnet_dim: int, **kw) -> TrainConfig:
    """Toy train/test stores with a 'clip-vit-b32' and an 'effnet-lite0' member, and a small run config."""
    train_store, test_store = make_task_stores(
        tmp_path / "stores", n_train=8, n_test=3, dim=clip_dim
    )
    for path in (train_store, test_store):
        add_osf_member(path, "effnet-lite0", effnet_dim)
    return TrainConfig(
        train_store=str(train_store),
        test_store=str(test_store),
        run="toy",
        batch=2,
        crop=32,
        workers=0,
        eval_every=0,
        **kw,
    )


def test_prior_study_trains_every_row_and_seed_and_reuses_them(tmp_path):
    cfg = study_config(tmp_path, 32, 24, runs_dir=str(tmp_path / "runs"), steps=3, log_every=1)
    out = prior_study(cfg, [0, 1])
    report = json.loads((out / "prior.json").read_text())
    assert [r["row"] for r in report["rows"]] == [row for row, _ in ROWS] and report[
        "n_samples"
    ] == 3
    dims = {
        r: json.loads((tmp_path / "runs" / f"toy-prior-{slug}-s0" / "model.json").read_text())[
            "model"
        ]["osf_dim"]
        for r, slug in (
            ("clip", "clip-vit-b-32"),
            ("effnet", "efficientnet-lite0"),
            ("both", "both-concatenated"),
        )
    }
    assert dims == {"clip": 32, "effnet": 24, "both": 56}
    assert all(len(r["psnr_refined_per_seed"]) == 2 for r in report["rows"])
    for d in report["differences"]:
        assert d["ci95"][0] <= d["psnr_diff"] <= d["ci95"][1]
    md = (out / "prior.md").read_text()
    assert "EfficientNet-Lite0 - CLIP ViT-B/32" in md and "| CLIP ViT-B/32 | random |" in md
    with collect() as logs:
        prior_study(cfg, [0, 1])  # all finished: nothing trains again
    assert "8 finished before and reused" in logs[0] and not any(x.startswith("==") for x in logs)


def test_prior_study_in_parallel_processes_gives_the_same_table(tmp_path):
    cfg = study_config(tmp_path, 16, 8, runs_dir=str(tmp_path / "a"), steps=2, threads=1)
    serial = json.loads((prior_study(cfg, [0]) / "prior.json").read_text())
    parallel = json.loads(
        (
            prior_study(replace(cfg, runs_dir=str(tmp_path / "b")), [0], jobs=2) / "prior.json"
        ).read_text()
    )
    assert (
        parallel["rows"] == serial["rows"]
    )  # same seed, same settings: CPU runs are bit-identical
