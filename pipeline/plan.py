"""Is there anything to compute? Answered from names, the stat cache and manifests alone.

A re-run of `make features` on complete stores costs a stat per source file: this module imports
neither torch nor any network or image library (pipeline/extract.py, which builds the frozen
networks, is imported only when something has to be computed).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from stores import Store, dataset_name, key_of, store_name
from stores.privacy import local_path
from stores.store import SOURCES_DIR, StoreError

from .degrade import DEGRADATIONS
from .layouts import parse_data
from .names import is_network_target, is_user_encoder, is_user_target, weights_arg
from .sources import Source, open_source
from .tasks import get_task


@dataclass(frozen=True)
class FeaturesConfig:
    task: str = "deblur"
    data: str = "demo"
    target: str | None = None  # None: the task's default
    target_weights: str | None = None  # checkpoint of a network target
    target_tile: int | None = None  # run the target in overlapping tiles of this size
    target_overlap: int = 32
    target_budget_mb: float = 1024.0  # a network target's activation memory per call: larger images run in tiles
    encoder: str | None = None  # None: the task's default (clip-vit-b32)
    store_root: str = "data/stores"
    store_shared: str | None = None  # read-only root (path or s3://) searched for complete members first
    shards: int | None = None  # extraction tasks per split; None: one per shard
    shard_len: int = 16  # samples per shard (fewer for large images: see shard_mb)
    shard_mb: float = 64.0  # a shard holds at most about this many MB of float16 pixels (at least one sample)
    tile: int = 64  # spatial chunk edge of image arrays
    seed: int = 0  # degradation seed (per sample: (seed, index))
    clip_weights: str | None = None
    sd_weights: str | None = None  # diffusers folder for sd-vae / sd-unet
    allow_random_weights: bool = False
    init_seed: int = 0  # seed of a random encoder initialisation
    splits: tuple = ("train", "test")
    batch: int = 8  # images per encoder call (x4 flips)
    max_bad: float = 0.05  # stop (members stay incomplete) when more than this fraction is excluded
    lease_seconds: float = 120.0  # a task lease not renewed for this long is taken over
    device: str = "auto"  # where network targets and encoders run: auto (cuda when available), cpu, cuda[:i]
    rehash: bool = False  # hash every source file even when its (size, mtime) is unchanged
    wds: bool = False  # also write the WebDataset export (<store>-wds/) from the extraction stream


def plan_pairs(source: Source, task, cfg: FeaturesConfig) -> tuple[str, dict]:
    """(key, spec) of a split's pairs member: needs the source, not the frozen networks."""
    deg = None if source.paired else task.degradation
    degradation = {"name": deg, "params": DEGRADATIONS[deg][1], "seed": cfg.seed} if deg else None
    spec = {"source": source.fingerprint, "task": task.name, "degradation": degradation}
    return key_of(spec), spec


SOURCES_FILE = "files.json"


def known_sources(store_root: str, data: str, split: str) -> dict | None:
    """The newest source records of an earlier run on the same dataset folder and split (any
    task), or None: files whose (size, mtime) they list unchanged are not hashed again."""
    root = parse_data(data)[1].resolve()
    found = sorted(Path(store_root).glob(f"{dataset_name(str(root))}-{split}-*/{SOURCES_DIR}/{SOURCES_FILE}"),
                   key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for path in found:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if local_path(rec.get("root")) == str(root) and rec.get("split") == split:
            return rec
    return None


# -- "nothing to compute" without building a network --------------------------------------------
TARGET_RECIPE = ("task", "target_weights", "target_tile", "target_overlap", "target_budget_mb", "init_seed",
                 "allow_random_weights")
CLASSICAL_RECIPE = tuple(f for f in TARGET_RECIPE if not f.startswith(("target_tile", "target_overlap", "target_budget")))
ENCODER_RECIPE = ("init_seed", "allow_random_weights")


def file_stats(paths) -> list:
    """[path, size, mtime_ns] of each file a frozen network was read from (a folder: its files)."""
    out = []
    for p in (Path(p) for p in paths if p):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out += [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]
    return out


def _unchanged(info: dict) -> bool:
    """A member's weight files still have the (size, mtime) they had when it was computed; a member
    with pre-trained weights recorded before inputs were kept is not trusted."""
    inputs = info.get("inputs")
    if inputs is None:
        return info.get("weights") == "random"
    try:  # recorded paths are shareable (`~/...`): this user's home first
        return all((st := os.stat(local_path(p))).st_size == size and st.st_mtime_ns == mtime
                   for p, size, mtime in inputs)
    except OSError:
        return False


def complete_store(cfg: FeaturesConfig, task, split: str) -> tuple[Path | None, Source | None]:
    """(the split's store, its source) when every member `cfg` asks for is already complete, found from the stat
    cache of the sources and the manifest alone (no image decoded or hashed, no network built); None
    when something may have to be computed (the caller then builds the networks and checks by key).

    A member counts when its recorded settings match `cfg` and its weight files keep their (size,
    mtime); (None, the source opened if any) when not. User factories (`module.path:factory`) are always built (their code may have changed);
    `--rehash` always builds and checks by key."""
    names = [cfg.target or task.target, *(cfg.encoder or task.encoder).split(",")]
    user_target = is_user_target(names[0])  # module.path:factory
    if cfg.rehash or user_target or any(is_user_encoder(n) for n in names[1:]):
        return None, None
    known = None if cfg.data == "demo" else known_sources(cfg.store_root, cfg.data, split)
    if cfg.data != "demo" and known is None:
        return None, None
    source = open_source(cfg.data, split, *task.demo_tiles, known=known)
    if (source.records or {}).get("changed") or (source.records or {}).get("touched"):
        return None, source  # the full path names them and records the new stats
    path = Path(cfg.store_root) / store_name(source.dataset, split, task.name, plan_pairs(source, task, cfg)[0])
    try:
        members = Store(path).manifest()["members"]
    except (StoreError, OSError, ValueError, KeyError):
        return None, source
    recipe = TARGET_RECIPE if is_network_target(names[0]) else CLASSICAL_RECIPE  # tiling is a network's
    want = {f: getattr(cfg, f) for f in recipe}
    done = [info for info in members.values() if info.get("status") == "complete" and _unchanged(info)]
    if members.get("pairs", {}).get("status") != "complete" or not any(
            i.get("target") == names[0].split(":")[0]  # what it computed, not what the default was then
            and local_path(i["config"].get("target") or task.target) == names[0]
            and {f: local_path(i["config"].get(f)) for f in recipe} == want for i in done):
        return None, source
    for name in names[1:]:
        want = {f: getattr(cfg, f) for f in ENCODER_RECIPE}
        want["weights"] = weights_arg(name, cfg.clip_weights, cfg.sd_weights)
        if not any(local_path(i.get("encoder")) == name and want == {
                **{f: local_path(i["config"].get(f)) for f in ENCODER_RECIPE},
                "weights": local_path(weights_arg(name, i["config"].get("clip_weights"),
                                                  i["config"].get("sd_weights")))}
                for i in done):
            return None, source
    return path, source


def complete_stores(cfg: FeaturesConfig, log=print) -> tuple[list[Path] | None, dict]:
    """(the stores of every split, when all are complete, each logged as such, else None; split ->
    complete_store's answer, which pipeline.extract.build_features takes so as not to list the
    sources again when it has to build the networks and check by key)."""
    task = get_task(cfg.task)
    found = {split: complete_store(cfg, task, split) for split in cfg.splits}
    if not all(path for path, _ in found.values()):
        return None, found
    for path, _ in found.values():
        log(f"{path.name}: complete; nothing to compute")
    return [path for path, _ in found.values()], found
