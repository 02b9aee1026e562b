"""Inspect feature stores: `python -m stores ls [ROOT]`, `info STORE`, `verify STORE`."""
import argparse
import json
import sys
from pathlib import Path

from .store import MANIFEST, Store, StoreError


def find_stores(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).glob(f"*/{MANIFEST}"))


def describe(store: Store) -> dict:
    """The manifest with each member's status recomputed from what is on disk."""
    m = store.manifest()
    for name, info in m["members"].items():
        done = len(store.done_tasks(name))
        info["tasks_done"] = f"{done}/{len(info.get('plan', []))}"
        if info.get("status") == "complete" and done != len(info.get("plan", [])):
            info["status"] = "damaged"
    return m


def cmd_ls(args) -> int:
    rows = []
    for path in find_stores(args.root):
        m = describe(Store(path))
        rows.append({"store": path.name, "path": str(path),
                     "members": {k: v["status"] for k, v in m["members"].items()}})
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print(f"no stores under {args.root}")
    for r in rows if not args.json else []:
        print(r["store"])
        for k, v in r["members"].items():
            print(f"    {k:48s} {v}")
    return 0


def cmd_info(args) -> int:
    m = describe(Store(args.store))
    if args.json:
        print(json.dumps(m, indent=1, sort_keys=True))
        return 0
    print(f"{args.store}  ({m['dataset']} / {m['split']} / {m['task']}, pairs key {m['pairs_key'][:12]})")
    for k, v in m["members"].items():
        weights = f" weights={v['weights']}" if "weights" in v else ""
        print(f"  {k:48s} {v['status']:10s} tasks {v['tasks_done']:>7s}  "
              f"{v.get('bytes', 0) / 1e6:8.2f} MB  key {v['key'][:12]}{weights}")
    return 0


def cmd_verify(args) -> int:
    store = Store(args.store)
    problems = []
    for member, info in store.manifest()["members"].items():
        missing = sorted(set(range(len(info["plan"]))) - store.done_tasks(member))
        if missing:
            problems.append(f"{member}: tasks {missing} not done (incomplete)")
        problems += store.verify(member)
    for p in problems:
        print(f"DAMAGED {args.store}: {p}", file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


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
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("verify", help="re-read every shard; exit 1 naming member, shard and samples on damage")
    s.add_argument("store", type=Path)
    s.set_defaults(fn=cmd_verify)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
