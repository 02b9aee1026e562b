"""Store upkeep: `python -m stores repair STORE` (recompute only damaged ranges) and `gc STORE`.

`repair` finds the shards that fail verification, withdraws the done markers of the ranges that
own them (the member becomes incomplete, so readers refuse it), then reruns the recorded
extraction command, which recomputes exactly those ranges (it is deterministic) and verifies
again. `stores` never imports the pipeline: the rerun is a `python -m pipeline features`
subprocess built from the configuration the member recorded.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common.log import flags as log_flags
from common.privacy import local_path

from .leases import LEASE_DIR, _generations, lease_folders
from .names import is_user_encoder, is_user_target
from .store import DONE_DIR, STAGING_DIR, Store, StoreError, read_json, records_file

log = logging.getLogger(__name__)

TMP_GRACE_SECONDS = 600.0  # a temporary file younger than this may belong to a live writer


def damaged_ranges(store: Store, jobs: int = 4) -> dict[str, list[int]]:
    """member -> ranges owning a shard that fails verification."""
    out = {}
    for member, info in store.manifest()["members"].items():
        bad = set()
        if (
            info.get("status") == "complete"
        ):  # a lost done marker: its shards are vouched for by nothing
            bad |= set(range(len(store.ranges(member)))) - store.done_ranges(member)
        for job in store.shard_checks(member, damaged=bad.add):
            if store.check_shard(member, job):
                lo = job[2]
                bad |= {t for t, (a, b) in enumerate(store.ranges(member)) if a <= lo < b}
        if bad:
            out[member] = sorted(bad)
    return out


def lost_records(store: Store) -> list[str]:
    """Complete members whose `_records` file is missing."""
    return [
        m
        for m, i in store.manifest()["members"].items()
        if i.get("status") == "complete" and not (store.path / records_file(m)).is_file()
    ]


NOT_REPLAYED = (
    "store_shared",
    "device",
)  # a repair recomputes, never copies; this machine picks where


def features_command(
    config: dict, store_root: Path, split: str, allow_target: str | None = None, allow_encoders=()
) -> list[str]:
    """The `python -m pipeline features` call that made a member: every field of its recorded
    config (pipeline.plan.FeaturesConfig) as its flag, except NOT_REPLAYED, with this store's root
    and split. Paths were recorded portable (~, $USER) and are expanded for this user.

    A store never decides what code runs: a `module:factory` target or encoder (imported and
    called) is used only when the user names the same one (`stores repair --target/--encoder`)."""
    refuse_user_code(config, allow_target, allow_encoders)
    argv = [sys.executable, "-m", "pipeline", "features", *log_flags()]
    for name, value in {**config, "store_root": str(store_root), "splits": split}.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(name)) or isinstance(value, (dict, list)):
            raise StoreError(
                f"the recorded configuration has a setting {name!r} = {value!r}, not one a "
                f"`python -m pipeline features` run records; rerun `make features` instead"
            )
        if name not in NOT_REPLAYED and value is not None and value is not False:
            flag = "--" + name.replace("_", "-")  # `--flag=value`: a value is never read as a flag
            argv.append(flag if value is True else f"{flag}={local_path(value)}")
    return argv


def refuse_user_code(config: dict, allow_target: str | None, allow_encoders) -> None:
    """StoreError unless each user `module:factory` the config names is one the user named. Every
    key the features parser would take for --target or --encoder is read (argparse accepts `--enc`)."""
    for key, value in config.items():
        flag = str(key).replace("_", "-")
        if (
            not isinstance(value, str)
            or not flag
            or not ("target".startswith(flag) or "encoder".startswith(flag))
        ):
            continue
        kind, allowed = (
            ("target", {allow_target})
            if "target".startswith(flag)
            else ("encoder", set(allow_encoders))
        )
        for name in value.split(",") if kind == "encoder" else [value]:
            if (is_user_target if kind == "target" else is_user_encoder)(
                name
            ) and name not in allowed:
                named = ", ".join(sorted(repr(n) for n in allowed if n))
                raise StoreError(
                    f"the damaged member was made by the user {kind} {name!r}, which imports and runs "
                    f"code; rerun with `python -m stores repair STORE --{kind} {name}` if you trust it"
                    + (f" (you named {named})" if named else "")
                )


def repair(
    path: Path,
    recompute: bool = True,
    allow_target: str | None = None,
    allow_encoders=(),
) -> int:
    """Withdraw damaged ranges and recompute them; returns the number of ranges withdrawn."""
    store = Store(path, mode="a")
    damaged = damaged_ranges(store)
    for member in lost_records(store):
        if member not in damaged:  # a recomputed member gets new ones when it completes
            store.rewrite_records(member)
            log.info(f"{path}: {member}: records rewritten from its done markers")
    configs = [store.member_info(m).get("config") for m in damaged]
    if recompute and damaged and not all(configs):
        raise StoreError(
            f"{path}: a damaged member has no recorded configuration; rerun `make features`"
        )
    argvs = (
        {
            str(c): features_command(
                c, store.path.parent, store.manifest()["split"], allow_target, allow_encoders
            )
            for c in configs
        }
        if recompute
        else {}
    )  # refused before anything is withdrawn
    if not damaged:
        log.info(f"{path}: nothing damaged")
        return 0
    for member, ranges in damaged.items():
        for ri in ranges:
            store.done_path(member, ri).unlink(missing_ok=True)
        store._update_member(member, status="incomplete")
        log.info(f"{path}: {member}: ranges {ranges} withdrawn for recomputation")
    n = sum(map(len, damaged.values()))
    for argv in argvs.values():
        log.info("recomputing: " + " ".join(argv[1:]))
        subprocess.run(argv, check=True)
    return n


def gc(path: Path, dry_run: bool = False) -> list[Path]:
    """Remove what killed runs leave behind, and nothing else: superseded lease generations (the
    newest of each range is kept: it fences late writers), the staged shards of superseded
    generations that no done marker names (`stale_staging`) and temporary files (ours, and zarr's
    `*.partial`) older than TMP_GRACE_SECONDS. The manifest lock file stays (an OS lock, released
    when its holder dies)."""
    path = Path(path)
    found = stale_staging(path)
    for folder in lease_folders(path):
        gens = sorted(folder.glob("[0-9]*.json"))
        found += gens[:-1]
    for p in [
        *path.rglob(".*"),
        *path.rglob("*.partial"),
    ]:  # ours, and zarr's `<chunk>.<uuid>.partial`
        if (
            p.is_file()
            and (".tmp-" in p.name or p.name.endswith(".partial"))
            and _age(p) > TMP_GRACE_SECONDS
        ):
            found.append(p)
    for p in found:
        if not dry_run:  # a dry run's list is the command's output (stores/__main__.py)
            log.info(f"removed {p.relative_to(path)}")
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if not found:
        log.info(f"{path}: nothing to collect")
    return found


def stale_staging(path: Path) -> list[Path]:
    """Staging folders `_staging/<start>-<stop>/<gen>` of a generation superseded by a later
    lease generation (its writer lost or gave up the lease) holding nothing to publish: empty, or
    named by no done marker and untouched for TMP_GRACE_SECONDS (a late writer may still be
    writing there, into a folder nothing reads)."""
    named = set()
    for marker in (path / DONE_DIR).rglob("*.json") if (path / DONE_DIR).is_dir() else []:
        try:
            m = read_json(marker)
            named.add(
                (
                    int(m["samples"][0]),
                    int(m["samples"][1]),
                    m.get("stage", f"{int(m['generation']):08d}"),
                )
            )
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            IndexError,
        ):  # older marker, or one being damaged
            continue
    found = []
    for stage in sorted((path / STAGING_DIR).glob("*-*/*")):
        try:
            (a, b), gen = map(int, stage.parent.name.split("-")), int(stage.name.split("-")[0])
        except ValueError:
            continue
        gens = _generations(path / LEASE_DIR / stage.parent.name)
        files = [p for p in stage.rglob("*") if p.is_file()]
        if (
            gens
            and gens[-1] > gen
            and (
                not files
                or ((a, b, stage.name) not in named and min(map(_age, files)) > TMP_GRACE_SECONDS)
            )
        ):
            found.append(stage)
    return found


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
