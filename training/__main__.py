"""Stage 2 command line: `python -m training train|eval --task deblur --data demo`."""
import argparse
import sys
from dataclasses import fields
from pathlib import Path

from stores import StoreError

from .train import TrainConfig, open_splits, summary, train, write_eval

D = TrainConfig()
HELP = {
    "task": "restoration task", "data": "'demo' or the dataset folder given to `make features`",
    "store_root": "where stores live", "train_store": "train store path (default: search store_root)",
    "test_store": "test store path (default: search store_root)",
    "target": "target member name (default: the store's only complete one)",
    "encoder": "OSF member name(s), comma-separated to concatenate", "run": "run name (default: the task)",
    "runs_dir": "where runs are written", "steps": "training iterations", "batch": "crops per step",
    "crop": "crop size in px (multiple of 4)", "lr": "Adam learning rate", "lr_min": "cosine floor",
    "seed": "seed of initialisation and data order", "workers": "loader processes",
    "threads": "torch CPU threads (0: default)", "log_every": "steps between metrics.jsonl lines",
    "ckpt_every": "steps between checkpoints", "resume": "continue an interrupted run from its checkpoint",
}


def add_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed from its default."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(D, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=HELP[f.name])
        else:
            kind = type(default) if default is not None else str
            p.add_argument(flag, type=kind, default=default, help=f"{HELP[f.name]} (default: {default})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_config_args(sub.add_parser("train", help="train PTG-RM, then evaluate it; writes runs/<run>/",
                                   description="Fit PTG-RM on the task's train store and evaluate on "
                                   "its test store. Outputs: model.safetensors + model.json, "
                                   "metrics.jsonl, eval.json in runs/<run>/."))
    add_config_args(sub.add_parser("eval", help="evaluate a trained run again on the test store"))
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k != "cmd"})
    try:
        if args.cmd == "train":
            train(cfg)
        else:
            run_eval(cfg)
    except (StoreError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_eval(cfg: TrainConfig) -> None:
    import json

    from .evaluate import evaluate
    from .train import load_model

    run_dir = Path(cfg.runs_dir) / (cfg.run or cfg.task)
    if not (run_dir / "model.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no trained run here (model.json missing)")
    model, sidecar = load_model(run_dir)
    _, test_split = open_splits(cfg)
    result = evaluate(model, test_split)
    previous = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    result.update({k: previous.get(k, sidecar.get(k)) for k in ("task", "run", "train_store", "params", "steps")})
    write_eval(run_dir, result)
    print(summary(result))


if __name__ == "__main__":
    sys.exit(main())
