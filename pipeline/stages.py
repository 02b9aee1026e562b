"""Extraction as named stages over a stream of shards: read -> degrade -> target -> encode -> write.

Every stage has one shape, `stage(shards, *, settings...) -> shards`, a generator over `Shard`s
(webdataset and img2dataset compose theirs the same way): with its settings bound
(`functools.partial`) it is a step of `chain`, so one can be swapped (`read_stored` for `read` +
`degrade` when the pairs are already stored) or tested alone on a list of `Shard`s.
`SplitJob.stages` (pipeline/extract.py) lists them per split and `write` consumes the stream:

    units -> read -> degrade -> prefetch -> held -> target -> encode(s) [-> stored] -> progress -> write

`write` hands each shard to its writers, the store's (`StoreWriter`) and optionally the WebDataset
export's (`WdsStreamWriter`). `prefetch` runs everything before it in one background thread (the
next shard is read and degraded while the networks work on this one) and `write` writes in
another, one shard in flight: at most three shards are in memory at once.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from common.runtime import ahead, follow_cpu_share, release_memory
from stores.leases import LeaseLost
from stores.store import read_json
from stores.wds import INDEX as WDS_INDEX
from stores.wds import WdsWriter

from .degrade import sample_rng
from .sources import SourceError

log = logging.getLogger(__name__)

PAIRS_ARRAYS = ("lq", "gt", "hw", "names", "meta", "source_index")


@dataclass
class Shard:
    """One store shard [lo, hi) of the range `range` on its way through the stages."""

    range: tuple  # (start, stop) of the range it belongs to
    lo: int
    hi: int
    last: bool = True  # the range's last shard: its done markers follow it
    jobs: list = field(default_factory=list)  # [(member, range number)] still missing this range
    samples: list = field(default_factory=list)  # read: one dict per sample (see `read`)
    data: dict = field(
        default_factory=dict
    )  # degraded: lq, gt, hw, names, meta, source_index, index
    outputs: dict = field(default_factory=dict)  # member path -> {array name: values}
    stats: dict = field(
        default_factory=dict
    )  # seconds per stage, samples, notes, excluded per member
    wds_ready: bool = (
        True  # every member's outputs are there (`stored`): a second writer may write it
    )
    fenced: bool = False  # the store's writer lost the range's lease: nothing of it counts

    def wants(self, member: str) -> bool:
        return any(m.path == member for m, _ in self.jobs)

    def excluded(self, member: str) -> list:
        return self.stats.setdefault("excluded", {}).setdefault(member, [])


def _timed(shard: Shard, name: str, t0: float) -> None:
    shard.stats[name] = shard.stats.get(name, 0) + time.perf_counter() - t0


# -- read ------------------------------------------------------------------------------------------
def read(shards: Iterable[Shard], *, sample_at: Callable[[int], tuple]) -> Iterator[Shard]:
    """Decode each sample of each shard. `sample_at(i)` gives sample i's (source index, Sample)
    (pipeline.sources); a sample that cannot be read carries its error instead of pixels."""
    for s in shards:
        t0 = time.perf_counter()
        s.samples = []
        for i in range(s.lo, s.hi):
            src, sample = sample_at(i)
            rec = {
                "index": i,
                "source_index": int(src),
                "name": sample.name,
                "hw": tuple(sample.hw),
            }
            try:
                rec["gt"], rec["lq"], rec["notes"] = sample.load()
            except SourceError as e:
                rec["error"] = str(e)
            s.samples.append(rec)
        _timed(s, "seconds_load", t0)
        yield s


# -- degrade ---------------------------------------------------------------------------------------
def degrade(shards: Iterable[Shard], *, degradation, seed: int) -> Iterator[Shard]:
    """Make lq where the data has none (`degradation`: (function, params), seeded per sample by
    (seed, source index)), check each pair, and pack the shard's `data`. A sample that cannot be
    used (unreadable, truncated, lq/gt sizes differ) is excluded: its slot stays empty with size
    (0, 0) and the reason goes to the excluded records; conversions go to the notes."""
    for s in shards:
        t0 = time.perf_counter()
        n = len(s.samples)
        data = {
            "lq": [None] * n,
            "gt": [None] * n,
            "hw": np.zeros((n, 2), np.int32),
            "names": [],
            "meta": [],
            "source_index": np.array([r["source_index"] for r in s.samples], np.int64),
            "index": np.arange(s.lo, s.hi),
        }
        notes, excluded = [], s.excluded("pairs")
        for j, rec in enumerate(s.samples):
            data["names"].append(rec["name"])
            try:
                gt, lq, drawn = _pair(rec, degradation, seed)
            except SourceError as e:
                excluded.append({"index": rec["index"], "name": rec["name"], "reason": str(e)})
                data["meta"].append(json.dumps({"excluded": str(e)}))
                continue
            data["lq"][j], data["gt"][j], data["hw"][j] = lq, gt, gt.shape[:2]
            data["meta"].append(json.dumps(drawn))
            notes += [{"index": rec["index"], "name": rec["name"], "note": x} for x in rec["notes"]]
        s.data, s.samples = data, []  # the decoded samples are in data now
        s.stats["notes"] = s.stats.get("notes", []) + notes
        s.stats["samples"] = n
        _timed(s, "seconds_load", t0)
        yield s


def _pair(rec: dict, degradation, seed: int):
    """(gt, lq, what the degradation drew) of one read sample; SourceError when unusable."""
    if "error" in rec:
        raise SourceError(rec["error"])
    gt, lq, drawn = rec["gt"], rec["lq"], {}
    if lq is None:
        fn, params = degradation
        x = gt.astype(np.float32)
        x /= 255  # in place: one float32 copy of a large image, not two
        lq_f, drawn = fn(x, sample_rng(seed, rec["source_index"]), **params)
        del x
        lq = np.round(lq_f * 255).astype(np.uint8)
    if lq.shape != gt.shape:
        raise SourceError(
            f"sample {rec['name']}: lq {lq.shape[:2]} and gt {gt.shape[:2]} differ in size"
        )
    if gt.shape[:2] != tuple(rec["hw"]):
        raise SourceError(
            f"sample {rec['name']}: decoded size {gt.shape[:2]} differs from its header {rec['hw']}"
        )
    return gt, lq, drawn


def read_stored(shards: Iterable[Shard], *, store) -> Iterator[Shard]:
    """read + degrade swapped for a store whose pairs member is complete: `data` read back."""
    for s in shards:
        t0 = time.perf_counter()
        s.data = {k: store.array("pairs", k)[s.lo : s.hi] for k in PAIRS_ARRAYS}
        for k in ("lq", "gt"):  # canvases -> valid size
            s.data[k] = [x[:h, :w] if h else None for x, (h, w) in zip(s.data[k], s.data["hw"])]
        s.data["index"] = np.arange(s.lo, s.hi)
        s.stats.setdefault("notes", [])
        s.stats["samples"] = s.hi - s.lo
        s.excluded("pairs")
        _timed(s, "seconds_load", t0)
        yield s


# -- flow ------------------------------------------------------------------------------------------
def chain(
    shards: Iterable[Shard], steps: list[Callable[[Iterable[Shard]], Iterator[Shard]]]
) -> Iterator[Shard]:
    """The stream through each step in turn (each a stage with its settings bound)."""
    for step in steps:
        shards = step(shards)
    return iter(shards)


def units(ranges: list, *, store, leases, work: dict) -> Iterator[Shard]:
    """The stream's source: one Shard per store shard of each range this process can lease,
    claimed as the stream reaches it. `work`: range -> [(member, range number)] still to do."""
    for r in ranges:
        if claim(r, store, leases, work):
            for _, lo, hi in store.shards_of(*r):
                yield Shard(r, lo, hi, hi == r[1], work[r])


def claim(r: tuple, store, leases, work: dict) -> bool:
    """Lease range r, then drop the members another writer finished meanwhile (no rework);
    False (lease given back) when none is left."""
    if not leases.claim(r):
        return False
    work[r] = [(m, ri) for m, ri in work[r] if not store.done_path(m.path, ri).exists()]
    if not work[r]:
        leases.release(r)
    return bool(work[r])


def prefetch(shards: Iterable[Shard]) -> Iterator[Shard]:
    """Run the stages before this one in a background thread, one shard ahead."""
    return ahead(shards)


def held(shards: Iterable[Shard], *, leases) -> Iterator[Shard]:
    """Drop the shards of ranges whose lease was lost while they were read: the new holder computes them."""
    return (s for s in shards if leases.holds(s.range))


def progress(shards: Iterable[Shard], *, bar) -> Iterator[Shard]:
    for s in shards:
        if bar is not None:
            bar.update(s.hi - s.lo)
        yield s


# -- the frozen networks -----------------------------------------------------------------------------
def target(shards: Iterable[Shard], *, member: str, net) -> Iterator[Shard]:
    """`base` (float16, valid size) of member `member` for the shards that need it; a non-finite or
    misshapen output, or one beyond float16's range, excludes that sample."""
    for s in shards:
        if s.wants(member):
            follow_cpu_share()  # threads: shared with the extractions and trainings beside this one
            t0 = time.perf_counter()
            s.outputs[member] = {"base": run_target(net, s.data, s.excluded(member))}
            _timed(s, "seconds_targets", t0)
        yield s


def encode(shards: Iterable[Shard], *, member: str, encoder, batch: int) -> Iterator[Shard]:
    """`g` ((n, 4 flips, D) float32) of member `member` for the shards that need it."""
    for s in shards:
        if s.wants(member):
            follow_cpu_share()
            t0 = time.perf_counter()
            s.excluded(member)
            s.outputs[member] = {"g": run_encoder(encoder, s.data, batch)}
            _timed(s, "seconds_osf", t0)
        yield s


def run_target(net, data: dict, excluded: list) -> list:
    """base (float16, valid size) for every usable sample, None for the others."""
    base = [None] * len(data["hw"])
    for j, (h, w) in enumerate(data["hw"]):
        if h == 0:  # excluded when loading
            continue
        lq = data["lq"][j].astype(np.float32)
        lq /= 255  # in place: one float32 copy of a large image, not two
        out = net(lq, json.loads(str(data["meta"][j])))
        problem, half = None, None
        if out.shape != lq.shape:
            problem = f"shape {out.shape}, expected {lq.shape}"
        elif not np.isfinite(out).all():
            problem = f"{int((~np.isfinite(out)).sum())} non-finite values (NaN or inf)"
        else:
            with np.errstate(
                over="ignore"
            ):  # checked below: the stored float16, not the float32 output
                half = out.astype(np.float16)
            if not np.isfinite(half).all():
                problem = (
                    f"{int((~np.isfinite(half)).sum())} values outside the float16 range (|x| > 65504) "
                    f"that base is stored in"
                )
        if problem:
            excluded.append(
                {
                    "name": str(data["names"][j]),
                    "index": int(data["index"][j]),
                    "reason": f"target {net.id} gave a bad output: {problem}",
                }
            )
            continue
        base[j] = half
    return base


def run_encoder(encoder, data: dict, batch: int) -> np.ndarray:
    usable = [j for j, (h, w) in enumerate(data["hw"]) if h > 0]
    g = np.zeros((len(data["hw"]), 4, encoder.dim), np.float32)
    views = [data["lq"][j] for j in usable]
    for k in range(0, len(views), batch):
        g[usable[k : k + batch]] = encoder(views[k : k + batch])
    return g


def stored(shards: Iterable[Shard], *, store, members: list[str]) -> Iterator[Shard]:
    """Add the outputs (and recorded exclusions) of the members a shard does not compute (written
    before, by this or another writer: their done markers exist), read back, so that a second
    writer (the WebDataset one) sees every member of every shard. Only the done marker of the range
    covering each shard is read (once per range), so T ranges read O(T) markers, not O(T^2). A shard
    a member has not written yet (no marker: another writer's range in progress) gets
    `wds_ready` False, and the second writer leaves it to the export's completion."""
    complete = {m: store.records(m)["excluded"] for m in members if store.status(m) == "complete"}
    starts = {m: [a for a, _ in store.ranges(m)] for m in members if m not in complete}
    markers: dict = {}

    def recorded(m: str, lo: int) -> list | None:
        if m in complete:
            return complete[m]
        t = bisect.bisect_right(starts[m], lo) - 1
        if (m, t) not in markers:
            path = store.done_path(m, t)
            markers[(m, t)] = (
                read_json(path)["stats"].get("excluded", []) if path.exists() else None
            )
            if markers[(m, t)] is not None:
                store.publish(m, t)  # its writer may not have moved the shards it vouches for yet
        return markers[(m, t)]

    for s in shards:
        for m in members:
            if m not in s.outputs:
                excluded = recorded(m, s.lo)
                if excluded is None:
                    s.wds_ready = False
                    continue
                arrays = store.member_info(m)["arrays"]
                s.outputs[m] = {k: store._samples(m, k)[s.lo : s.hi] for k in arrays}
                s.excluded(m).extend(e for e in excluded if s.lo <= e.get("index", -1) < s.hi)
        yield s


def usable_hw(s: Shard) -> np.ndarray:
    """The shard's valid sizes, (0, 0) for every sample any member excluded."""
    hw = np.array(s.data["hw"], np.int32).copy()
    for records in s.stats.get("excluded", {}).values():
        for e in records:
            if s.lo <= e.get("index", -1) < s.hi:
                hw[e["index"] - s.lo] = 0
    return hw


# -- write -----------------------------------------------------------------------------------------
def pairs_outputs(s: Shard) -> dict:
    return {k: s.data[k] for k in PAIRS_ARRAYS}


def write(shards: Iterable[Shard], *writers: Callable[[Shard], None]) -> int:
    """Consume the stream: each of `writers` (the store's, and optionally a second one such as
    the WebDataset writer) gets every shard, in a background thread, at most one shard in flight
    (bounded memory); returns the number of samples written."""
    done = 0

    def write_all(s: Shard) -> None:
        for w in writers:
            w(s)
        s.samples, s.data, s.outputs = [], {}, {}  # written: give the pixels' memory back
        release_memory()

    with ThreadPoolExecutor(1) as writer:
        pending: deque = deque()
        for s in shards:
            if any(m.path == "pairs" for m, _ in s.jobs):
                s.outputs["pairs"] = pairs_outputs(s)
            pending.append(writer.submit(write_all, s))
            done += s.hi - s.lo
            while len(pending) > 1:
                pending.popleft().result()
        for p in pending:
            p.result()
    return done


class StoreWriter:
    """The store's writer of a stream (the first of `write`'s writers): each shard of every member
    into the staging folder of its range's lease generation; after a range's last shard, its done
    markers, each naming that generation, then publish what the markers vouch for. Each write is
    checked against the lease: a writer that lost it stops and says so. One paused right after a
    check writes only into its own generation's folder, which no marker names: its bytes, even
    different ones (a network target on another GPU), never reach the arrays."""

    def __init__(self, store, leases, made_by: dict | None = None):
        self.store, self.leases, self.made_by = store, leases, made_by
        self.progress: dict = {}  # (member, range number) -> its stage folder, shard hashes and stats so far

    def __call__(self, shard: Shard) -> None:
        r, lo, hi, last, stats, leases = (
            shard.range,
            shard.lo,
            shard.hi,
            shard.last,
            shard.stats,
            self.leases,
        )
        try:
            for m, ri in shard.jobs:
                t0 = time.perf_counter()
                acc = self.progress.setdefault((m.path, ri), {"hashes": {}, "stats": {}})
                gen = leases.check(r, "shards")
                acc["stage"] = self.store.staging(*r, gen, leases.token)
                acc["hashes"][lo] = self.store.write_shard(
                    m.path, lo, hi, shard.outputs[m.path], acc["stage"]
                )
                merge_stats(
                    acc["stats"],
                    {
                        **stats,
                        "excluded": stats["excluded"].get(m.path, []),
                        "notes": stats["notes"] if m.path == "pairs" else [],
                        "seconds_write": time.perf_counter() - t0,
                    },
                )
                if last:
                    leases.check(r, f"done marker of {m.path} range {ri}")
                    if not self.store.mark_done(
                        m.path, ri, acc["hashes"], acc["stats"], gen, acc["stage"], self.made_by
                    ):
                        log.info(
                            f"{m.path} range {ri}: another writer wrote its done marker first; kept theirs"
                        )
                    self.store.settle(m.path, ri, self.progress.pop((m.path, ri))["stage"])
        except LeaseLost as e:
            for m, ri in shard.jobs:
                acc = self.progress.pop((m.path, ri), None)
                if acc and "stage" in acc:
                    self.store.settle(m.path, ri, acc["stage"])
            shard.fenced = (
                True  # the second writer (WebDataset) leaves this shard to the new holder
            )
            log.warning(f"{self.store.path.name}: {e}")
            return
        if last:
            leases.release(r)


def merge_stats(total: dict, part: dict) -> None:
    """Add one shard's stats to its range's: numbers summed, lists concatenated."""
    for k, v in part.items():
        total[k] = total.get(k, [] if isinstance(v, list) else 0) + v


class WdsStreamWriter:
    """The WebDataset writer of a stream (the second of `write`'s writers): each shard, with every
    member's outputs (`stored`), becomes the export's tar of that store shard (stores/wds.py, the
    writer `python -m stores export-wds` uses)."""

    def __init__(self, store, target: str, encoders: list[str], keys: dict):
        self.target, self.encoders = target, encoders
        self.writer = WdsWriter(
            store.path.parent / f"{store.path.name}-wds",
            store.path.name,
            keys["pairs"],
            store.manifest().get("task"),
            target,
            encoders,
            keys,
        )
        self.number = {a: k for k, (_, a, _) in enumerate(store.layout.shards())}
        self.writer.out.mkdir(parents=True, exist_ok=True)
        (self.writer.out / WDS_INDEX).unlink(
            missing_ok=True
        )  # tars change below: an older index no longer holds

    def __call__(self, s: Shard) -> None:
        if not s.wds_ready or s.fenced:
            return  # a member not written for it yet, or this writer lost the range: the export's completion fills it in
        hw, d, out = usable_hw(s), s.data, s.outputs
        rows = (
            {
                "index": i,
                "name": str(d["names"][j]),
                "hw": hw[j],
                "lq": d["lq"][j],
                "gt": d["gt"][j],
                "base": out[self.target]["base"][j],
                "g": {e: out[e]["g"][j] for e in self.encoders},
                "meta": str(d["meta"][j]),
            }
            for j, i in enumerate(range(s.lo, s.hi))
        )
        self.writer.write_shard(self.number[s.lo], s.lo, s.hi, rows)
