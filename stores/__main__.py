"""Inspect, maintain and move feature stores: `python -m stores ls [ROOT]`, `info STORE [--stats]`,
`catalog ROOT --html OUT` (ROOT and STORE local, a shared path or s3://), `verify STORE`,
`repair STORE`, `gc STORE`, `push|pull SRC DST` (local, shared path or s3://), `export-wds STORE`
(WebDataset).
"""

import json
import sys
from pathlib import Path

from common.privacy import scrub

from .catalog import is_url, list_root, local_copy, read_store, same_folder
from .cli import Parser
from .maintain import lost_records
from .provenance import describe as describe_provenance
from .stats import member_stats
from .store import Store, StoreError, records_file
from .wds import CODEC, CODECS, TILE


def member_line(k: str, v: dict) -> str:
    weights = f" weights={v['weights']}" if v.get("weights") else ""
    return (
        f"  {k:48s} {v['status']:10s} ranges {str(v.get('tasks_done', '?')):>7s}  "
        f"{(v.get('bytes') or 0) / 1e6:8.2f} MB  key {str(v.get('key', ''))[:12]}{weights}"
    )


def local_line(local: dict | None) -> str:
    if local is None:
        return ""
    if not local["exists"]:
        return f"    local copy: none ({local['path']})"
    state = (
        "complete"
        if local["complete"]
        else local.get("error")
        or "incomplete: "
        + ", ".join(f"{m} {s}" for m, s in local["members"].items() if s != "complete")
    )
    return f"    local copy: {state} ({local['path']})"


def local_root(where: str, local: str) -> str | None:
    """The local store root to compare with: for a URL always, for a folder when there is one."""
    return local if is_url(where) or Path(local).is_dir() else None


def cmd_ls(args) -> int:
    rows = list_root(args.root, local_root(args.root, args.local), args.endpoint_url)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print(f"no stores under {args.root}")
    for r in rows if not args.json else []:
        print(
            r["store"]
            + (f"    DAMAGED: {r['error']}" if "error" in r else f"    created {r['created']}")
        )
        for k, v in r.get("details", {}).items():
            print(member_line(k, v)[2:])
            print(f"      made by: {describe_provenance(v.get('provenance'))}")
        if r.get("local"):
            print(local_line(r["local"]))
    return 0


def cmd_info(args) -> int:
    m = read_store(args.store, args.endpoint_url)
    if args.stats:
        if is_url(args.store):
            raise StoreError(
                f"{args.store}: --stats reads the arrays; pull the store first (python -m stores pull)"
            )
        store = Store(args.store)
        for k, v in m["members"].items():
            if v["status"] == "complete":
                v["stats"] = member_stats(store, k, v, args.jobs)
    name = args.store.rstrip("/").rsplit("/", 1)[-1]
    here = args.store.rstrip("/").rsplit("/", 1)[0] if "/" in args.store.rstrip("/") else "."
    mine = local_root(args.store, args.local)
    local = None if mine is None or same_folder(here, mine) else local_copy(mine, name, m)
    if args.json:
        print(json.dumps({**m, **({"local": local} if local else {})}, indent=1, sort_keys=True))
        return 0
    print(
        f"{args.store}  ({m['dataset']} / {m['split']} / {m['task']}, pairs key {m['pairs_key'][:12]}, "
        f"created {m.get('created')})"
    )
    for k, v in m["members"].items():
        print(member_line(k, v))
        print(f"      made by: {describe_provenance(v.get('provenance'))}")
        for field, st in v.get("stats", {}).items():
            if isinstance(st, dict) and "per_sample" in st:
                print(
                    f"      {field:14s} "
                    + "  ".join(
                        f"{k} {st[k]:.4g}" for k in ("mean", "min", "max") if st[k] is not None
                    )
                )
        if "stats" in v:
            print(f"      {'bytes/sample':14s} {v['stats']['bytes_per_sample']:.0f}")
    if local:
        print(local_line(local))
    return 0


def cmd_catalog(args) -> int:
    from .catalog import write_catalog

    out = write_catalog(
        args.root, args.html, args.runs, local_root(args.root, args.local), args.endpoint_url
    )
    print(f"wrote {out}")
    return 0


def cmd_verify(args) -> int:
    """Every member's markers and shards (read by a thread pool); exit 1 naming what is damaged."""
    store = Store(args.store)
    problems = []
    for member, info in store.manifest()["members"].items():
        missing = sorted(set(range(info["tasks"])) - store.done_ranges(member))
        if missing:
            problems.append(f"{member}: ranges {missing} not done (incomplete)")
        problems += store.verify(member, jobs=args.jobs)
    problems += [f"{m}: records file {records_file(m)} missing" for m in lost_records(store)]
    for p in problems:
        print(f"DAMAGED {args.store}: {p}", file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_export_wds(args) -> int:
    from .wds import export_wds

    export_wds(
        args.store,
        args.out,
        args.target,
        args.encoder,
        args.samples_per_shard,
        args.shard_mb,
        args.min_shards,
        args.jobs,
        tile=args.tile,
        overlap=args.tile_overlap,
        codec=args.codec,
    )
    return 0


def cmd_copy(args) -> int:
    from .remote import copy_store

    copy_store(
        args.src,
        args.dst,
        endpoint_url=args.endpoint_url,
        include_incomplete=args.include_incomplete,
        jobs=args.jobs,
    )
    return 0


def add_copy_parser(sub, name: str, help: str) -> None:
    s = sub.add_parser(
        name,
        help=help,
        description=help + ". DST is the folder the store goes "
        "into (or the store's own path). Verified by size and sha256 per file; "
        "resumable; manifest.json written last. Credentials: AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY or ~/.aws; endpoint: --endpoint-url, S3_ENDPOINT_URL or "
        "AWS_ENDPOINT_URL.",
    )
    s.add_argument("src", help="store path or URL")
    s.add_argument("dst", help="destination folder or URL (s3://bucket/prefix)")
    s.add_argument(
        "--endpoint-url",
        default=None,
        help="S3 endpoint (default: $S3_ENDPOINT_URL, $AWS_ENDPOINT_URL)",
    )
    s.add_argument("--include-incomplete", action="store_true", help="copy incomplete members too")
    s.add_argument("--jobs", type=int, default=8, help="files copied at once (default: 8)")
    s.set_defaults(fn=cmd_copy)


def cmd_repair(args) -> int:
    from .maintain import repair

    repair(
        args.store,
        recompute=not args.no_recompute,
        allow_target=args.target,
        allow_encoders=",".join(args.encoder).split(","),
    )
    return 0


def cmd_gc(args) -> int:
    from .maintain import gc

    found = gc(args.store, dry_run=args.dry_run)
    for p in found if args.dry_run else []:
        print(f"would remove {p.relative_to(args.store)}")
    return 0


def remote_args(s: Parser) -> None:
    """--local and --endpoint-url of the commands that read a local, shared or s3:// root."""
    s.add_argument(
        "--local",
        default="data/stores",
        help="local store root a remote store's copy is looked for in (default: data/stores)",
    )
    s.add_argument(
        "--endpoint-url",
        default=None,
        help="S3 endpoint (default: $S3_ENDPOINT_URL, $AWS_ENDPOINT_URL)",
    )


def main(argv=None) -> int:
    p = Parser(prog="python -m stores", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    remote = (
        " ROOT/STORE may be a local folder, a shared path or s3://bucket/prefix (only manifests and "
        "done-marker names are read there; credentials and endpoint as for push/pull)."
    )
    s = sub.add_parser(
        "ls",
        help="list the stores under a root: members' status, keys, weights, bytes, provenance",
        description="List the stores under a root." + remote,
    )
    s.add_argument(
        "root", nargs="?", default="data/stores", help="store root (default: data/stores)"
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    remote_args(s)
    s.set_defaults(fn=cmd_ls)
    s = sub.add_parser(
        "info",
        help="print a store's manifest: members, keys, status, bytes, provenance",
        description="Print a store's manifest." + remote,
    )
    s.add_argument("store")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    remote_args(s)
    s.add_argument(
        "--stats",
        action="store_true",
        help="per-member statistics (input and base PSNR per "
        "sample, g norms, bytes per array and sample), computed over shards with dask",
    )
    s.add_argument("--jobs", type=int, default=8, help="parallel shard reads (default: 8)")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser(
        "catalog",
        help="write one static HTML page of every store under a root: members, keys, "
        "status, sizes, provenance, thumbnails",
        description="Write one self-contained HTML page "
        "(thumbnails inline) of every store under a root, to open without a server or put on a "
        "shared drive. Reads manifests, and the first sample's lq and base of complete members."
        + remote,
    )
    s.add_argument(
        "root", nargs="?", default="data/stores", help="store root (default: data/stores)"
    )
    s.add_argument("--html", required=True, help="the page to write")
    s.add_argument(
        "--runs",
        default=None,
        help="runs folder (e.g. runs): each member shows the PSNR gain of "
        "the runs that read it (their eval.json)",
    )
    remote_args(s)
    s.set_defaults(fn=cmd_catalog)
    s = sub.add_parser(
        "verify", help="re-read every shard; exit 1 naming member, shard and samples on damage"
    )
    s.add_argument("store", type=Path)
    s.add_argument("--jobs", type=int, default=8, help="shards checked at once (default: 8)")
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser(
        "export-wds", help="write a store as WebDataset tar shards + index.json for streaming"
    )
    s.add_argument("store", type=Path)
    s.add_argument(
        "--out", type=Path, default=None, help="folder for <store>-wds/ (default: beside the store)"
    )
    s.add_argument(
        "--target", default=None, help="target member (default: the store's only complete one)"
    )
    s.add_argument(
        "--encoder", action="append", default=None, help="osf member, repeatable (default: all)"
    )
    s.add_argument(
        "--samples-per-shard", type=int, default=1000, help="at most this many samples per shard"
    )
    s.add_argument(
        "--shard-mb", type=float, default=256, help="about at most this many MB per shard"
    )
    s.add_argument(
        "--min-shards",
        type=int,
        default=8,
        help="at least this many shards, so nodes x workers can each get whole shards (default: 8)",
    )
    s.add_argument("--jobs", type=int, default=4, help="shards written at once (default: 4)")
    s.add_argument(
        "--tile",
        type=int,
        default=TILE,
        help=f"cut samples into tiles of at most this many px a side, "
        f"so a loader decodes a tile, not a whole photo, per crop; a crop must fit in a tile, so keep "
        f"it at least twice --crop (default: {TILE}; 0: whole samples)",
    )
    s.add_argument(
        "--tile-overlap",
        type=int,
        default=0,
        help="px by which neighbouring tiles overlap; the crop "
        "size lets crops straddle tile seams too, for more stored bytes (default: 0)",
    )
    s.add_argument(
        "--codec",
        choices=list(CODECS),
        default=CODEC,
        help="of the lq/gt tiles: zstd (a uint8 .npy "
        "compressed with zstd: about 10x faster to decode than PNG, about 1.1x its bytes on photos) or "
        f"png (opens in any image tool) (default: {CODEC})",
    )
    s.set_defaults(fn=cmd_export_wds)
    s = sub.add_parser(
        "repair",
        help="recompute only the damaged ranges of a store (withdraws their done "
        "markers, then reruns the recorded `python -m pipeline features`)",
    )
    s.add_argument("store", type=Path)
    s.add_argument("--no-recompute", action="store_true", help="only withdraw the damaged ranges")
    s.add_argument(
        "--target",
        default=None,
        help="a member made by a user target `module:factory` is "
        "recomputed only when you name that target here (a store never decides what code runs)",
    )
    s.add_argument(
        "--encoder",
        action="append",
        default=[],
        help="the same for a user encoder `module:factory` (repeatable, or comma-separated)",
    )
    s.set_defaults(fn=cmd_repair)
    s = sub.add_parser(
        "gc",
        help="remove leftovers of killed runs (superseded lease generations, old "
        "temporary files) and nothing else",
    )
    s.add_argument("store", type=Path)
    s.add_argument("--dry-run", action="store_true", help="list what would be removed")
    s.set_defaults(fn=cmd_gc)
    add_copy_parser(
        sub, "push", "copy a local store to a shared location (path or s3://bucket/prefix)"
    )
    add_copy_parser(
        sub, "pull", "copy a store from a shared location (path or s3://) to local disk"
    )
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except StoreError as e:
        print(f"error: {scrub(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
