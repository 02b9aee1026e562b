"""Stage 1: build or complete a task's stores: read -> degrade -> target -> encoder -> write.

Run: `python -m pipeline features --task deblur --data demo` (what `make features` calls).
Work goes shard by shard (a shard holds at most about `--shard-mb` of pixels; stores/layout.py)
through the named stages of pipeline/stages.py: loading (and degrading) the next shard and writing
the previous one run in background threads, so the frozen networks in the main thread do not wait
on I/O, and memory follows the shard's bytes, not the split's size or its largest image.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from common.log import bars
from common.privacy import shareable
from common.runtime import set_torch_threads, tune_allocator
from stores import (
    TEXT,
    ArraySpec,
    Leases,
    Store,
    encoder_id,
    key_of,
    make_layout,
    write_json_atomic,
)
from stores.provenance import provenance
from stores.store import SOURCES_DIR, StoreError

from . import stages
from .degrade import DEGRADATIONS
from .descriptors import Descriptors, write_descriptors
from .encoders import build_encoder
from .layouts import parse_data
from .names import is_network_target, weights_arg
from .plan import (
    SOURCES_FILE,
    FeaturesConfig,
    SplitPlan,
    export_split,
    plan_features,
    report_complete,
)
from .sources import Source, SourceError, in_order, release_caches
from .targets import build_target
from .tasks import get_task

log = logging.getLogger(__name__)


@dataclass
class Member:
    path: str  # "pairs", "targets/<id>", "osf/<id>"
    key: str
    spec: dict
    arrays: list
    info: dict = field(default_factory=dict)
    run: Callable | None = None  # its stage (pipeline/stages.py): shards -> shards; None: pairs


META_BYTES = 16384  # per-sample JSON of what the degradation drew (a 19x19 kernel is about 8 KB)


def text_width(values) -> int:
    """Bytes per row for these strings: the longest UTF-8, rounded up to 64."""
    return max(64, -(-max((len(str(v).encode()) for v in values), default=1) // 64) * 64)


def pairs_member(plan: SplitPlan) -> Member:
    source = plan.source
    img = lambda name: ArraySpec(name, "uint8", (3,), image=True)  # noqa: E731
    return Member(
        "pairs",
        plan.pairs_key,
        plan.pairs_spec,
        [
            img("lq"),
            img("gt"),
            ArraySpec("hw", "int32", (2,)),
            ArraySpec("names", TEXT, (text_width(s.name for s in source.samples),)),
            ArraySpec("meta", TEXT, (META_BYTES,)),
            ArraySpec("source_index", "int64"),
        ],
    )


def stored_member(store: Store, path: str) -> Member:
    """A member as `SplitJob.open` began it (key, spec, arrays), read from the manifest."""
    info = store.member_info(path)
    if info is None:
        raise StoreError(
            f"{store.path}: no member {path}; run `python -m slurm features` or "
            f"`make features` first"
        )
    arrays = [
        ArraySpec(k, a["dtype"], tuple(a["row"]), a["image"]) for k, a in info["arrays"].items()
    ]
    return Member(path, info["key"], info["spec"], arrays)


@dataclass
class Members:
    """A split's members by name: the pairs, the target's base, one OSF member per encoder."""

    pairs: Member
    target: Member
    encoders: list

    def __iter__(self):
        return iter([self.pairs, self.target, *self.encoders])

    def exported(self) -> tuple[str, list[str]]:
        """(target member, osf members, sorted) of the split's WebDataset export."""
        return self.target.path, sorted(m.path for m in self.encoders)


def default_batch(encoder) -> int:
    """Images per encoder call when --batch is not given: 8 on a CPU (the stored features were
    always computed so), 256 on a GPU (1,024 views per call keep it busy)."""
    return 256 if str(encoder.device).startswith("cuda") else 8


def network_members(pairs: Member, target, encoders: list, batch: int | None) -> Members:
    """The members of a split's store (pairs, the target, one per encoder), each keyed by what
    determines it; each network member carries its stage."""
    tspec = {"pairs": pairs.key, **target.spec()}
    tkey = key_of(tspec)
    path = f"targets/{target.id}-{tkey[:12]}"
    base = Member(
        path,
        tkey,
        tspec,
        [ArraySpec("base", "float16", (3,), image=True)],
        {
            "target": target.id,
            "weights": target.weights,
            "inputs": file_stats([getattr(target, "checkpoint", None)]),
        },
        partial(stages.target, member=path, net=target),
    )
    osf = []
    for enc in encoders:
        espec = {"pairs": pairs.key, **enc.spec()}
        ekey = key_of(espec)
        path = f"osf/{encoder_id(enc.name)}{getattr(enc, 'id_suffix', '')}-{ekey[:12]}"
        osf.append(
            Member(
                path,
                ekey,
                espec,
                [ArraySpec("g", "float32", (4, enc.dim))],
                {
                    "encoder": enc.name,
                    "weights": enc.weights["weights"],
                    "dim": enc.dim,
                    "inputs": file_stats(encoder_inputs(enc)),
                },
                partial(stages.encode, member=path, encoder=enc, batch=batch or default_batch(enc)),
            )
        )
    return Members(pairs, base, osf)


def begin_members(
    store: Store, members: Members, cfg: FeaturesConfig
) -> tuple[list[Member], dict | None]:
    """(the members still to compute, this writer's device and arch) after recording, in the
    manifest, each missing member with its ranges (a member that exists keeps the ranges it was
    started with); a member complete by key keeps its weight files' stats for the next no-op check."""
    status = {m.path: store.status(m.path, m.key) for m in members}
    todo = [m for m in members if status[m.path] != "complete"]
    for m in members:
        log.debug(f"{store.path.name}: member {m.path} key {m.key}: {status[m.path]}")
        if (
            m not in todo
            and "inputs" in m.info
            and store.member_info(m.path).get("inputs") != shareable(m.info["inputs"])
        ):
            store._update_member(m.path, inputs=m.info["inputs"])
    made_by = provenance(device_kind(cfg.device)) if todo else None  # describes; never in a key
    for m in todo:
        store.begin_member(
            m.path,
            m.key,
            m.spec,
            m.arrays,
            cfg.shards,
            {**m.info, "config": asdict(cfg), "provenance": made_by},
        )
    return todo, {"device": made_by["device"], "arch": made_by["arch"]} if made_by else None


class SplitJob:
    """One split's extraction: its store and members, the ranges still to do, and running some
    of them through the stages (pipeline/stages.py). `make features` runs all of them
    (`SplitJob.open`, from the split's plan); a SLURM array task runs one range of a store opened
    before (`SplitJob.of_store`, which reads only the manifest and its range's sample descriptors)."""

    def __init__(
        self,
        store: Store,
        members: Members,
        todo: list,
        sample_at,
        degradation,
        seed: int,
        lease_seconds: float,
        made_by: dict | None = None,
    ):
        self.store, self.path, self.members, self.todo = store, store.path, members, todo
        self.sample_at, self.degradation, self.seed = sample_at, degradation, seed
        self.lease_seconds, self.made_by = lease_seconds, made_by

    @classmethod
    def open(cls, plan: SplitPlan, target, encoders: list) -> "SplitJob":
        """Create or open the planned store, write its sample descriptors and members' ranges."""
        cfg, source, path = plan.cfg, plan.source, plan.path
        members = network_members(pairs_member(plan), target, encoders, cfg.batch)
        if cfg.store_shared:
            fetch_shared(cfg.store_shared, path, {m.path: m.key for m in members})
        hws = [s.hw for s in source.samples]
        layout, _ = make_layout(hws, cfg.tile, cfg.shard_len, cfg.shard_mb * 1e6)
        records = source_records(source)
        store = Store.open_or_create(
            path,
            {
                "dataset": source.dataset,
                "split": plan.split,
                "task": plan.task.name,
                "pairs_key": plan.pairs_key,
                "metric_space": plan.task.metric_space,
            },
            layout,
            side_files=records,
        )
        save_records(records, path)
        order = make_layout(hws, store.layout.tile)[1]  # a store keeps the layout it was made with
        write_descriptors(path, source, order)
        degradation = DEGRADATIONS[plan.task.degradation] if not source.paired else None
        todo, made_by = begin_members(store, members, cfg)
        return cls(
            store,
            members,
            todo,
            in_order(source.samples, order),
            degradation,
            cfg.seed,
            cfg.lease_seconds,
            made_by,
        )

    @classmethod
    def of_store(cls, cfg: FeaturesConfig, task, path, target, encoders: list) -> "SplitJob":
        """A store opened before (`SplitJob.open`), without its dataset folder: the manifest gives
        the members, the sample descriptors (read one file at a time, as the range needs them) the
        samples."""
        store = Store(path, mode="a")
        members = network_members(stored_member(store, "pairs"), target, encoders, cfg.batch)
        descriptors = Descriptors(path, None if cfg.data == "demo" else parse_data(cfg.data)[1])
        degradation = None if descriptors.index["paired"] else DEGRADATIONS[task.degradation]
        todo, made_by = begin_members(store, members, cfg)
        job = cls(
            store,
            members,
            todo,
            descriptors.sample_at,
            degradation,
            cfg.seed,
            cfg.lease_seconds,
            made_by,
        )
        job.descriptors = descriptors  # the sample descriptor files read so far
        return job

    def work(self) -> dict[tuple, list]:
        """(start, stop) -> [(member, range number)] of the ranges without a done marker."""
        out: dict[tuple, list] = {}
        for m in self.todo:
            done = self.store.done_ranges(m.path)
            for ri, (a, b) in enumerate(self.store.ranges(m.path)):
                if ri not in done:
                    out.setdefault((a, b), []).append((m, ri))
        return out

    def stages(self, leases, bar=None, every_member: bool = False) -> list:
        """The stages of this split after the units: read (or read back) -> degrade -> prefetch ->
        held -> target -> encoders [-> the complete members read back] -> progress."""
        if self.store.status("pairs") == "complete":
            steps = [partial(stages.read_stored, store=self.store)]
        else:
            steps = [
                partial(stages.read, sample_at=self.sample_at),
                partial(stages.degrade, degradation=self.degradation, seed=self.seed),
            ]
        steps += [
            stages.prefetch,
            partial(stages.held, leases=leases),
            self.members.target.run,
            *(m.run for m in self.members.encoders),
        ]
        if every_member:  # a second writer needs every member of every shard
            networks = [self.members.target, *self.members.encoders]
            steps.append(
                partial(stages.stored, store=self.store, members=[m.path for m in networks])
            )
        return steps + [partial(stages.progress, bar=bar)]

    def run(
        self, ranges: list | None = None, bar=None, wds: stages.WdsStreamWriter | None = None
    ) -> int:
        """Compute and write the given (default: all unfinished) ranges this process can lease,
        shard by shard; returns the number of samples computed here. `wds`: a second writer that
        also gets every shard (with all members' outputs)."""
        work = self.work()
        ranges = sorted(work) if ranges is None else [r for r in map(tuple, ranges) if r in work]
        with Leases(self.store.path, self.lease_seconds) as leases:
            units = stages.units(ranges, store=self.store, leases=leases, work=work)
            shards = stages.chain(units, self.stages(leases, bar, wds is not None))
            writers = [stages.StoreWriter(self.store, leases, self.made_by)] + (
                [wds] if wds else []
            )
            return stages.write(shards, *writers)


def wds_stream(job: SplitJob) -> stages.WdsStreamWriter:
    """The second writer of a split's stream: its WebDataset export, shard by shard."""
    return stages.WdsStreamWriter(
        job.store, *job.members.exported(), {m.path: m.key for m in job.members}
    )


def finalize_members(store: Store, members: list[str], max_bad: float) -> None:
    """Check exclusions, verify each member's shards and mark it complete (the store alone: no
    dataset folder, no network)."""
    store.refresh()
    check_exclusions(store, members, store.layout.n, max_bad)
    for m in members:
        if store.status(m) == "complete":  # another writer finished it
            continue
        info = store.finalize(m)
        log.info(
            f"  {m}: complete, {info['bytes'] / 1e6:.1f} MB"
            + (f", weights: {info['weights']}" if "weights" in info else "")
        )


RECORDS = (
    f"{SOURCES_DIR}/{SOURCES_FILE}"  # the source records in a store: the stat cache of the next run
)


def source_records(source: Source) -> dict:
    """{RECORDS: the source's records as a store keeps them}, or {} (the demo has none)."""
    rec = source.records
    return (
        {}
        if rec is None
        else {RECORDS: shareable({k: v for k, v in rec.items() if k not in ("changed", "touched")})}
    )


def save_records(records: dict, path: Path) -> None:
    """The source records, when they changed; written by the writer of a store only (readers never
    modify it)."""
    for rel, keep in records.items():
        target = Path(path) / rel
        if not target.is_file() or json.loads(target.read_text()) != keep:
            write_json_atomic(target, keep)


def file_stats(paths) -> list:
    """[path, size, mtime_ns] of each file a frozen network was read from (a folder: its files)."""
    out = []
    for p in (Path(p) for p in paths if p):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out += [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]
    return out


def encoder_inputs(enc) -> list:
    """The weight files (or folders) an encoder was built from."""
    arch = enc.name[len("openclip:") :] if enc.name.startswith("openclip:") else ""
    return [enc.weights.get("path"), arch if arch and Path(arch).is_dir() else None]


def fetch_shared(shared_root: str, local: Path, wanted: dict) -> None:
    """Copy the members we need that a shared root already holds complete, with the same keys,
    into the local store (verified, file by file); the shared root is only read."""
    from common.privacy import scrub
    from stores.remote import RemoteError, copy_store, open_location, read_manifest

    src = shared_root.rstrip("/") + "/" + local.name
    try:
        shared = json.loads(read_manifest(open_location(src)))["members"]
    except (RemoteError, FileNotFoundError, ValueError, KeyError):
        return  # not there (or not a store): compute locally
    have = Store(local).manifest()["members"] if (local / "manifest.json").is_file() else {}
    hits = [
        p
        for p, k in wanted.items()
        if shared.get(p, {}).get("key") == k
        and shared[p].get("status") == "complete"
        and have.get(p, {}).get("status") != "complete"
    ]
    if hits:
        log.info(
            f"{local.name}: {', '.join(hits)} found complete in {scrub(shared_root)}; copying instead of computing"
        )
        copy_store(src, str(local.parent))


def build_split(plan: SplitPlan, target, encoders: list) -> Path:
    """Build or complete one split's store; returns its path. Finished ranges are skipped; ranges
    another writer holds a live lease on are waited for (or taken over when the lease expires)."""
    cfg, source = plan.cfg, plan.source
    job = SplitJob.open(plan, target, encoders)
    layout = source.fingerprint.get("layout")
    if layout:  # detected or named: say which, so a wrong guess shows at once
        log.info(
            f"{cfg.data} ({plan.split}): {layout} layout, {len(source.samples)} "
            f"{'pairs' if source.paired else 'clean images'}"
        )
    rec = source.records or {}
    if rec.get("changed"):
        log.info(
            f"source files changed since the last run (content differs, so this is a new store): "
            f"{', '.join(rec['changed'][:10])}"
            + (f" and {len(rec['changed']) - 10} more" if len(rec["changed"]) > 10 else "")
        )
    if rec.get("touched"):
        log.info(
            f"{len(rec['touched'])} source file(s) touched (mtime changed) but unchanged in content, e.g. {rec['touched'][0]}"
        )
    if job.todo:
        work = job.work()
        total = sum(b - a for a, b in work)
        log.info(
            f"{job.path.name}: computing {', '.join(m.path for m in job.todo)} ({total} samples, {len(work)} ranges)"
        )
        bar = tqdm(
            total=total, unit="img", desc=f"{plan.split}", dynamic_ncols=True, disable=not bars()
        )
        wds = wds_stream(job) if cfg.wds else None
        while work:
            if not job.run(sorted(work), bar, wds):  # everything left is leased by another writer
                time.sleep(1.0)
            work = job.work()
            bar.n = total - sum(b - a for a, b in work)
            bar.refresh()
        bar.close()
        release_caches()
        finalize_members(job.store, [m.path for m in job.todo], cfg.max_bad)
    else:
        log.info(
            f"{job.path.name}: complete ({', '.join(m.path for m in job.members)}); nothing to compute"
        )
    if cfg.wds:
        export_split(job.path, *job.members.exported())
    return job.path


def check_exclusions(store: Store, members: list, n: int, max_bad: float) -> None:
    """Report excluded samples and conversions; stop when too many samples were lost."""
    excluded = {e["name"]: e["reason"] for m in members for e in store.range_records(m, "excluded")}
    for note in store.range_records("pairs", "notes") if "pairs" in members else []:
        log.info(f"  note: {note['name']}: {note['note']}")
    for name, reason in excluded.items():
        log.warning(f"excluded: {name}: {reason}")
    if len(excluded) > max_bad * n:
        raise SourceError(
            f"{store.path.name}: {len(excluded)} of {n} samples excluded (more than "
            f"--max-bad {max_bad:.0%}); first: {next(iter(excluded.items()))}. Fix them or "
            f"raise --max-bad; the members stay incomplete"
        )


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda[:i]' without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to torch")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    return device


def device_kind(device: str) -> str:
    """'cpu', or the name of the GPU `device` (as --device takes it) runs on: for provenance."""
    device = resolve_device(device)
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def build_models(cfg: FeaturesConfig):
    """(task, target, encoders) of a features config: `make features` and SLURM array tasks build them
    here, once per process."""
    if cfg.batch is not None and cfg.batch < 1:  # else no encoder call, and g stored all zero
        raise ValueError(f"--batch must be at least 1 image, got {cfg.batch}")
    tune_allocator()  # before the networks are built: their buffers are reused, not page-faulted
    set_torch_threads()  # the CPUs this process may use (affinity, cgroup quota, SLURM), not the machine's
    task = get_task(cfg.task)
    tiling = {"tile": cfg.target_tile, "overlap": cfg.target_overlap} if cfg.target_tile else {}
    device = resolve_device(cfg.device)
    name = cfg.target or task.target
    allow_random = cfg.allow_random_weights or cfg.data == "demo"
    network = (
        {"device": device, "budget_mb": cfg.target_budget_mb} if is_network_target(name) else {}
    )
    if cfg.target_compile:  # a classical target refuses it, naming the flag
        network["compile"] = True
    target = build_target(
        name, cfg.target_weights, allow_random, cfg.init_seed, **tiling, **network
    )
    encoders = [
        build_encoder(
            n,
            weights_arg(n, cfg.clip_weights, cfg.sd_weights),
            allow_random,
            cfg.init_seed,
            device,
            dtype=cfg.encoder_dtype,
        )
        for n in (cfg.encoder or task.encoder).split(",")
    ]
    return task, target, encoders


def build_features(cfg: FeaturesConfig, plans: list[SplitPlan] | None = None) -> list[Path]:
    """`make features`: every split of the task, with the target and encoders built once.

    `cfg.encoder` may name several encoders (comma-separated): each is a member of its own, and
    one added to a complete store computes only itself. `plans`: the splits' plans, when the
    caller made them and found something to compute (the sources are then not listed twice).
    """
    if plans is None:
        plans = plan_features(cfg)
        if all(p.complete() for p in plans):  # a re-run of a complete store: no network is built
            return report_complete(plans, cfg.wds)
    task, target, encoders = build_models(cfg)
    log.info(
        f"task {task.name}: target {target.id}; "
        + "; ".join(
            f"encoder {e.name}{getattr(e, 'id_suffix', '')} ({e.arch}, weights: "
            f"{e.weights['weights']}, dim {e.dim})"
            for e in encoders
        )
    )
    return [build_split(p, target, encoders) for p in plans]
