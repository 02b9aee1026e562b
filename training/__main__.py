"""Stage 2 command line: `python -m training train|eval --task deblur --data demo`.

Also `import-official CKPT --run NAME` and `export-official --run NAME OUT.pth`: the authors'
released PTG-RM weights in and out of a run folder.
"""

import argparse
import os
import sys
from pathlib import Path

import common.startup  # noqa: F401 (first: OpenMP settings before numpy and torch load)
from common.privacy import scrub
from stores import StoreError
from stores.cli import Parser, config_from
from stores.cli import add_config_args as add_settings

from .data import Split, check_same_members, find_store
from .official import PREFIX, export_run, import_run
from .train import TrainConfig, summary, train, write_eval


def add_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (its help is the field's)."""
    add_settings(p, TrainConfig)


def main(argv=None) -> int:
    parser = Parser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    train_parser = sub.add_parser(
        "train",
        help="train PTG-RM, then evaluate it; writes runs/<run>/",
        description="Fit PTG-RM on the task's train store and evaluate on "
        "its test store. Outputs: model.safetensors + model.json, state.pt, "
        "metrics.jsonl, eval.json, eval.csv, report.html/.md, tb/ in runs/<run>/.",
    )
    add_config_args(train_parser)
    train_parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine: DDP through "
        "torch.distributed.run (one per GPU; gloo on CPU) (default: 1)",
    )
    add_config_args(
        sub.add_parser("eval", help="evaluate a trained or imported run on the test store")
    )
    add_config_args(
        sub.add_parser(
            "ablate",
            help="train every ablation of the paper's Table 3, write one table",
            description="One run per variant (full, w/o SVE, w/o channel or "
            "spatial attention, w/o position embeddings, g by concatenation, "
            "w/o g, Eq. 1 output), then runs/<run>-ablation/ablation.{md,json}. "
            "Finished rows are reused.",
        )
    )
    study_parser = sub.add_parser(
        "prior-study",
        help="does the pre-trained prior matter? no OSF, random CLIP, "
        "pre-trained EfficientNet-Lite0 and both, over seeds; one table",
        description="Needs the task's stores with the clip-vit-b32 and effnet-lite0 "
        "members (`make prior-study` builds them). Writes runs/<run>-prior/prior.{md,json}: "
        "mean PSNR/SSIM per row and paired differences with 95%% bootstrap intervals "
        "over test samples and seeds. Finished runs are reused.",
    )
    add_config_args(study_parser)
    study_parser.add_argument(
        "--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)"
    )
    study_parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each in its own process "
        "(several small runs share one GPU well) (default: %(default)s)",
    )
    distill_parser = sub.add_parser(
        "distill",
        help="train a small OSF predictor so inference needs no "
        "pre-trained model; adds predicted-g results to eval.json",
    )
    add_config_args(distill_parser)
    distill_parser.add_argument(
        "--distill-steps", type=int, default=600, help="predictor steps (default: 600)"
    )
    add_official_parsers(sub)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "import-official":
            import_run(args.ckpt, args.run, args.runs_dir)
        elif args.cmd == "export-official":
            export_run(args.run, args.out, args.runs_dir, prefix=args.prefix)
        else:
            if args.cmd == "train" and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
                return launch_ddp(args.nproc, sys.argv[1:] if argv is None else list(argv))
            cfg = config_from(TrainConfig, args)
            if args.cmd == "train":
                train(cfg)
            elif args.cmd == "ablate":
                from .ablate import ablate

                ablate(cfg)
            elif args.cmd == "prior-study":
                from .prior_study import prior_study

                prior_study(
                    cfg, [int(x) for x in args.seeds.split(",") if x.strip()], jobs=args.jobs
                )
            elif args.cmd == "distill":
                run_distill(cfg, args.distill_steps)
            else:
                run_eval(cfg)
    except (StoreError, ValueError, FileNotFoundError) as e:
        print(f"error: {scrub(e)}", file=sys.stderr)
        return 1
    return 0


def launch_ddp(nproc: int, argv: list[str]) -> int:
    """Re-run this command in `nproc` processes under torch.distributed.run (torchrun).

    The command's own flags are passed through untouched (torchrun's parser would mistake
    `--run` for an abbreviation of its `--run-path`)."""
    from torch.distributed import run as torchrun

    launcher = torchrun.parse_args(
        ["--standalone", "--nproc_per_node", str(nproc), "-m", "training"]
    )
    launcher.training_script_args = [
        a
        for i, a in enumerate(argv)
        if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc") and not a.startswith("--nproc=")
    ]
    torchrun.run(launcher)
    return 0


def add_official_parsers(sub) -> None:
    p = sub.add_parser(
        "import-official",
        help="make a run from the authors' released PTG-RM weights",
        description="Read an official checkpoint (.pth state dict of the joint network, "
        f"refinement module under {PREFIX!r}, or the module alone) with "
        "torch.load(weights_only=True), rename it to this PTG-RM and write "
        "runs/<run>/model.safetensors + model.json (refuses an existing run); "
        "then `eval --run NAME`.",
    )
    p.add_argument("ckpt", help="official .pth checkpoint")
    p.add_argument("--run", required=True, help="run name to write")
    p.add_argument("--runs-dir", default="runs", help="where runs are written (default: runs)")
    p = sub.add_parser(
        "export-official",
        help="write a run's weights with the official names",
        description="Write runs/<run>'s PTG-RM weights as a .pth state dict (plain dict "
        "of tensors) with the authors' parameter names, atomically.",
    )
    p.add_argument("out", help="output .pth file")
    p.add_argument("--run", required=True, help="run name to read")
    p.add_argument("--runs-dir", default="runs", help="where runs live (default: runs)")
    p.add_argument("--prefix", default=PREFIX, help=f"name prefix (default: {PREFIX}; '' for none)")


def run_eval(cfg: TrainConfig) -> None:
    import json

    from ptgrm.refine import load_model

    from .evaluate import evaluate

    run_dir = Path(cfg.runs_dir) / (cfg.run or cfg.task)
    if not (run_dir / "model.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no trained run here (model.json missing)")
    model, sidecar = load_model(run_dir)
    encoders = cfg.encoder.split(",") if cfg.encoder else None  # only the test store is read
    test_split = Split.open(
        cfg.test_store or find_store(cfg.store_root, cfg.data, cfg.task, "test"),
        cfg.target,
        encoders,
    )
    check_same_members(run_dir, "test", sidecar.get("test_store"), test_split.info())
    result = evaluate(model, test_split, save_dir=run_dir / "images" if cfg.save_images else None)
    previous = (
        json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    )
    fallback = {"task": cfg.task, "run": run_dir.name}  # an imported run has no training record
    result.update(
        {
            k: previous.get(k, sidecar.get(k, fallback.get(k)))
            for k in ("task", "run", "train_store", "params", "steps", "precision")
        }
    )
    if "source" in sidecar:
        result["source"] = sidecar["source"]
    write_eval(run_dir, result)
    print(summary(result))


def run_distill(cfg: TrainConfig, steps: int) -> None:
    from ptgrm.refine import load_model

    from .distill import DistillConfig, distill
    from .train import open_splits

    if (
        cfg.format == "wds"
    ):  # distillation reads samples by index, which a streamed export does not serve
        raise ValueError(
            "distill reads the Zarr train store (samples by index); drop --format wds (FORMAT=wds)"
        )
    run_dir = Path(cfg.runs_dir) / (cfg.run or cfg.task)
    if not (run_dir / "model.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no trained run here; `make train` first")
    model, _ = load_model(run_dir)
    train_split, test_split = open_splits(cfg)
    distill(run_dir, model, train_split, test_split, DistillConfig(steps=steps, seed=cfg.seed))


if __name__ == "__main__":
    sys.exit(main())
