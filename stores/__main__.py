"""Inspect, maintain and move feature stores: `python -m stores ls [ROOT]`, `info STORE [--stats]`,
`verify STORE`, `repair STORE`, `gc STORE`, `push|pull SRC DST` (local, shared path or s3://),
`export-wds STORE` (WebDataset).
"""
import argparse
import json
import sys
from pathlib import Path

from .maintain import lost_records
from .privacy import scrub
from .stats import member_stats
from .store import MANIFEST, Store, StoreError, records_file
from .wds import TILE


def find_stores(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).glob(f"*/{MANIFEST}"))


def describe(store: Store) -> dict:
    """The manifest with each member's status recomputed from what is on disk."""
    m = store.manifest()
    for name, info in m["members"].items():
        done = len(store.done_tasks(name))
        info["tasks_done"] = f"{done}/{info.get('tasks', 0)}"
        if info.get("status") == "complete" and done != info.get("tasks", 0):
            info["status"] = "damaged"
    return m


def cmd_ls(args) -> int:
    rows = []
    for path in find_stores(args.root):
        try:
            m = describe(Store(path))
        except StoreError as e:  # one damaged store is named; the others are still listed
            rows.append({"store": path.name, "path": str(path), "members": {}, "error": scrub(str(e))})
            continue
        rows.append({"store": path.name, "path": str(path),
                     "members": {k: v["status"] for k, v in m["members"].items()}})
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print(f"no stores under {args.root}")
    for r in rows if not args.json else []:
        print(r["store"] + (f"    DAMAGED: {r['error']}" if "error" in r else ""))
        for k, v in r["members"].items():
            print(f"    {k:48s} {v}")
    return 0


def cmd_info(args) -> int:
    m = describe(Store(args.store))
    if args.stats:
        store = Store(args.store)
        for k, v in m["members"].items():
            if v["status"] == "complete":
                v["stats"] = member_stats(store, k, v, args.jobs)
    if args.json:
        print(json.dumps(m, indent=1, sort_keys=True))
        return 0
    print(f"{args.store}  ({m['dataset']} / {m['split']} / {m['task']}, pairs key {m['pairs_key'][:12]})")
    for k, v in m["members"].items():
        weights = f" weights={v['weights']}" if "weights" in v else ""
        print(f"  {k:48s} {v['status']:10s} tasks {v['tasks_done']:>7s}  "
              f"{v.get('bytes', 0) / 1e6:8.2f} MB  key {v['key'][:12]}{weights}")
        for field, st in v.get("stats", {}).items():
            if isinstance(st, dict) and "per_sample" in st:
                print(f"      {field:14s} " + "  ".join(f"{k} {st[k]:.4g}" for k in ("mean", "min", "max")
                                                           if st[k] is not None))
        if "stats" in v:
            print(f"      {'bytes/sample':14s} {v['stats']['bytes_per_sample']:.0f}")
    return 0


def cmd_verify(args) -> int:
    """Every member's markers and shards (read by a thread pool); exit 1 naming what is damaged."""
    store = Store(args.store)
    problems = []
    for member, info in store.manifest()["members"].items():
        missing = sorted(set(range(info["tasks"])) - store.done_tasks(member))
        if missing:
            problems.append(f"{member}: tasks {missing} not done (incomplete)")
        problems += store.verify(member, jobs=args.jobs)
    problems += [f"{m}: records file {records_file(m)} missing" for m in lost_records(store)]
    for p in problems:
        print(f"DAMAGED {args.store}: {p}", file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_export_wds(args) -> int:
    from .wds import export_wds

    export_wds(args.store, args.out, args.target, args.encoder, args.samples_per_shard, args.shard_mb,
               args.min_shards, args.jobs, tile=args.tile, overlap=args.tile_overlap)
    return 0


def cmd_copy(args) -> int:
    from .remote import copy_store

    copy_store(args.src, args.dst, endpoint_url=args.endpoint_url,
               include_incomplete=args.include_incomplete, jobs=args.jobs)
    return 0


def add_copy_parser(sub, name: str, help: str) -> None:
    s = sub.add_parser(name, help=help, description=help + ". DST is the folder the store goes "
                       "into (or the store's own path). Verified by size and sha256 per file; "
                       "resumable; manifest.json written last. Credentials: AWS_ACCESS_KEY_ID / "
                       "AWS_SECRET_ACCESS_KEY or ~/.aws; endpoint: --endpoint-url, S3_ENDPOINT_URL or "
                       "AWS_ENDPOINT_URL.")
    s.add_argument("src", help="store path or URL")
    s.add_argument("dst", help="destination folder or URL (s3://bucket/prefix)")
    s.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: $S3_ENDPOINT_URL, $AWS_ENDPOINT_URL)")
    s.add_argument("--include-incomplete", action="store_true", help="copy incomplete members too")
    s.add_argument("--jobs", type=int, default=8, help="files copied at once (default: 8)")
    s.set_defaults(fn=cmd_copy)


def cmd_repair(args) -> int:
    from .maintain import repair

    repair(args.store, recompute=not args.no_recompute, allow_target=args.target, allow_encoders=",".join(args.encoder).split(","))
    return 0


def cmd_gc(args) -> int:
    from .maintain import gc

    gc(args.store, dry_run=args.dry_run)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stores", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ls", help="list the stores under a root and their members' status")
    s.add_argument("root", nargs="?", default="data/stores", type=Path, help="store root (default: data/stores)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_ls)
    s = sub.add_parser("info", help="print a store's manifest: members, keys, status, bytes")
    s.add_argument("store", type=Path)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--stats", action="store_true", help="per-member statistics (input and base PSNR per "
                   "sample, g norms, bytes per array and sample), computed over shards with dask")
    s.add_argument("--jobs", type=int, default=8, help="parallel shard reads (default: 8)")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("verify", help="re-read every shard; exit 1 naming member, shard and samples on damage")
    s.add_argument("store", type=Path)
    s.add_argument("--jobs", type=int, default=8, help="shards checked at once (default: 8)")
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser("export-wds", help="write a store as WebDataset tar shards + index.json for streaming")
    s.add_argument("store", type=Path)
    s.add_argument("--out", type=Path, default=None, help="folder for <store>-wds/ (default: beside the store)")
    s.add_argument("--target", default=None, help="target member (default: the store's only complete one)")
    s.add_argument("--encoder", action="append", default=None, help="osf member, repeatable (default: all)")
    s.add_argument("--samples-per-shard", type=int, default=1000, help="at most this many samples per shard")
    s.add_argument("--shard-mb", type=float, default=256, help="about at most this many MB per shard")
    s.add_argument("--min-shards", type=int, default=8, help="at least this many shards, so nodes x "
                   "workers can each get whole shards (default: 8)")
    s.add_argument("--jobs", type=int, default=4, help="shards written at once (default: 4)")
    s.add_argument("--tile", type=int, default=TILE, help=f"cut samples into tiles of at most this many px a side, "
                   f"so a loader decodes a tile, not a whole photo, per crop; a crop must fit in a tile, so keep "
                   f"it at least twice --crop (default: {TILE}; 0: whole samples)")
    s.add_argument("--tile-overlap", type=int, default=0, help="px by which neighbouring tiles overlap; the crop "
                   "size lets crops straddle tile seams too, for more stored bytes (default: 0)")
    s.set_defaults(fn=cmd_export_wds)
    s = sub.add_parser("repair", help="recompute only the damaged tasks of a store (withdraws their done "
                       "markers, then reruns the recorded `python -m pipeline features`)")
    s.add_argument("store", type=Path)
    s.add_argument("--no-recompute", action="store_true", help="only withdraw the damaged tasks")
    s.add_argument("--target", default=None, help="a member made by a user target `module:factory` is "
                   "recomputed only when you name that target here (a store never decides what code runs)")
    s.add_argument("--encoder", action="append", default=[], help="the same for a user encoder `module:factory` "
                   "(repeatable, or comma-separated)")
    s.set_defaults(fn=cmd_repair)
    s = sub.add_parser("gc", help="remove leftovers of killed runs (superseded lease generations, old "
                       "temporary files) and nothing else")
    s.add_argument("store", type=Path)
    s.add_argument("--dry-run", action="store_true", help="list what would be removed")
    s.set_defaults(fn=cmd_gc)
    add_copy_parser(sub, "push", "copy a local store to a shared location (path or s3://bucket/prefix)")
    add_copy_parser(sub, "pull", "copy a store from a shared location (path or s3://) to local disk")
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except StoreError as e:
        print(f"error: {scrub(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
