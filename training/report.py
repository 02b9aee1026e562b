"""Human-readable run reports: `runs/<run>/report.html` and `report.md` with curves and crops.

Written by `python -m training train` after evaluation (and by `python -m training report`).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from common.metrics import to_uint8
from ptgrm.images import save_png
from ptgrm.refine import refine
from stores import atomic_path

CROP = 160
SMOOTHING = 0.6  # EMA factor of the loss curve, per logged point (25 steps by default)


def smooth(values: list[float], alpha: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased at the start (TensorBoard's smoothing)."""
    out, acc = [], 0.0
    for k, v in enumerate(values, 1):
        acc = alpha * acc + (1 - alpha) * v
        out.append(acc / (1 - alpha**k))
    return out


def plot_curves(run_dir: Path) -> list[str]:
    """loss.png (raw per-batch loss, its smoothed mean, and the unrefined base's loss on the same
    crops as the reference) and psnr.png (test PSNR of refined and base at each evaluation) from
    metrics.jsonl; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    col = lambda k: [(r["step"], r[k]) for r in rows if k in r]  # noqa: E731
    written = []

    def figure(name: str, ylabel: str, draw) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
        draw(ax)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(run_dir / name) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        written.append(name)

    def loss(ax) -> None:
        raw, mean, base = col("loss"), col("loss_mean"), col("loss_base_mean")
        ax.plot(*zip(*raw), color="tab:blue", alpha=0.3, lw=0.8, label="loss of one batch (raw)")
        if mean:
            steps, vals = zip(*mean)
            ax.plot(
                steps, smooth(list(vals)), color="tab:blue", lw=2, label="refined, smoothed mean"
            )
        if base:
            steps, vals = zip(*base)
            ax.plot(
                steps,
                smooth(list(vals)),
                color="0.35",
                ls="--",
                lw=1.5,
                label="unrefined base on the same crops (reference)",
            )

    def psnr(ax) -> None:
        for k, style in (("eval_psnr_refined", "-o"), ("eval_psnr_base", "--")):
            pts = col(k)
            if pts:
                ax.plot(*zip(*pts), style, label=k.removeprefix("eval_psnr_"))

    if col("loss"):
        figure("loss.png", "Charbonnier loss per pixel", loss)
    if col("eval_psnr_refined"):
        figure("psnr.png", "test PSNR (dB)", psnr)
    return written


def crop_window(a: np.ndarray, b: np.ndarray, size: int = CROP) -> tuple[int, int]:
    """Top-left of the size x size window where a and b differ most (where refinement acted)."""
    diff = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(-1)
    h, w = diff.shape
    size_h, size_w = min(size, h), min(size, w)
    integral = np.pad(diff.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = (
        integral[size_h:, size_w:]
        - integral[:-size_h, size_w:]
        - integral[size_h:, :-size_w]
        + integral[:-size_h, :-size_w]
    )
    y, x = np.unravel_index(np.argmax(sums), sums.shape)
    return int(y), int(x)


def write_crops(run_dir: Path, model, split, rows: list[dict]) -> list[tuple[str, str]]:
    """Side-by-side crops (input | base | refined | gt) of the images with the largest and
    smallest gains; returns [(file name, caption)]."""
    by_gain = sorted(rows, key=lambda r: r["gain_psnr"])
    chosen = [("largest gain", by_gain[-1])] + (
        [("smallest gain", by_gain[0])] if len(rows) > 1 else []
    )
    index = {n: i for i, n in enumerate(split.names)}
    out = []
    for label, row in chosen:
        s = split.image(index[row["name"]])
        base = to_uint8(s["base"])
        refined = to_uint8(refine(model, s["lq"], s["base"], s["g"]))
        y, x = crop_window(refined, base)
        panels = [img[y : y + CROP, x : x + CROP] for img in (s["lq"], base, refined, s["gt"])]
        name = f"crops/{Path(row['name']).stem}.png"
        save_png(run_dir / name, np.concatenate(panels, axis=1))
        out.append(
            (
                name,
                f"{label}: {row['name']} ({row['psnr_base']:.2f} -> {row['psnr_refined']:.2f} dB; "
                f"crop at y={y}, x={x}; input | base | refined | ground truth)",
            )
        )
    return out


def results_table(r: dict) -> list[list[str]]:
    """The paper's format: one row, base -> refined."""
    return [
        [
            "dataset",
            "target",
            "OSF",
            "weights",
            f"PSNR ({r['space'].upper()})",
            "SSIM",
            "gain (95% CI)",
        ],
        [
            r["store"],
            r["target"]
            + (f" ({r['target_weights']})" if r.get("target_weights", "none") != "none" else ""),
            ", ".join(r["encoder"]),
            r["weights"],
            f"{r['psnr_base']:.2f} -> {r['psnr_refined']:.2f}",
            f"{r['ssim_base']:.4f} -> {r['ssim_refined']:.4f}",
            f"{r['gain_psnr']:+.2f} ({r['gain_psnr_ci95'][0]:+.2f}..{r['gain_psnr_ci95'][1]:+.2f})",
        ],
    ]


def write_report(run_dir: Path, model, split) -> Path:
    """report.md and report.html; every image they reference is written beside them."""
    run_dir = Path(run_dir)
    result = json.loads((run_dir / "eval.json").read_text())
    sidecar = json.loads((run_dir / "model.json").read_text())
    figures = [(name, name[:-4]) for name in plot_curves(run_dir)] + write_crops(
        run_dir, model, split, result["images"]
    )
    per_image = [
        ["image", "input PSNR", "base PSNR", "refined PSNR", "base SSIM", "refined SSIM"]
    ] + [
        [
            r["name"],
            f"{r['psnr_input']:.2f}",
            f"{r['psnr_base']:.2f}",
            f"{r['psnr_refined']:.2f}",
            f"{r['ssim_base']:.4f}",
            f"{r['ssim_refined']:.4f}",
        ]
        for r in result["images"]
    ]
    settings = {
        "train": sidecar.get("train", {}),
        "model": sidecar["model"],
        "params": sidecar["params"],
        "train_store": sidecar.get("train_store"),
        "test_store": sidecar.get("test_store"),
    }
    title = f"PTG-RM run {run_dir.name}"
    md = [
        f"# {title}",
        "",
        _md_table(results_table(result)),
        "",
        "## Per image",
        "",
        _md_table(per_image),
        "",
    ]
    md += [f"![{cap}]({name})\n\n*{cap}*\n" for name, cap in figures]
    md += ["## Settings", "", "```json", json.dumps(settings, indent=1), "```", ""]
    with atomic_path(run_dir / "report.md") as tmp:
        tmp.write_text("\n".join(md))
    body = [
        f"<h1>{html.escape(title)}</h1>",
        _html_table(results_table(result)),
        "<h2>Per image</h2>",
        _html_table(per_image),
    ]
    body += [
        f'<figure><img src="{html.escape(n)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}'
        f"</figcaption></figure>"
        for n, c in figures
    ]
    body += ["<h2>Settings</h2>", f"<pre>{html.escape(json.dumps(settings, indent=1))}</pre>"]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )
    with atomic_path(run_dir / "report.html") as tmp:
        tmp.write_text(page)
    return run_dir / "report.html"


def _md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    return f"<table><tr>{head}</tr>{body}</table>"
