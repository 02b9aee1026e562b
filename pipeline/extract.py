"""Stage 1: build or complete a task's stores: read -> degrade -> target -> encoder -> write.

Run: `python -m pipeline features --task deblur --data demo` (what `make features` calls).
Work goes shard by shard (a shard holds at most about `--shard-mb` of pixels; stores/layout.py):
loading (and degrading) the next shard and writing the previous one run in background threads, so
the frozen networks in the main thread do not wait on I/O, and memory follows the shard's bytes, not
the split's size or its largest image.
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stores import (TEXT, ArraySpec, Leases, Store, dataset_name, encoder_id, key_of, make_layout, store_name,
                    write_json_atomic)
from stores.leases import LeaseLost
from stores.privacy import local_path, shareable
from stores.store import SOURCES_DIR, StoreError
from stores.runtime import set_torch_threads, tune_allocator

from .degrade import DEGRADATIONS, sample_rng
from .encoders import build_encoder, is_user_encoder, weights_arg
from .networks import BUILTINS, is_network_target
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


@dataclass
class Member:
    path: str  # "pairs", "targets/<id>", "osf/<id>"
    key: str
    spec: dict
    arrays: list
    info: dict = field(default_factory=dict)
    run: Callable | None = None  # (range data, excluded list) -> {array name: values}; None: pairs


META_BYTES = 16384  # per-sample JSON of what the degradation drew (a 19x19 kernel is about 8 KB)


def text_width(values) -> int:
    """Bytes per row for these strings: the longest UTF-8, rounded up to 64."""
    return max(64, -(-max((len(str(v).encode()) for v in values), default=1) // 64) * 64)


def plan_pairs(source: Source, task, cfg: FeaturesConfig) -> tuple[str, dict]:
    """(key, spec) of a split's pairs member: needs the source, not the frozen networks."""
    deg = None if source.paired else task.degradation
    degradation = {"name": deg, "params": DEGRADATIONS[deg][1], "seed": cfg.seed} if deg else None
    spec = {"source": source.fingerprint, "task": task.name, "degradation": degradation}
    return key_of(spec), spec


def plan_members(source: Source, task, target, encoders: list, cfg: FeaturesConfig):
    """The members of a split's store (pairs, the target, one per encoder), each keyed by what
    determines it."""
    pairs_key, pairs_spec = plan_pairs(source, task, cfg)
    img = lambda name, dtype: ArraySpec(name, dtype, (3,), image=True)  # noqa: E731
    members = [Member("pairs", pairs_key, pairs_spec,
                      [img("lq", "uint8"), img("gt", "uint8"), ArraySpec("hw", "int32", (2,)),
                       ArraySpec("names", TEXT, (text_width(s.name for s in source.samples),)),
                       ArraySpec("meta", TEXT, (META_BYTES,)), ArraySpec("source_index", "int64")])]
    tspec = {"pairs": pairs_key, **target.spec()}
    tkey = key_of(tspec)
    members.append(Member(f"targets/{target.id}-{tkey[:12]}", tkey, tspec, [img("base", "float16")],
                          {"target": target.id, "weights": target.weights,
                           "inputs": file_stats([getattr(target, "checkpoint", None)])},
                          lambda data, excluded: {"base": run_target(target, data, excluded)}))
    for enc in encoders:
        espec = {"pairs": pairs_key, **enc.spec()}
        ekey = key_of(espec)
        members.append(Member(f"osf/{encoder_id(enc.name)}-{ekey[:12]}", ekey, espec,
                              [ArraySpec("g", "float32", (4, enc.dim))],
                              {"encoder": enc.name, "weights": enc.weights["weights"], "dim": enc.dim,
                               "inputs": file_stats(encoder_inputs(enc))},
                              lambda data, excluded, enc=enc: {"g": run_encoder(enc, data, cfg.batch)}))
    return pairs_key, members


def load_range(source: Source, order, start: int, stop: int, degradation, seed: int) -> dict:
    """Samples [start, stop) (storage order; `order[i]` is sample i's source index) at their own
    sizes, plus valid sizes, names, meta and source indices.

    A sample that cannot be used (unreadable, truncated, lq/gt sizes differ) is excluded: its
    slot stays empty with size (0, 0) and the reason goes to `excluded`; conversions
    (grayscale, alpha, 16-bit) go to `notes`. The rest of the range is unaffected.
    """
    t0 = time.perf_counter()
    n = stop - start
    out = {"lq": [None] * n, "gt": [None] * n, "hw": np.zeros((n, 2), np.int32), "names": [], "meta": [],
           "source_index": np.asarray(order[start:stop], np.int64), "excluded": [], "notes": []}
    for j, i in enumerate(range(start, stop)):
        src = int(order[i])
        sample = source.samples[src]
        out["names"].append(sample.name)
        try:
            gt, lq, drawn, notes = _load_sample(sample, src, degradation, seed)
        except SourceError as e:
            out["excluded"].append({"index": i, "name": sample.name, "reason": str(e)})
            out["meta"].append(json.dumps({"excluded": str(e)}))
            continue
        out["lq"][j], out["gt"][j], out["hw"][j] = lq, gt, gt.shape[:2]
        out["meta"].append(json.dumps(drawn))
        out["notes"] += [{"index": i, "name": sample.name, "note": x} for x in notes]
    out["index"] = np.arange(start, stop)
    out["seconds_load"] = time.perf_counter() - t0
    return out


def _load_sample(sample, i: int, degradation, seed: int):
    gt, lq, notes = sample.load()
    drawn = {}
    if lq is None:
        fn, params = degradation
        x = gt.astype(np.float32)
        x /= 255  # in place: one float32 copy of a large image, not two
        lq_f, drawn = fn(x, sample_rng(seed, i), **params)
        del x
        lq = np.round(lq_f * 255).astype(np.uint8)
    if lq.shape != gt.shape:
        raise SourceError(f"sample {sample.name}: lq {lq.shape[:2]} and gt {gt.shape[:2]} differ in size")
    if gt.shape[:2] != tuple(sample.hw):
        raise SourceError(f"sample {sample.name}: decoded size {gt.shape[:2]} differs from its header {sample.hw}")
    return gt, lq, drawn, notes


PAIRS_ARRAYS = ("lq", "gt", "hw", "names", "meta", "source_index")


def read_range(store: Store, start: int, stop: int) -> dict:
    """The same dict as load_range, read back from a complete pairs member."""
    t0 = time.perf_counter()
    out = {k: store.array("pairs", k)[start:stop] for k in PAIRS_ARRAYS}
    for k in ("lq", "gt"):  # canvases -> valid size
        out[k] = [x[:h, :w] if h else None for x, (h, w) in zip(out[k], out["hw"])]
    out["index"] = np.arange(start, stop)
    out["seconds_load"] = time.perf_counter() - t0
    return out


def run_target(target, data: dict, excluded: list) -> list:
    """base (float16, valid size) for every usable sample, None for the others; a non-finite or
    misshapen output excludes that sample."""
    base = [None] * len(data["hw"])
    for j, (h, w) in enumerate(data["hw"]):
        if h == 0:  # excluded when loading
            continue
        lq = data["lq"][j].astype(np.float32)
        lq /= 255  # in place: one float32 copy of a large image, not two
        out = target(lq, json.loads(str(data["meta"][j])))
        if out.shape != lq.shape or not np.isfinite(out).all():
            problem = (f"shape {out.shape}, expected {lq.shape}" if out.shape != lq.shape else
                       f"{int((~np.isfinite(out)).sum())} non-finite values (NaN or inf)")
            excluded.append({"name": str(data["names"][j]), "index": int(data["index"][j]),
                             "reason": f"target {target.id} gave a bad output: {problem}"})
            continue
        base[j] = out.astype(np.float16)
    return base


def run_encoder(encoder, data: dict, batch: int) -> np.ndarray:
    usable = [j for j, (h, w) in enumerate(data["hw"]) if h > 0]
    g = np.zeros((len(data["hw"]), 4, encoder.dim), np.float32)
    views = [data["lq"][j] for j in usable]
    for k in range(0, len(views), batch):
        g[usable[k:k + batch]] = encoder(views[k:k + batch])
    return g


class SplitJob:
    """One split's extraction: its store and members (planned on creation), the task ranges
    still to do, running some of them, and finalising. `make features` runs all of them;
    SLURM array tasks run one range each (`slurm/`), then one job finalises."""

    def __init__(self, cfg: FeaturesConfig, task, split: str, target, encoders: list, source: Source | None = None,
                 log=print):
        self.cfg, self.split, self.log = cfg, split, log
        if source is None:  # else opened already (by complete_store: the stat cache is not read twice)
            known = None if cfg.rehash or cfg.data == "demo" else known_sources(cfg.store_root, cfg.data, split)
            source = open_source(cfg.data, split, *task.demo_tiles, known=known)
        self.source = source
        pairs_key, self.members = plan_members(self.source, task, target, encoders, cfg)
        self.path = Path(cfg.store_root) / store_name(self.source.dataset, split, task.name, pairs_key)
        if cfg.store_shared:
            fetch_shared(cfg.store_shared, self.path, {m.path: m.key for m in self.members})
        hws = [s.hw for s in self.source.samples]
        layout, _ = make_layout(hws, cfg.tile, cfg.shard_len, cfg.shard_mb * 1e6)
        self.store = Store.open_or_create(self.path, {
            "dataset": self.source.dataset, "split": split, "task": task.name, "pairs_key": pairs_key,
            "metric_space": task.metric_space}, layout, self._save_records)
        self._save_records(self.path)
        self.order = make_layout(hws, self.store.layout.tile)[1]  # a store keeps the layout it was made with
        self.todo = [m for m in self.members if self.store.status(m.path, m.key) != "complete"]
        for m in self.members:  # complete by key: keep its weight files' stats for the next re-run's fast path
            if m not in self.todo and "inputs" in m.info and self.store.member_info(m.path).get("inputs") != m.info["inputs"]:
                self.store._update_member(m.path, inputs=m.info["inputs"])
        for m in self.todo:  # a member that exists keeps the plan it was started with
            self.store.begin_member(m.path, m.key, m.spec, m.arrays, cfg.shards, {**m.info, "config": asdict(cfg)})
        self.degradation = DEGRADATIONS[task.degradation] if not self.source.paired else None

    def _save_records(self, path: Path) -> None:
        """The source records (the stat cache of the next run), when they changed; written by
        the writer of a store only (readers never modify it)."""
        rec = self.source.records
        if rec is None:
            return
        target = Path(path) / SOURCES_DIR / SOURCES_FILE
        keep = shareable({k: v for k, v in rec.items() if k not in ("changed", "touched")})
        if not target.is_file() or json.loads(target.read_text()) != keep:
            write_json_atomic(target, keep)

    def work(self) -> dict[tuple, list]:
        """(start, stop) -> [(member, task index)] of the tasks without a done marker."""
        out: dict[tuple, list] = {}
        for m in self.todo:
            done = self.store.done_tasks(m.path)
            for t, (a, b) in enumerate(self.store.plan(m.path)):
                if t not in done:
                    out.setdefault((a, b), []).append((m, t))
        return out

    def _load(self, lo: int, hi: int) -> dict:
        if self.store.status("pairs") == "complete":
            return read_range(self.store, lo, hi)
        return load_range(self.source, self.order, lo, hi, self.degradation, self.cfg.seed)

    def run(self, ranges: list | None = None, bar=None) -> int:
        """Compute and write the given (default: all unfinished) ranges this process can lease,
        shard by shard; returns the number of samples computed here. Loading the next shard and
        writing the previous one overlap with the frozen networks; at most three shards are in
        memory at once."""
        work = self.work()
        ranges = sorted(work) if ranges is None else [r for r in map(tuple, ranges) if r in work]
        done = 0
        with ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(1) as writer, \
                Leases(self.store.path, self.cfg.lease_seconds, log=self.log) as leases:
            pending: deque = deque()
            units = ((r, lo, hi, hi == r[1]) for r in ranges if self._claim(leases, r, work)
                     for _, lo, hi in self.store.shards_of(*r))
            u = next(units, None)
            nxt = loader.submit(self._load, u[1], u[2]) if u else None
            progress: dict = {}
            while u is not None:
                data = nxt.result()
                u_next = next(units, None)
                nxt = loader.submit(self._load, u_next[1], u_next[2]) if u_next else None
                r, lo, hi, last = u
                if not leases.holds(r):  # lost while paused or cut off: the new holder computes it
                    u = u_next
                    continue
                outputs, stats = compute(work[r], data)
                if bar is not None:
                    bar.update(hi - lo)
                done += hi - lo
                pending.append(writer.submit(self._write, work[r], outputs, stats, progress, leases, u))
                while len(pending) > 1:  # at most one write in flight: bounded memory
                    pending.popleft().result()
                u = u_next
            for p in pending:
                p.result()
        return done

    def _claim(self, leases, r, work: dict) -> bool:
        """Lease range r, then drop the tasks another writer finished meanwhile (no rework);
        False (lease given back) when none is left."""
        if not leases.claim(r):
            return False
        work[r] = [(m, t) for m, t in work[r] if not self.store.done_path(m.path, t).exists()]
        if not work[r]:
            leases.release(r)
        return bool(work[r])

    def _write(self, jobs, outputs, stats, progress: dict, leases, unit) -> None:
        """Write one shard of every member; after a range's last shard, its done markers. Each
        write is fenced: a writer that lost the range's lease stops and says so."""
        r, lo, hi, last = unit
        try:
            for m, t in jobs:
                t0 = time.perf_counter()
                acc = progress.setdefault((m.path, t), {"hashes": {}, "stats": {}})
                leases.check(r, "shards")
                acc["hashes"][lo] = self.store.write_shard(m.path, lo, hi, outputs[m.path])
                merge_stats(acc["stats"], {**stats, "excluded": stats["excluded"].get(m.path, []),
                                           "notes": stats["notes"] if m.path == "pairs" else [],
                                           "seconds_write": time.perf_counter() - t0})
                if last:
                    leases.check(r, f"done marker of {m.path} task {t}")
                    if not self.store.mark_done(m.path, t, progress.pop((m.path, t))["hashes"], acc["stats"]):
                        self.log(f"{m.path} task {t}: another writer wrote its done marker first; kept theirs")
        except LeaseLost as e:
            for m, t in jobs:
                progress.pop((m.path, t), None)
            self.log(f"{self.path.name}: {e}")
            return
        if last:
            leases.release(r)

    def finalize(self, log=print) -> None:
        """Check exclusions, verify every member's shards and mark them complete."""
        self.store.refresh()
        check_exclusions(self.store, [m.path for m in self.todo], len(self.source.samples), self.cfg.max_bad, log)
        for m in self.todo:
            if self.store.status(m.path) == "complete":  # another writer finished it
                continue
            info = self.store.finalize(m.path)
            log(f"  {m.path}: complete, {info['bytes'] / 1e6:.1f} MB" +
                (f", weights: {m.info['weights']}" if "weights" in m.info else ""))


SOURCES_FILE = "files.json"


def known_sources(store_root: str, data: str, split: str) -> dict | None:
    """The newest source records of an earlier run on the same dataset folder and split (any
    task), or None: files whose (size, mtime) they list unchanged are not hashed again."""
    from .layouts import parse_data

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
ENCODER_RECIPE = ("init_seed", "allow_random_weights")


def file_stats(paths) -> list:
    """[path, size, mtime_ns] of each file a frozen network was read from (a folder: its files)."""
    out = []
    for p in (Path(p) for p in paths if p):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out += [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]
    return out


def encoder_inputs(enc) -> list:
    """The weight files (or folders) an encoder was built from."""
    arch = enc.name[len("openclip:"):] if enc.name.startswith("openclip:") else ""
    return [enc.weights.get("path"), arch if arch and Path(arch).is_dir() else None]


def _unchanged(info: dict) -> bool:
    """A member's weight files still have the (size, mtime) they had when it was computed; a member
    with pre-trained weights recorded before inputs were kept is not trusted."""
    inputs = info.get("inputs")
    if inputs is None:
        return info.get("weights") == "random"
    try:
        return all((st := os.stat(p)).st_size == size and st.st_mtime_ns == mtime for p, size, mtime in inputs)
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
    user_target = ":" in names[0] and names[0].split(":")[0] not in BUILTINS  # module.path:factory
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
    want = {f: getattr(cfg, f) for f in TARGET_RECIPE}
    done = [info for info in members.values() if info.get("status") == "complete" and _unchanged(info)]
    if members.get("pairs", {}).get("status") != "complete" or not any(
            "target" in i and (i["config"].get("target") or task.target) == names[0]
            and {f: i["config"].get(f) for f in TARGET_RECIPE} == want for i in done):
        return None, source
    for name in names[1:]:
        want = {f: getattr(cfg, f) for f in ENCODER_RECIPE}
        want["weights"] = weights_arg(name, cfg.clip_weights, cfg.sd_weights)
        if not any(i.get("encoder") == name and want == {
                **{f: i["config"].get(f) for f in ENCODER_RECIPE},
                "weights": weights_arg(name, i["config"].get("clip_weights"), i["config"].get("sd_weights"))}
                for i in done):
            return None, source
    return path, source


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


def build_split(cfg: FeaturesConfig, task, split: str, target, encoders: list, log=print,
                source: Source | None = None) -> Path:
    """Build or complete one split's store; returns its path. Finished tasks are skipped; tasks
    another writer holds a live lease on are waited for (or taken over when the lease expires)."""
    job = SplitJob(cfg, task, split, target, encoders, source, log)
    layout = job.source.fingerprint.get("layout")
    if layout:  # detected or named: say which, so a wrong guess shows at once
        log(f"{cfg.data} ({split}): {layout} layout, {len(job.source.samples)} "
            f"{'pairs' if job.source.paired else 'clean images'}")
    rec = job.source.records or {}
    if rec.get("changed"):
        log(f"source files changed since the last run (content differs, so this is a new store): "
            f"{', '.join(rec['changed'][:10])}" + (f" and {len(rec['changed']) - 10} more" if len(rec["changed"]) > 10 else ""))
    if rec.get("touched"):
        log(f"{len(rec['touched'])} source file(s) touched (mtime changed) but unchanged in content, e.g. {rec['touched'][0]}")
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
            outputs[m.path] = {k: data[k] for k in PAIRS_ARRAYS}
            continue
        t0 = time.perf_counter()
        stats["excluded"][m.path] = []
        outputs[m.path] = m.run(data, stats["excluded"][m.path])
        stats[f"seconds_{m.path.split('/')[0]}"] = stats.get(f"seconds_{m.path.split('/')[0]}", 0) + \
            time.perf_counter() - t0
    return outputs, stats


def merge_stats(total: dict, part: dict) -> None:
    """Add one shard's stats to its task's: numbers summed, lists concatenated."""
    for k, v in part.items():
        total[k] = total.get(k, [] if isinstance(v, list) else 0) + v


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
    set_torch_threads()  # the CPUs this process may use (affinity, cgroup quota, SLURM), not the machine's
    task = get_task(cfg.task)
    tiling = {"tile": cfg.target_tile, "overlap": cfg.target_overlap} if cfg.target_tile else {}
    device = resolve_device(cfg.device)
    name = cfg.target or task.target
    allow_random = cfg.allow_random_weights or cfg.data == "demo"
    network = {"device": device, "budget_mb": cfg.target_budget_mb} if is_network_target(name) else {}
    target = build_target(name, cfg.target_weights, allow_random, cfg.init_seed, **tiling, **network)
    encoders = [build_encoder(n, weights_arg(n, cfg.clip_weights, cfg.sd_weights), allow_random, cfg.init_seed,
                              device) for n in (cfg.encoder or task.encoder).split(",")]
    return task, target, encoders


def build_features(cfg: FeaturesConfig, log=print) -> list[Path]:
    """`make features`: every split of the task, with the target and encoders built once.

    `cfg.encoder` may name several encoders (comma-separated): each is a member of its own, and
    one added to a complete store computes only itself.
    """
    task = get_task(cfg.task)
    found = {split: complete_store(cfg, task, split) for split in cfg.splits}
    if all(path for path, _ in found.values()):  # a re-run of a complete store: no network is built
        for path, _ in found.values():
            log(f"{path.name}: complete; nothing to compute")
        return [path for path, _ in found.values()]
    task, target, encoders = build_models(cfg)
    log(f"task {task.name}: target {target.id}; " + "; ".join(
        f"encoder {e.name} ({e.arch}, weights: {e.weights['weights']}, dim {e.dim})" for e in encoders))
    return [build_split(cfg, task, split, target, encoders, log, found[split][1]) for split in cfg.splits]
