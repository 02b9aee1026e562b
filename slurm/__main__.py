"""Cluster command line: `python -m slurm features|train|status` (`make slurm-features`, `make slurm-train`).

`features` takes every flag of `python -m pipeline features`, `train` every flag of
`python -m training train`, plus the cluster options (--partition, --time, --cpus, --gpus,
--mem-gb, --account, --max-parallel, --logs, --cluster, --wait).
"""

import argparse
import sys

import common.startup  # noqa: F401 (first: OpenMP settings before numpy and torch load)
from common.privacy import scrub
from pipeline.__main__ import features_parser
from stores.cli import Parser
from training.__main__ import add_config_args

from .submit import add_cluster_args


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m slurm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = features_parser(sub)
    p.description = (
        "Submit the extraction as a SLURM job array over the unfinished tasks of every split, "
        "then a finalize job (afterok) that verifies and completes the stores. "
        + (p.description or "")
    )
    add_cluster_args(p, time_min=60)
    p = sub.add_parser(
        "train",
        help="submit a requeue-safe training job (DDP over --gpus / --tasks-per-node)",
        description="One job that trains with --resume semantics: after preemption, timeout or "
        "`scontrol requeue` it continues from the run's last checkpoint.",
    )
    add_config_args(p)
    add_cluster_args(p, time_min=24 * 60)
    p.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="DDP processes (default: --gpus, or 1 on CPU)",
    )
    p = sub.add_parser(
        "status", help="done / running / failed tasks of the last submissions, with their logs"
    )
    p.add_argument(
        "--logs",
        default="slurm_logs",
        help="the --logs folder of the submissions (default: %(default)s)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "features":
            from .features import submit_features

            return submit_features(args)
        if args.cmd == "train":
            from .train import submit_train

            return submit_train(args)
        from .status import show_status

        return show_status(args.logs)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {scrub(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
