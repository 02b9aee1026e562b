"""The plan of each split (`plan_split`) and whether anything is left to compute (`SplitPlan.complete`),
answered from names, the stat cache and manifests alone.

A re-run of `make features` on complete stores costs a stat per source file: this module imports
neither torch nor any network or image library (pipeline/extract.py, which builds the frozen
networks, is imported only when something has to be computed).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from stores import Store, dataset_name, key_of, store_name
from stores.privacy import local_path
from stores.store import SOURCES_DIR, StoreError
from stores.wds import export_wds

from .degrade import DEGRADATIONS
from .layouts import parse_data
from .names import is_network_target, is_user_encoder, is_user_target, weights_arg
from .sources import Source, open_source
from .tasks import Task, get_task


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


def pairs_key(source: Source, task: Task, seed: int) -> tuple[str, dict]:
    """(key, spec) of a split's pairs member: needs the source, not the frozen networks."""
    deg = None if source.paired else task.degradation
    degradation = {"name": deg, "params": DEGRADATIONS[deg][1], "seed": seed} if deg else None
    spec = {"source": source.fingerprint, "task": task.name, "degradation": degradation}
    return key_of(spec), spec


@dataclass(frozen=True)
class SplitPlan:
    """What one split of `make features` needs, found without torch or any network: its source
    (listed once, with the stat cache of the last run unless --rehash), the pairs member's key,
    the store's path, and the target and encoders its other members are computed with."""
    cfg: FeaturesConfig
    task: Task
    split: str
    source: Source
    pairs_key: str
    pairs_spec: dict
    path: Path
    target: str  # the target's name (--target, else the task's)
    encoders: tuple  # the encoders' names
    stat_cache: bool  # the source's files were checked against an earlier run's records
    _answer: dict = field(default_factory=dict, repr=False, compare=False)

    def complete(self) -> bool:
        """Is every member this command asks for complete already? Answered once per plan, from
        the stat cache and the manifest alone (no image decoded or hashed, no network built); False
        when something may have to be computed (the networks are then built and members checked by
        key). A member counts when its recorded settings match and its weight files keep their
        (size, mtime). User factories (`module.path:factory`) are always built (their code may have
        changed); `--rehash` always builds and checks by key."""
        if "complete" not in self._answer:
            self._answer["complete"] = self._complete()
        return self._answer["complete"]

    def _complete(self) -> bool:
        cfg, rec = self.cfg, self.source.records or {}
        if cfg.rehash or is_user_target(self.target) or any(is_user_encoder(n) for n in self.encoders):
            return False
        if (cfg.data != "demo" and not self.stat_cache) or rec.get("changed") or rec.get("touched"):
            return False  # the full path names the changed files and records the new stats
        try:
            members = Store(self.path).manifest()["members"]
        except (StoreError, OSError, ValueError, KeyError):
            return False
        done = [info for info in members.values() if info.get("status") == "complete" and _unchanged(info)]
        return members.get("pairs", {}).get("status") == "complete" and self._target_done(done) and all(
            self._encoder_done(name, done) for name in self.encoders)

    def _target_done(self, done: list) -> bool:
        recipe = TARGET_RECIPE if is_network_target(self.target) else CLASSICAL_RECIPE  # tiling is a network's
        want = {f: getattr(self.cfg, f) for f in recipe}
        return any(i.get("target") == self.target.split(":")[0]  # what it computed, not what the default was then
                   and local_path(i["config"].get("target") or self.task.target) == self.target
                   and {f: local_path(i["config"].get(f)) for f in recipe} == want for i in done)

    def _encoder_done(self, name: str, done: list) -> bool:
        cfg = self.cfg
        want = {**{f: getattr(cfg, f) for f in ENCODER_RECIPE}, "weights": weights_arg(name, cfg.clip_weights,
                                                                                       cfg.sd_weights)}
        return any(local_path(i.get("encoder")) == name and want == {
            **{f: local_path(i["config"].get(f)) for f in ENCODER_RECIPE},
            "weights": local_path(weights_arg(name, i["config"].get("clip_weights"), i["config"].get("sd_weights")))}
            for i in done)


def plan_split(cfg: FeaturesConfig, task: Task, split: str) -> SplitPlan:
    """List one split's source (the only listing of the dataset folder) and work out its store."""
    stat_cache = None if cfg.rehash or cfg.data == "demo" else known_sources(cfg.store_root, cfg.data, split)
    source = open_source(cfg.data, split, *task.demo_tiles, known=stat_cache)
    key, spec = pairs_key(source, task, cfg.seed)
    path = Path(cfg.store_root) / store_name(source.dataset, split, task.name, key)
    return SplitPlan(cfg, task, split, source, key, spec, path, cfg.target or task.target,
                     tuple((cfg.encoder or task.encoder).split(",")), stat_cache is not None)


def plan_features(cfg: FeaturesConfig) -> list[SplitPlan]:
    """The plan of every split `cfg` names."""
    task = get_task(cfg.task)
    return [plan_split(cfg, task, split) for split in cfg.splits]


def report_complete(plans: list[SplitPlan], wds: bool, log=print) -> list[Path]:
    """Every split is complete: say so and, with --wds, write the export of the members this
    command names (no network is built)."""
    for p in plans:
        log(f"{p.path.name}: complete; nothing to compute")
        if wds:
            export_wds(p.path, target=p.target.split(":")[0], encoders=list(p.encoders), log=log,
                       ranges=[[a, b] for _, a, b in Store(p.path).layout.shards()])
    return [p.path for p in plans]


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
