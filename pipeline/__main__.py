"""Stage 1 command line: `python -m pipeline features --task deblur --data demo`, `restore ...`."""
import argparse
import errno
import logging
import sys
import warnings
from pathlib import Path

from stores.privacy import scrub

from .layouts import LAYOUTS
from .plan import FeaturesConfig, plan_features, report_complete
from .tasks import TASKS

D = FeaturesConfig()


def features_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("features", help="build or complete a task's train and test stores", allow_abbrev=False,
                       description="Degrade (or load) image pairs, run the frozen target and encoder, "
                       "and cache lq/gt, base and OSF in one Zarr store per split. Complete members "
                       "with the same key are reused; an interrupted run resumes where it stopped.")
    p.add_argument("--task", default=D.task, help="restoration task: " + ", ".join(TASKS) + " (default: %(default)s)")
    p.add_argument("--data", default=D.data, help="'demo' (photos shipped with scikit-image), a dataset "
                   "folder (layout detected), or LAYOUT:folder with LAYOUT one of " + ", ".join(LAYOUTS))
    p.add_argument("--target", default=None, help="frozen target: classical (wiener, gamma, streaks, nlmeans, "
                   "identity), a built-in network with the official parameter names (snr-aware, mprnet-<deblur|derain|"
                   "denoise>, uformer-b, restormer-<deblur|derain|denoise|denoise-gaussian|defocus>, sci-<easy|medium|"
                   "difficult> with its published weights shipped in the project; configuration "
                   "overrides as NAME:key=value[:key=value], e.g. mprnet-deblur:n_feat=8), or module.path:factory "
                   "(default: the task's; see docs/networks.md)")
    p.add_argument("--target-weights", default=None, help="checkpoint of a network target (.safetensors or a "
                   ".pth of tensors; read with weights_only=True). Without it sci-* loads its shipped weights and another built-in network gets random "
                   "weights (seed --init-seed, recorded as weights: random) on the demo or with "
                   "--allow-random-weights only")
    p.add_argument("--target-tile", type=int, default=None, help="run the target in overlapping tiles of this size")
    p.add_argument("--target-overlap", type=int, default=D.target_overlap, help="tile overlap (default: %(default)s)")
    p.add_argument("--target-budget-mb", type=float, default=D.target_budget_mb,
                   help="activation memory of one call of a network target (default: %(default)s MB): larger "
                        "images run in tiles sized from it (recorded in the member key; raise it on a GPU to run "
                        "whole images; 'inf': never tile, as versions before the budget did)")
    p.add_argument("--encoder", default=None, help="'clip-vit-b32' (default), 'effnet-lite0' (ImageNet "
                   "EfficientNet-Lite0, weights from its package), 'openclip:<model>[:<tag>]', "
                   "'openclip:<folder with open_clip_config.json>', 'sd-vae', 'sd-unet', or module.path:factory "
                   "(factory() returns (nn.Module, {'size', 'mean', 'std'})); comma-separated for several")
    p.add_argument("--store-root", default=D.store_root, help="where stores live (default: %(default)s)")
    p.add_argument("--store-shared", default=None, help="a teammates' root (path or s3://...), only read: complete "
                   "members with the same key are copied from it instead of computed")
    p.add_argument("--shards", type=int, default=None, help="extraction tasks per split (default: one per shard)")
    p.add_argument("--shard-len", type=int, default=D.shard_len, help="samples per shard (default: %(default)s)")
    p.add_argument("--shard-mb", type=float, default=D.shard_mb, help="at most about this many MB of float16 "
                   "pixels per shard; large images get shards of their own (default: %(default)s)")
    p.add_argument("--tile", type=int, default=D.tile, help="spatial chunk edge in px (default: %(default)s)")
    p.add_argument("--wds", action="store_true", help="also write each split's WebDataset export "
                   "(<store>-wds/, as `python -m stores export-wds`) from the samples as they are extracted")
    p.add_argument("--rehash", action="store_true", help="hash every source file again, even those whose "
                   "(size, mtime) the last run recorded (by default a re-run costs a stat per file)")
    p.add_argument("--seed", type=int, default=D.seed, help="degradation seed (default: %(default)s)")
    p.add_argument("--clip-weights", default=None, help="OpenCLIP checkpoint file; default: the Hugging "
                   "Face cache (offline), else random weights for the demo only")
    p.add_argument("--sd-weights", default=None, help="diffusers folder with vae/ and unet/ (save_pretrained "
                   "layout) or a VAE folder, for sd-vae/sd-unet; default: the Hugging Face cache (offline), else "
                   "random weights for the demo only")
    p.add_argument("--init-seed", type=int, default=D.init_seed, help="seed of a random encoder or network "
                   "target initialisation (default: %(default)s)")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="allow a random encoder or built-in network target on real data (recorded as weights: random)")
    p.add_argument("--splits", default=",".join(D.splits), help="comma-separated (default: %(default)s)")
    p.add_argument("--batch", type=int, default=D.batch, help="images per encoder call (default: %(default)s)")
    p.add_argument("--device", default=D.device, help="where network targets and encoders run: 'auto' (a CUDA GPU "
                   "when visible), 'cpu' or 'cuda[:i]' (default: %(default)s)")
    p.add_argument("--lease-seconds", type=float, default=D.lease_seconds, help="a task lease not renewed for "
                   "this long (its writer died or is paused) is taken over (default: %(default)s)")
    p.add_argument("--max-bad", type=float, default=D.max_bad, help="fraction of samples that may be excluded "
                   "(unreadable, mismatched, non-finite target output) before the run stops (default: %(default)s)")
    return p


def features_config(args: argparse.Namespace) -> FeaturesConfig:
    return FeaturesConfig(**{k: v for k, v in vars(args).items() if k != "cmd" and k != "splits"},
                          splits=tuple(args.splits.split(",")))


def restore_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("restore", help="restore a folder of degraded images with a trained run",
                       description="Run the run's frozen target and encoder(s), then its PTG-RM, on every "
                       "image of --in; write PNGs of the same names to --out. A non-blind target reads "
                       "<stem>.json beside each image (the blur kernel).")
    p.add_argument("--in", dest="src", required=True, help="folder of degraded images")
    p.add_argument("--out", dest="dst", required=True, help="output folder (created)")
    p.add_argument("--run", required=True, help="trained run name (runs/<run>/)")
    p.add_argument("--runs-dir", default="runs", help="where runs live (default: %(default)s)")
    p.add_argument("--clip-weights", default=None, help="the CLIP checkpoint the run's store was made with "
                   "(default: the path recorded in the store)")
    p.add_argument("--target-weights", default=None, help="the network target's checkpoint (default: the path "
                   "recorded in the store; its sha256 must match)")
    p.add_argument("--osf", choices=("encoder", "distilled"), default="encoder", help="g from the pre-trained "
                   "encoder, or from the run's distilled predictor (`make distill`) (default: %(default)s)")
    p.add_argument("--target", default=None, help="a run made with a user target `module:factory` runs it only "
                   "when you name it here (a run never decides what code runs); its file must hash as recorded")
    p.add_argument("--encoder", action="append", default=[], help="the same for a user encoder `module:factory` "
                   "(repeatable, or comma-separated)")
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    features_parser(sub)
    restore_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # our own warning about random encoder weights says more than open_clip's
    logging.getLogger().addFilter(lambda r: "No pretrained weights loaded" not in r.getMessage())
    warnings.simplefilter("always", UserWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"WARNING: {msg}\n"
    try:
        if args.cmd == "restore":
            from .restore import restore_folder

            allow_code = [args.target, *",".join(args.encoder).split(",")]
            restore_folder(Path(args.src), Path(args.dst), Path(args.runs_dir) / args.run, args.clip_weights,
                           args.osf, args.target_weights, allow_code=allow_code)
            return 0
        cfg = features_config(args)
        plans = plan_features(cfg)  # lists each split's source, once
        if all(p.complete() for p in plans) and not cfg.wds:  # answered without importing torch or a network
            report_complete(plans, wds=False)
        else:
            from .extract import build_features

            build_features(cfg, plans=plans)
    except (ValueError, RuntimeError, OSError) as e:
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        print(f"error: {scrub(e)}" + ("; free space (or raise the quota) and run the same command again: "
                                     "finished tasks are kept, nothing half-written counts as done" if full else ""),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
