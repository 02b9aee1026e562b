"""The paper's Table 3 on your data: train every ablation of PTG-RM and write one table.

Run: `python -m training ablate --task deblur` (what `make ablate` calls). Each row is a run of
its own (`runs/<run>-ablate-<row>/`); rows already finished with the same settings are reused,
so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from stores import atomic_path, write_json_atomic

from .data import check_same_members
from .train import TrainConfig, open_splits, same_settings, train

log = logging.getLogger(__name__)

ROWS = [  # (row, changes to the training config)
    ("full PTG-RM", {}),
    ("w/o SVE", {"ablate": "sve"}),
    ("w/o channel attention", {"ablate": "channel_attention"}),
    ("w/o spatial attention", {"ablate": "spatial_attention"}),
    ("w/o position embeddings", {"ablate": "position_embedding"}),
    ("g by concatenation (no OSF mapping)", {"ablate": "osf_mapping"}),
    ("w/o g (no pre-trained prior)", {"ablate": "use_g"}),
    ("Eq. 1 output (mask form)", {"output": "eq1"}),
]


def _slug(row: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in row.lower()).strip("-").replace("--", "-")


def finished(run_dir: Path, cfg: TrainConfig, splits) -> dict | None:
    """The eval.json of a finished run made with these settings, else None; a run made on store
    members with other keys is refused (StoreError naming both)."""
    if not (run_dir / "eval.json").is_file() or not (run_dir / "model.json").is_file():
        return None
    sidecar = json.loads((run_dir / "model.json").read_text())
    if not same_settings(sidecar["train"], cfg):
        return None
    for role, split in zip(("train", "test"), splits):
        check_same_members(run_dir, role, sidecar.get(f"{role}_store"), split.info())
    return json.loads((run_dir / "eval.json").read_text())


def ablate(cfg: TrainConfig) -> Path:
    name = cfg.run or cfg.task
    rows, splits = [], open_splits(cfg)
    for row, changes in ROWS:
        run_cfg = replace(cfg, run=f"{name}-ablate-{_slug(row)}", **changes)
        run_dir = Path(cfg.runs_dir) / run_cfg.run
        result = finished(run_dir, run_cfg, splits)
        if result is None:
            log.info(f"== {row}")
            result = train(run_cfg)
        else:
            log.info(f"== {row}: finished before, reused")
        rows.append(
            {
                "row": row,
                "run": run_cfg.run,
                "params": result["params"],
                "psnr_base": result["psnr_base"],
                "psnr_refined": result["psnr_refined"],
                "ssim_refined": result["ssim_refined"],
                "gain_psnr": result["gain_psnr"],
                "gain_psnr_ci95": result["gain_psnr_ci95"],
            }
        )
    out = Path(cfg.runs_dir) / f"{name}-ablation"
    write_json_atomic(out / "ablation.json", {"task": cfg.task, "steps": cfg.steps, "rows": rows})
    lines = [
        f"# Ablation of PTG-RM ({cfg.task}, {cfg.steps} steps, seed {cfg.seed})",
        "",
        "| variant | params | PSNR base -> refined | SSIM refined | gain (95% CI) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['row']} | {r['params']:,} | {r['psnr_base']:.2f} -> {r['psnr_refined']:.2f} | "
        f"{r['ssim_refined']:.4f} | {r['gain_psnr']:+.2f} ({r['gain_psnr_ci95'][0]:+.2f}..{r['gain_psnr_ci95'][1]:+.2f}) |"
        for r in rows
    ]
    with atomic_path(out / "ablation.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    log.info("\n".join(lines))
    return out
