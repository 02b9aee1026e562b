"""Stage 1 command line: `python -m pipeline features --task deblur --data demo`, `restore ...`."""

import argparse
import errno
import sys
import warnings
from pathlib import Path

import common.startup  # noqa: F401 (first: OpenMP settings before numpy and torch load)
from common.privacy import scrub
from stores.cli import Parser, add_config_args, config_from

from .download import weights_main, weights_parser
from .plan import FeaturesConfig, plan_features, report_complete


def features_parser(sub) -> argparse.ArgumentParser:
    """`features`: one flag per FeaturesConfig field (its help is the field's); never abbreviated."""
    p = sub.add_parser(
        "features",
        help="build or complete a task's train and test stores",
        allow_abbrev=False,
        description="Degrade (or load) image pairs, run the frozen target and encoder, "
        "and cache lq/gt, base and OSF in one Zarr store per split. Complete members "
        "with the same key are reused; an interrupted run resumes where it stopped.",
    )
    add_config_args(p, FeaturesConfig)
    return p


def features_config(args: argparse.Namespace) -> FeaturesConfig:
    return config_from(FeaturesConfig, args)


def restore_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "restore",
        help="restore a folder of degraded images with a trained run",
        description="Run the run's frozen target and encoder(s), then its PTG-RM, on every "
        "image of --in; write PNGs of the same names to --out. A non-blind target reads "
        "<stem>.json beside each image (the blur kernel).",
    )
    p.add_argument("--in", dest="src", required=True, help="folder of degraded images")
    p.add_argument("--out", dest="dst", required=True, help="output folder (created)")
    p.add_argument("--run", required=True, help="trained run name (runs/<run>/)")
    p.add_argument("--runs-dir", default="runs", help="where runs live (default: %(default)s)")
    p.add_argument(
        "--clip-weights",
        default=None,
        help="the CLIP checkpoint the run's store was made with "
        "(default: the path recorded in the store)",
    )
    p.add_argument(
        "--target-weights",
        default=None,
        help="the network target's checkpoint (default: the path "
        "recorded in the store; its sha256 must match)",
    )
    p.add_argument(
        "--osf",
        choices=("encoder", "distilled"),
        default="encoder",
        help="g from the pre-trained "
        "encoder, or from the run's distilled predictor (`make distill`) (default: %(default)s)",
    )
    p.add_argument(
        "--target",
        default=None,
        help="a run made with a user target `module:factory` runs it only "
        "when you name it here (a run never decides what code runs); its file must hash as recorded",
    )
    p.add_argument(
        "--encoder",
        action="append",
        default=[],
        help="the same for a user encoder `module:factory` (repeatable, or comma-separated)",
    )
    return p


def main(argv=None) -> int:
    parser = Parser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    features_parser(sub)
    restore_parser(sub)
    weights_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd == "weights":
        return weights_main(args)
    warnings.simplefilter("always", UserWarning)
    try:
        if args.cmd == "restore":
            from .restore import restore_folder

            allow_code = [args.target, *",".join(args.encoder).split(",")]
            restore_folder(
                Path(args.src),
                Path(args.dst),
                Path(args.runs_dir) / args.run,
                args.clip_weights,
                args.osf,
                args.target_weights,
                allow_code=allow_code,
            )
            return 0
        cfg = features_config(args)
        plans = plan_features(cfg)  # lists each split's source, once
        if all(p.complete() for p in plans):  # answered without importing torch or a network
            report_complete(plans, cfg.wds)
        else:
            from .extract import build_features

            build_features(cfg, plans=plans)
    except (ValueError, RuntimeError, OSError) as e:
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        print(
            f"error: {scrub(e)}"
            + (
                "; free space (or raise the quota) and run the same command again: "
                "finished tasks are kept, nothing half-written counts as done"
                if full
                else ""
            ),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
