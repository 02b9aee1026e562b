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
from typing import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stores import ArraySpec, Leases, Store, encoder_id, key_of, make_plan, store_name
from stores.runtime import tune_allocator

from .degrade import DEGRADATIONS, sample_rng
from .encoders import build_encoder, weights_arg
from .networks import is_network_target
from .sources import Source, SourceError, open_source, release_caches
from .targets import build_target
from .tasks import get_task


@dataclass(frozen=True)
class FeaturesConfig:
    task: str = "deblur"
    data: str = "demo"
    target: str | None = None  # None: the task's default
    target_weights: str | None = None  # checkpoint of a network target
    target_tile: int | None = None  # run the target in overlapping tiles of this size
    target_overlap: int = 32
    encoder: str | None = None  # None: the task's default (clip-vit-b32)
    store_root: str = "data/stores"
    store_shared: str | None = None  # read-only root (path or s3://) searched for complete members first
    shards: int | None = None  # extraction tasks per split; None: one per shard
    shard_len: int = 16  # samples per shard
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


@dataclass
class Member:
    path: str  # "pairs", "targets/<id>", "osf/<id>"
    key: str
    spec: dict
    arrays: list
    info: dict = field(default_factory=dict)
    run: Callable | None = None  # (range data, excluded list) -> {array name: values}; None: pairs


def plan_members(source: Source, task, target, encoders: list, cfg: FeaturesConfig):
    """The members of a split's store (pairs, the target, one per encoder), each keyed by what
    determines it."""
    deg = None if source.paired else task.degradation
    degradation = {"name": deg, "params": DEGRADATIONS[deg][1], "seed": cfg.seed} if deg else None
    pairs_spec = {"source": source.fingerprint, "task": task.name, "degradation": degradation}
    pairs_key = key_of(pairs_spec)
    n = len(source.samples)
    h = max(s.hw[0] for s in source.samples)
    w = max(s.hw[1] for s in source.samples)
    img = lambda name, dtype: ArraySpec(name, (n, h, w, 3), dtype, cfg.tile)  # noqa: E731
    members = [Member("pairs", pairs_key, pairs_spec,
                      [img("lq", "uint8"), img("gt", "uint8"), ArraySpec("hw", (n, 2), "int32"),
                       ArraySpec("names", (n,), "str"), ArraySpec("meta", (n,), "str")])]
    tspec = {"pairs": pairs_key, **target.spec()}
    tkey = key_of(tspec)
    members.append(Member(f"targets/{target.id}-{tkey[:12]}", tkey, tspec, [img("base", "float16")],
                          {"target": target.id, "weights": target.weights},
                          lambda data, excluded: {"base": run_target(target, data, excluded)}))
    for enc in encoders:
        espec = {"pairs": pairs_key, **enc.spec()}
        ekey = key_of(espec)
        members.append(Member(f"osf/{encoder_id(enc.name)}-{ekey[:12]}", ekey, espec,
                              [ArraySpec("g", (n, 4, enc.dim), "float32")],
                              {"encoder": enc.name, "weights": enc.weights["weights"], "dim": enc.dim},
                              lambda data, excluded, enc=enc: {"g": run_encoder(enc, data, cfg.batch)}))
    return pairs_key, members


def load_range(source: Source, start: int, stop: int, degradation, seed: int, hw_max) -> dict:
    """Samples [start, stop) as padded uint8 canvases plus valid sizes, names and meta.

    A sample that cannot be used (unreadable, truncated, lq/gt sizes differ) is excluded: its
    slot stays empty with size (0, 0) and the reason goes to `excluded`; conversions
    (grayscale, alpha, 16-bit) go to `notes`. The rest of the range is unaffected.
    """
    t0 = time.perf_counter()
    n, (H, W) = stop - start, hw_max
    out = {"lq": np.zeros((n, H, W, 3), np.uint8), "gt": np.zeros((n, H, W, 3), np.uint8),
           "hw": np.zeros((n, 2), np.int32), "names": [], "meta": [], "excluded": [], "notes": []}
    for j, i in enumerate(range(start, stop)):
        sample = source.samples[i]
        out["names"].append(sample.name)
        try:
            gt, lq, drawn, notes = _load_sample(sample, i, degradation, seed)
        except SourceError as e:
            out["excluded"].append({"index": i, "name": sample.name, "reason": str(e)})
            out["meta"].append(json.dumps({"excluded": str(e)}))
            continue
        h, w = gt.shape[:2]
        out["lq"][j, :h, :w], out["gt"][j, :h, :w], out["hw"][j] = lq, gt, (h, w)
        out["meta"].append(json.dumps(drawn))
        out["notes"] += [{"index": i, "name": sample.name, "note": x} for x in notes]
    out["names"], out["meta"] = np.array(out["names"]), np.array(out["meta"])
    out["index"] = np.arange(start, stop)
    out["seconds_load"] = time.perf_counter() - t0
    return out


def _load_sample(sample, i: int, degradation, seed: int):
    gt, lq, notes = sample.load()
    drawn = {}
    if lq is None:
        fn, params = degradation
        lq_f, drawn = fn(gt.astype(np.float32) / 255, sample_rng(seed, i), **params)
        lq = np.round(lq_f * 255).astype(np.uint8)
    if lq.shape != gt.shape:
        raise SourceError(f"sample {sample.name}: lq {lq.shape[:2]} and gt {gt.shape[:2]} differ in size")
    if gt.shape[:2] != tuple(sample.hw):
        raise SourceError(f"sample {sample.name}: decoded size {gt.shape[:2]} differs from its header {sample.hw}")
    return gt, lq, drawn, notes


def read_range(store: Store, start: int, stop: int) -> dict:
    """The same dict as load_range, read back from a complete pairs member."""
    t0 = time.perf_counter()
    out = {k: store.array("pairs", k)[start:stop] for k in ("lq", "gt", "hw", "names", "meta")}
    out["index"] = np.arange(start, stop)
    out["seconds_load"] = time.perf_counter() - t0
    return out


def run_target(target, data: dict, excluded: list) -> np.ndarray:
    """base for every usable sample; a non-finite or misshapen output excludes that sample."""
    base = np.zeros(data["lq"].shape, np.float16)
    for j, (h, w) in enumerate(data["hw"]):
        if h == 0:  # excluded when loading
            continue
        lq = data["lq"][j, :h, :w].astype(np.float32) / 255
        out = target(lq, json.loads(str(data["meta"][j])))
        if out.shape != lq.shape or not np.isfinite(out).all():
            problem = (f"shape {out.shape}, expected {lq.shape}" if out.shape != lq.shape else
                       f"{int((~np.isfinite(out)).sum())} non-finite values (NaN or inf)")
            excluded.append({"name": str(data["names"][j]), "index": int(data["index"][j]),
                             "reason": f"target {target.id} gave a bad output: {problem}"})
            continue
        base[j, :h, :w] = out
    return base


def run_encoder(encoder, data: dict, batch: int) -> np.ndarray:
    usable = [j for j, (h, w) in enumerate(data["hw"]) if h > 0]
    g = np.zeros((len(data["hw"]), 4, encoder.dim), np.float32)
    views = [data["lq"][j, :data["hw"][j][0], :data["hw"][j][1]] for j in usable]
    for k in range(0, len(views), batch):
        g[usable[k:k + batch]] = encoder(views[k:k + batch])
    return g


class SplitJob:
    """One split's extraction: its store and members (planned on creation), the task ranges
    still to do, running some of them, and finalising. `make features` runs all of them;
    SLURM array tasks run one range each (`slurm/`), then one job finalises."""

    def __init__(self, cfg: FeaturesConfig, task, split: str, target, encoders: list):
        self.cfg, self.split = cfg, split
        self.source = open_source(cfg.data, split, *task.demo_tiles)
        pairs_key, self.members = plan_members(self.source, task, target, encoders, cfg)
        self.path = Path(cfg.store_root) / store_name(self.source.dataset, split, task.name, pairs_key)
        if cfg.store_shared:
            fetch_shared(cfg.store_shared, self.path, {m.path: m.key for m in self.members})
        self.hw_max = tuple(self.members[0].arrays[0].shape[1:3])
        self.store = Store.open_or_create(self.path, {
            "dataset": self.source.dataset, "split": split, "task": task.name, "pairs_key": pairs_key,
            "n": len(self.source.samples), "metric_space": task.metric_space, "max_hw": list(self.hw_max)})
        self.todo = [m for m in self.members if self.store.status(m.path, m.key) != "complete"]
        plan = make_plan(len(self.source.samples), cfg.shard_len, cfg.shards)
        for m in self.todo:  # a member that exists keeps the plan it was started with
            self.store.begin_member(m.path, m.key, m.spec, m.arrays, cfg.shard_len, plan,
                                    {**m.info, "config": asdict(cfg)})
        self.degradation = DEGRADATIONS[task.degradation] if not self.source.paired else None

    def work(self) -> dict[tuple, list]:
        """(start, stop) -> [(member, task index)] of the tasks without a done marker."""
        out: dict[tuple, list] = {}
        for m in self.todo:
            done = self.store.done_tasks(m.path)
            for t, (a, b) in enumerate(self.store.member_info(m.path)["plan"]):
                if t not in done:
                    out.setdefault((a, b), []).append((m, t))
        return out

    def _load(self, r: tuple) -> dict:
        if self.store.status("pairs") == "complete":
            return read_range(self.store, *r)
        return load_range(self.source, r[0], r[1], self.degradation, self.cfg.seed, self.hw_max)

    def run(self, ranges: list | None = None, bar=None) -> int:
        """Compute and write the given (default: all unfinished) ranges this process can lease;
        returns the number of samples computed here. Loading the next range and writing the
        previous one overlap with the frozen networks."""
        work = self.work()
        ranges = sorted(work) if ranges is None else [r for r in map(tuple, ranges) if r in work]
        done = 0
        with ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(1) as writer, \
                Leases(self.store.path, self.cfg.lease_seconds) as leases:
            pending: deque = deque()
            mine = (r for r in ranges if leases.claim(r))
            r = next(mine, None)
            nxt = loader.submit(self._load, r) if r else None
            while r is not None:
                data = nxt.result()
                r_next = next(mine, None)
                nxt = loader.submit(self._load, r_next) if r_next else None
                outputs, stats = compute(work[r], data)
                if bar is not None:
                    bar.update(r[1] - r[0])
                done += r[1] - r[0]
                pending.append(writer.submit(self._write, work[r], outputs, stats, leases, r))
                while len(pending) > 1:  # at most one write in flight: bounded memory
                    pending.popleft().result()
                r = r_next
            for p in pending:
                p.result()
        return done

    def _write(self, jobs, outputs, stats, leases, r) -> None:
        write_outputs(self.store, jobs, outputs, stats)
        leases.release(r)

    def finalize(self, log=print) -> None:
        """Check exclusions, verify every member's shards and mark them complete."""
        check_exclusions(self.store, [m.path for m in self.todo], len(self.source.samples), self.cfg.max_bad, log)
        for m in self.todo:
            if self.store.status(m.path) == "complete":  # another writer finished it
                continue
            info = self.store.finalize(m.path)
            log(f"  {m.path}: complete, {info['bytes'] / 1e6:.1f} MB" +
                (f", weights: {m.info['weights']}" if "weights" in m.info else ""))


def fetch_shared(shared_root: str, local: Path, wanted: dict, log=print) -> None:
    """Copy the members we need that a shared root already holds complete, with the same keys,
    into the local store (verified, file by file); the shared root is only read."""
    from stores.remote import RemoteError, copy_store, open_location, read_manifest

    src = shared_root.rstrip("/") + "/" + local.name
    try:
        shared = json.loads(read_manifest(open_location(src)))["members"]
    except (RemoteError, FileNotFoundError, ValueError, KeyError):
        return  # not there (or not a store): compute locally
    have = Store(local).manifest()["members"] if (local / "manifest.json").is_file() else {}
    hits = [p for p, k in wanted.items() if shared.get(p, {}).get("key") == k
            and shared[p].get("status") == "complete" and have.get(p, {}).get("status") != "complete"]
    if hits:
        log(f"{local.name}: {', '.join(hits)} found complete in {shared_root}; copying instead of computing")
        copy_store(src, str(local.parent))


def build_split(cfg: FeaturesConfig, task, split: str, target, encoders: list, log=print) -> Path:
    """Build or complete one split's store; returns its path. Finished tasks are skipped; tasks
    another writer holds a live lease on are waited for (or taken over when the lease expires)."""
    job = SplitJob(cfg, task, split, target, encoders)
    layout = job.source.fingerprint.get("layout")
    if layout:  # detected or named: say which, so a wrong guess shows at once
        log(f"{cfg.data} ({split}): {layout} layout, {len(job.source.samples)} "
            f"{'pairs' if job.source.paired else 'clean images'}")
    if not job.todo:
        log(f"{job.path.name}: complete ({', '.join(m.path for m in job.members)}); nothing to compute")
        return job.path
    work = job.work()
    total = sum(b - a for a, b in work)
    log(f"{job.path.name}: computing {', '.join(m.path for m in job.todo)} ({total} samples, {len(work)} tasks)")
    bar = tqdm(total=total, unit="img", desc=f"{split}", dynamic_ncols=True)
    while work:
        if not job.run(sorted(work), bar):  # everything left is leased by another writer
            time.sleep(1.0)
        work = job.work()
        bar.n = total - sum(b - a for a, b in work)
        bar.refresh()
    bar.close()
    release_caches()
    job.finalize(log)
    return job.path


def check_exclusions(store: Store, members: list, n: int, max_bad: float, log=print) -> None:
    """Report excluded samples and conversions; stop when too many samples were lost."""
    excluded = {e["name"]: e["reason"] for m in members for e in store.task_records(m, "excluded")}
    for note in store.task_records("pairs", "notes") if "pairs" in members else []:
        log(f"  note: {note['name']}: {note['note']}")
    for name, reason in excluded.items():
        log(f"  excluded: {name}: {reason}")
    if len(excluded) > max_bad * n:
        raise SourceError(f"{store.path.name}: {len(excluded)} of {n} samples excluded (more than "
                          f"--max-bad {max_bad:.0%}); first: {next(iter(excluded.items()))}. Fix them or "
                          f"raise --max-bad; the members stay incomplete")


def compute(jobs, data) -> tuple[dict, dict]:
    """Run the frozen networks the members of a range need; outputs and timings per member."""
    outputs = {}
    stats = {"seconds_load": data["seconds_load"], "samples": len(data["hw"]), "notes": data.get("notes", []),
             "excluded": {"pairs": data.get("excluded", [])}}
    for m, _ in jobs:
        if m.run is None:
            outputs[m.path] = {k: data[k] for k in ("lq", "gt", "hw", "names", "meta")}
            continue
        t0 = time.perf_counter()
        stats["excluded"][m.path] = []
        outputs[m.path] = m.run(data, stats["excluded"][m.path])
        stats[f"seconds_{m.path.split('/')[0]}"] = stats.get(f"seconds_{m.path.split('/')[0]}", 0) + \
            time.perf_counter() - t0
    return outputs, stats


def write_outputs(store: Store, jobs, outputs, stats) -> None:
    """Each member's shards, then its done marker with the samples it excluded."""
    for m, t in jobs:
        own = {**stats, "excluded": stats["excluded"].get(m.path, []),
               "notes": stats["notes"] if m.path == "pairs" else []}
        store.write_task(m.path, t, outputs[m.path], own)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda[:i]' without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to torch")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    return device


def build_models(cfg: FeaturesConfig):
    """(task, target, encoders) of a features config: `make features` and SLURM tasks build them
    here, once per process."""
    tune_allocator()  # before the networks are built: their buffers are reused, not page-faulted
    task = get_task(cfg.task)
    tiling = {"tile": cfg.target_tile, "overlap": cfg.target_overlap} if cfg.target_tile else {}
    device = resolve_device(cfg.device)
    name = cfg.target or task.target
    allow_random = cfg.allow_random_weights or cfg.data == "demo"
    target = build_target(name, cfg.target_weights, allow_random, cfg.init_seed, **tiling,
                          **({"device": device} if is_network_target(name) else {}))
    encoders = [build_encoder(n, weights_arg(n, cfg.clip_weights, cfg.sd_weights), allow_random, cfg.init_seed,
                              device) for n in (cfg.encoder or task.encoder).split(",")]
    return task, target, encoders


def build_features(cfg: FeaturesConfig, log=print) -> list[Path]:
    """`make features`: every split of the task, with the target and encoders built once.

    `cfg.encoder` may name several encoders (comma-separated): each is a member of its own, and
    one added to a complete store computes only itself.
    """
    task, target, encoders = build_models(cfg)
    log(f"task {task.name}: target {target.id}; " + "; ".join(
        f"encoder {e.name} ({e.arch}, weights: {e.weights['weights']}, dim {e.dim})" for e in encoders))
    return [build_split(cfg, task, split, target, encoders, log) for split in cfg.splits]
