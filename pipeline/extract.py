"""Stage 1: build or complete a task's stores: read -> degrade -> target -> encoder -> write.

Run: `python -m pipeline features --task deblur --data demo` (what `make features` calls).
Loading (and degrading) the next task's samples and writing the previous task's shards run in
background threads, so the frozen networks in the main thread do not wait on I/O.
"""
from __future__ import annotations

import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stores import ArraySpec, Store, encoder_id, key_of, make_plan, store_name

from .degrade import DEGRADATIONS, sample_rng
from .encoders import build_encoder
from .sources import Source, SourceError, open_source
from .targets import build_target
from .tasks import get_task


@dataclass(frozen=True)
class FeaturesConfig:
    task: str = "deblur"
    data: str = "demo"
    target: str | None = None  # None: the task's default
    encoder: str | None = None  # None: the task's default (clip-vit-b32)
    store_root: str = "data/stores"
    shards: int | None = None  # extraction tasks per split; None: one per shard
    shard_len: int = 16  # samples per shard
    tile: int = 64  # spatial chunk edge of image arrays
    seed: int = 0  # degradation seed (per sample: (seed, index))
    clip_weights: str | None = None
    allow_random_weights: bool = False
    init_seed: int = 0  # seed of a random encoder initialisation
    splits: tuple = ("train", "test")
    batch: int = 8  # images per encoder call (x4 flips)


@dataclass
class Member:
    path: str  # "pairs", "targets/<id>", "osf/<id>"
    key: str
    spec: dict
    arrays: list
    info: dict = field(default_factory=dict)


def plan_members(source: Source, task, target, encoder, cfg: FeaturesConfig):
    """The three members of a split's store, each with the key of what determines it."""
    deg = None if source.paired else task.degradation
    degradation = {"name": deg, "params": DEGRADATIONS[deg][1], "seed": cfg.seed} if deg else None
    pairs_spec = {"source": source.fingerprint, "task": task.name, "degradation": degradation}
    pairs_key = key_of(pairs_spec)
    n = len(source.samples)
    h = max(s.hw[0] for s in source.samples)
    w = max(s.hw[1] for s in source.samples)
    img = lambda name, dtype: ArraySpec(name, (n, h, w, 3), dtype, cfg.tile)  # noqa: E731
    pairs = Member("pairs", pairs_key, pairs_spec,
                   [img("lq", "uint8"), img("gt", "uint8"), ArraySpec("hw", (n, 2), "int32"),
                    ArraySpec("names", (n,), "str"), ArraySpec("meta", (n,), "str")])
    tspec = {"pairs": pairs_key, **target.spec()}
    tkey = key_of(tspec)
    tgt = Member(f"targets/{target.id}-{tkey[:12]}", tkey, tspec, [img("base", "float16")],
                 {"target": target.id, "weights": target.weights})
    espec = {"pairs": pairs_key, **encoder.spec()}
    ekey = key_of(espec)
    enc = Member(f"osf/{encoder_id(encoder.name)}-{ekey[:12]}", ekey, espec,
                 [ArraySpec("g", (n, 4, encoder.dim), "float32")],
                 {"encoder": encoder.name, "weights": encoder.weights["weights"], "dim": encoder.dim})
    return pairs_key, [pairs, tgt, enc]


def load_range(source: Source, start: int, stop: int, degradation, seed: int, hw_max) -> dict:
    """Samples [start, stop) as padded uint8 canvases plus their valid sizes, names and meta."""
    t0 = time.perf_counter()
    n, (H, W) = stop - start, hw_max
    out = {"lq": np.zeros((n, H, W, 3), np.uint8), "gt": np.zeros((n, H, W, 3), np.uint8),
           "hw": np.zeros((n, 2), np.int32), "names": [], "meta": []}
    for j, i in enumerate(range(start, stop)):
        sample = source.samples[i]
        gt, lq = sample.load()
        drawn = {}
        if lq is None:
            fn, params = degradation
            lq_f, drawn = fn(gt.astype(np.float32) / 255, sample_rng(seed, i), **params)
            lq = np.round(lq_f * 255).astype(np.uint8)
        if lq.shape != gt.shape:
            raise SourceError(f"sample {sample.name}: lq {lq.shape} and gt {gt.shape} differ in size")
        h, w = gt.shape[:2]
        out["lq"][j, :h, :w], out["gt"][j, :h, :w], out["hw"][j] = lq, gt, (h, w)
        out["names"].append(sample.name)
        out["meta"].append(json.dumps(drawn))
    out["names"], out["meta"] = np.array(out["names"]), np.array(out["meta"])
    out["seconds_load"] = time.perf_counter() - t0
    return out


def read_range(store: Store, start: int, stop: int) -> dict:
    """The same dict as load_range, read back from a complete pairs member."""
    t0 = time.perf_counter()
    out = {k: store.array("pairs", k)[start:stop] for k in ("lq", "gt", "hw", "names", "meta")}
    out["seconds_load"] = time.perf_counter() - t0
    return out


def run_target(target, data: dict, names) -> np.ndarray:
    base = np.zeros(data["lq"].shape, np.float16)
    for j, (h, w) in enumerate(data["hw"]):
        lq = data["lq"][j, :h, :w].astype(np.float32) / 255
        out = target(lq, json.loads(str(data["meta"][j])))
        if out.shape != lq.shape or not np.isfinite(out).all():
            raise ValueError(f"target {target.id} gave a bad output for sample {names[j]}: "
                             f"shape {out.shape} (expected {lq.shape}), finite={np.isfinite(out).all()}")
        base[j, :h, :w] = out
    return base


def run_encoder(encoder, data: dict, batch: int) -> np.ndarray:
    views = [data["lq"][j, :h, :w] for j, (h, w) in enumerate(data["hw"])]
    return np.concatenate([encoder(views[i:i + batch]) for i in range(0, len(views), batch)])


def build_split(cfg: FeaturesConfig, task, split: str, target, encoder, log=print) -> Path:
    """Build or complete one split's store; returns its path. Finished tasks are skipped."""
    source = open_source(cfg.data, split, *task.demo_tiles)
    pairs_key, members = plan_members(source, task, target, encoder, cfg)
    path = Path(cfg.store_root) / store_name(source.dataset, split, task.name, pairs_key)
    hw_max = tuple(members[0].arrays[0].shape[1:3])
    store = Store.open_or_create(path, {"dataset": source.dataset, "split": split, "task": task.name,
                                        "pairs_key": pairs_key, "n": len(source.samples),
                                        "metric_space": task.metric_space,
                                        "max_hw": list(hw_max)})
    todo = [m for m in members if store.status(m.path, m.key) != "complete"]
    if not todo:
        log(f"{path.name}: complete ({', '.join(m.path for m in members)}); nothing to compute")
        return path
    plan = make_plan(len(source.samples), cfg.shard_len, cfg.shards)
    for m in todo:  # a member that exists keeps the plan it was started with
        store.begin_member(m.path, m.key, m.spec, m.arrays, cfg.shard_len, plan,
                           {**m.info, "config": asdict(cfg)})
    work: dict[tuple, list] = {}  # (start, stop) -> [(member, task index)] still to do
    for m in todo:
        done = store.done_tasks(m.path)
        for t, (a, b) in enumerate(store.member_info(m.path)["plan"]):
            if t not in done:
                work.setdefault((a, b), []).append((m, t))
    ranges = sorted(work)
    degradation = DEGRADATIONS[task.degradation] if not source.paired else None
    pairs_ready = store.status("pairs") == "complete"

    def load(r):
        if pairs_ready:
            return read_range(store, *r)
        return load_range(source, r[0], r[1], degradation, cfg.seed, hw_max)

    total = sum(b - a for a, b in ranges)
    log(f"{path.name}: computing {', '.join(m.path for m in todo)} "
        f"({total} samples, {len(ranges)} tasks)")
    bar = tqdm(total=total, unit="img", desc=f"{split}", dynamic_ncols=True)
    with ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(1) as writer:
        pending: deque = deque()
        nxt = loader.submit(load, ranges[0])
        for i, r in enumerate(ranges):
            data = nxt.result()
            if i + 1 < len(ranges):
                nxt = loader.submit(load, ranges[i + 1])
            outputs, stats = compute(work[r], data, target, encoder, cfg.batch)
            bar.update(r[1] - r[0])
            pending.append(writer.submit(write_outputs, store, work[r], outputs, stats))
            while len(pending) > 1:  # at most one write in flight: bounded memory
                pending.popleft().result()
        for p in pending:
            p.result()
    bar.close()
    for m in todo:
        info = store.finalize(m.path)
        log(f"  {m.path}: complete, {info['bytes'] / 1e6:.1f} MB" +
            (f", weights: {m.info['weights']}" if "weights" in m.info else ""))
    return path


def compute(jobs, data, target, encoder, batch) -> tuple[dict, dict]:
    """Run the frozen networks a range needs; returns outputs per member kind and timings."""
    kinds = {m.path.split("/")[0] for m, _ in jobs}
    outputs, stats = {}, {"seconds_load": data["seconds_load"], "samples": len(data["hw"])}
    names = data["names"]
    if "targets" in kinds:
        t0 = time.perf_counter()
        outputs["targets"] = {"base": run_target(target, data, names)}
        stats["seconds_target"] = time.perf_counter() - t0
    if "osf" in kinds:
        t0 = time.perf_counter()
        outputs["osf"] = {"g": run_encoder(encoder, data, batch)}
        stats["seconds_encoder"] = time.perf_counter() - t0
    outputs["pairs"] = {k: data[k] for k in ("lq", "gt", "hw", "names", "meta")}
    return outputs, stats


def write_outputs(store: Store, jobs, outputs, stats) -> None:
    for m, t in jobs:
        store.write_task(m.path, t, outputs[m.path.split("/")[0]], stats)


def build_features(cfg: FeaturesConfig, log=print) -> list[Path]:
    """`make features`: every split of the task, with the target and encoder built once."""
    task = get_task(cfg.task)
    target = build_target(cfg.target or task.target)
    allow_random = cfg.allow_random_weights or cfg.data == "demo"
    encoder = build_encoder(cfg.encoder or task.encoder, cfg.clip_weights, allow_random, cfg.init_seed)
    log(f"task {task.name}: target {target.id}, encoder {encoder.name} "
        f"({encoder.arch}, weights: {encoder.weights['weights']}, dim {encoder.dim})")
    return [build_split(cfg, task, split, target, encoder, log) for split in cfg.splits]
