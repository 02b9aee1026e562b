"""Damage fuzzing: random damage to a complete store or a WebDataset export, then every read path.

One damage at a time (delete, truncate, flip a byte, swap two files, replace a file with a symlink,
empty a JSON file) is applied to a pristine copy; then the operations users run read it: training
batches and evaluation images (`Split` / `WdsSplit` + their batch loaders), `stores verify` and
`pull`. Each operation's outcome is one of
  exact    it returned exactly the original data (the damage did not matter, or was repaired)
  loud     it failed with an error that names the damaged file (or its member and array)
  unnamed  it failed, but the error does not say which file
  silent   it returned data that differs from the original, without an error (a silent wrong read)
After each damage the touched files are put back from the pristine copy. The targets: 0 silent, 0
unnamed. Used by tests/test_damage_fuzz.py and `make stress` (bench/stress.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

DAMAGES = ("delete", "truncate", "flip", "swap", "symlink", "empty-json")
CROP, BATCH, STEPS = 8, 4, 3


def files_of(root: Path) -> list[str]:
    """Relative paths of the regular files under `root` (lock files are not data)."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and "_locks" not in p.parts
    )


def damage(root: Path, rng: random.Random, outside: Path) -> tuple[str, list[str]]:
    """Apply one random damage under `root`; (kind, relative paths touched)."""
    files = files_of(root)
    kind = rng.choice(DAMAGES)
    if kind == "empty-json":
        jsons = [f for f in files if f.endswith(".json")]
        rel = rng.choice(jsons)
        (root / rel).write_bytes(b"")
        return kind, [rel]
    rel = rng.choice(files)
    path = root / rel
    if kind == "delete":
        path.unlink()
    elif kind == "truncate":
        size = path.stat().st_size
        os.truncate(path, rng.randrange(size) if size else 0)
    elif kind == "flip":
        data = bytearray(path.read_bytes())
        if not data:
            return damage(root, rng, outside)
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    elif kind == "swap":  # half the time two files of the same folder (same array: same geometry)
        near = [f for f in files if f != rel and Path(f).parent == Path(rel).parent]
        other = rng.choice(near if near and rng.random() < 0.5 else [f for f in files if f != rel])
        a, b = root / rel, root / other
        tmp = a.with_name(a.name + ".swap")
        os.rename(a, tmp)
        os.rename(b, a)
        os.rename(tmp, b)
        return kind, [rel, other]
    elif kind == "symlink":  # to another file of the store, or to a copy of itself outside
        if rng.random() < 0.5:
            target = root / rng.choice([f for f in files if f != rel])
        else:
            target = outside / f"copy-{rng.randrange(1 << 30)}"
            shutil.copyfile(path, target)
        path.unlink()
        os.symlink(target, path)
    return kind, [rel]


def restore(root: Path, pristine: Path, rels: list[str]) -> None:
    for rel in rels:
        p = root / rel
        if p.is_symlink() or p.exists():
            p.unlink()
        shutil.copy2(pristine / rel, p)


def names_file(message: str, rels: list[str]) -> bool:
    """Whether an error message says which of the damaged files (or its member and array) it is."""
    for rel in rels:
        parts = Path(rel).parts
        hints = {rel, Path(rel).name if rel.endswith(".json") or "." in Path(rel).name else rel}
        arr = (
            parts[: parts.index("c")]
            if "c" in parts
            else parts[:-1]
            if rel.endswith("zarr.json")
            else ()
        )
        if (
            len(arr) >= 3
        ):  # a zarr chunk or array: <member>/<bucket>/<array>/...; "<member>/<array>" names it too
            hints |= {"/".join(arr), f"{'/'.join(arr[:-2])}/{arr[-1]}"}
        elif arr:
            hints.add("/".join(arr))
        if parts[0] in ("_done", "_records") and len(parts) > 1:
            hints.add(rel)
            hints.add(parts[-1])
        if any(h and h in message for h in hints):
            return True
    return False


def outcome(fn, reference, rels) -> str:
    try:
        got = fn()
    except Exception as e:  # noqa: BLE001  every failure is classified, none escapes
        return "loud" if names_file(f"{type(e).__name__}: {e}", rels) else "unnamed"
    return "exact" if equal(got, reference) else "silent"


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(equal(x, y) for x, y in zip(a, b))
        )
    if hasattr(a, "numpy"):
        a = a.numpy()
    if hasattr(b, "numpy"):
        b = b.numpy()
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    return a == b


# -- what each operation reads ---------------------------------------------------------------
def train_store(path: Path) -> list:
    """What training reads from a store: the batches of the first steps."""
    from training.data import CropBatches, Split

    batches = CropBatches(Split.open(path, None, None), CROP, BATCH, 0, STEPS)
    return [batches[s] for s in range(STEPS)]


def read_store(path: Path) -> dict:
    """What evaluation reads from a store: every usable sample whole, with sizes and names."""
    from training.data import Split

    split = Split.open(path, None, None)
    hw = split.hw
    return {
        "hw": hw.copy(),
        "names": split.names,
        "images": {i: split.image(i) for i in range(len(hw)) if hw[i][0] > 0},
    }


def verify_store(path: Path) -> dict:
    """`stores verify`: clean means every member reads exactly (checked by reading it)."""
    from stores import Store

    store = Store(path)
    problems = [p for m in store.manifest()["members"] for p in store.verify(m)]
    if problems:
        raise RuntimeError("; ".join(problems))
    return read_store(path)


def pull_store(path: Path) -> dict:
    """`stores pull` into a new root, then read the copy."""
    from stores.remote import copy_store

    with tempfile.TemporaryDirectory() as dst:
        copy_store(str(path), dst, jobs=2)
        return read_store(Path(dst) / path.name)


def train_wds(folder: Path) -> list:
    """What training reads from an export: the first streamed batch of each of 2 streams (a run
    that stops inside a shard)."""
    import torch

    from training.wds_data import WdsBatches, WdsSplit

    batches = WdsBatches(WdsSplit.open(folder), CROP, BATCH, 0, 0, 2, streams=2, buffer=2)
    return list(torch.utils.data.DataLoader(batches, batch_size=None))


def read_wds(folder: Path) -> dict:
    """What evaluation reads from an export: every usable sample whole."""
    from training.wds_data import WdsSplit

    split = WdsSplit.open(folder)
    return {
        "hw": split.hw.copy(),
        "names": split.names,
        "images": {i: split.image(i) for i in range(len(split.hw)) if split.hw[i][0] > 0},
    }


STORE_OPS = {"train": train_store, "eval": read_store, "verify": verify_store, "pull": pull_store}
WDS_OPS = {"train": train_wds, "eval": read_wds}


def fuzz(original: Path, ops: dict, rounds: int, seed: int, log=None) -> dict:
    """Apply `rounds` random damages to a copy of `original` (a store or export folder), run every
    operation after each; {op: Counter of outcomes}, plus the cases that were not exact/loud."""
    rng = random.Random(seed)
    reference = {name: fn(original) for name, fn in ops.items()}
    counts = {name: Counter() for name in ops}
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        pristine, work, outside = (
            Path(tmp) / "pristine",
            Path(tmp) / original.name,
            Path(tmp) / "outside",
        )
        shutil.copytree(original, pristine, symlinks=True)
        shutil.copytree(original, work, symlinks=True)
        outside.mkdir()
        for r in range(rounds):
            kind, rels = damage(work, rng, outside)
            for name, fn in ops.items():
                got = outcome(lambda: fn(work), reference[name], rels)
                counts[name][got] += 1
                if got in ("silent", "unnamed"):
                    bad.append(
                        {
                            "round": r,
                            "damage": kind,
                            "files": rels,
                            "op": name,
                            "outcome": got,
                            "error": last_error(fn, work),
                        }
                    )
                    if log:
                        log(json.dumps(bad[-1]))
            restore(work, pristine, rels)
            for leftover in set(files_of(work)) - set(
                files_of(pristine)
            ):  # e.g. a swap's temporary
                (work / leftover).unlink()
    return {"counts": {k: dict(v) for k, v in counts.items()}, "bad": bad}


def last_error(fn, path) -> str | None:
    try:
        fn(path)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:300]}"
    return None
