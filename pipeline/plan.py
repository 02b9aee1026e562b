"""The plan of each split (`plan_split`) and whether anything is left to compute (`SplitPlan.complete`),
answered from names, the stat cache and manifests alone.

A re-run of `make features` on complete stores costs a stat per source file: this module imports
neither torch nor any network or image library (pipeline/extract.py, which builds the frozen
networks, is imported only when something has to be computed).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.privacy import local_path
from stores import Store, dataset_name, encoder_id, key_of, store_name
from stores.cli import setting
from stores.store import SOURCES_DIR, StoreError
from stores.wds import export_wds

from .degrade import DEGRADATIONS
from .layouts import LAYOUTS, parse_data
from .names import dtype_suffix, is_network_target, is_user_encoder, is_user_target, weights_arg
from .sources import Source, open_source
from .tasks import TASKS, Task, get_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeaturesConfig:
    """The settings of `python -m pipeline features`, each one flag (stores/cli.py) with its help;
    recorded in each member it computes (`stores repair` replays them, stores/maintain.py)."""

    task: str = setting("deblur", "restoration task: " + ", ".join(TASKS))
    data: str = setting(
        "demo",
        "'demo' (photos shipped with scikit-image), a dataset folder (layout detected), "
        "or LAYOUT:folder with LAYOUT one of " + ", ".join(LAYOUTS),
    )
    target: str | None = setting(
        None,
        "frozen target: classical (wiener, gamma, streaks, nlmeans, identity), a "
        "built-in network with the official parameter names (snr-aware, mprnet-<deblur|"
        "derain|denoise>, uformer-b, restormer-<deblur|derain|denoise|denoise-gaussian|"
        "defocus>, sci-<easy|medium|difficult> with its published weights shipped in the "
        "project; configuration overrides as NAME:key=value[:key=value], e.g. "
        "mprnet-deblur:n_feat=8), or module.path:factory (default: the task's; see "
        "docs/networks.md)",
    )
    target_weights: str | None = setting(
        None,
        "checkpoint of a network target (.safetensors or a .pth of tensors; "
        "read with weights_only=True). Without it sci-* loads its shipped weights "
        "and another built-in network gets random weights (seed --init-seed, "
        "recorded as weights: random) on the demo or with --allow-random-weights "
        "only",
    )
    target_tile: int | None = setting(None, "run the target in overlapping tiles of this size")
    target_overlap: int = setting(32, "tile overlap")
    target_budget_mb: float = setting(
        1024.0,
        "activation memory of one call of a network target (default: "
        "%(default)s MB): larger images run in tiles sized from it (recorded in the "
        "member key; raise it on a GPU to run whole images; 'inf': never tile, as "
        "versions before the budget did)",
    )
    target_compile: bool = setting(
        False,
        "run a network target in channels_last under torch.compile (faster on a GPU after a "
        "compilation of a minute or more; recompiled once when image sizes vary). Outputs differ "
        "from eager ones in the last bits, so the member key records it (backend, torch "
        "version): another member, computed again",
    )
    encoder: str | None = setting(
        None,
        "'clip-vit-b32' (default), 'effnet-lite0' (ImageNet EfficientNet-Lite0, "
        "weights from its package), 'openclip:<model>[:<tag>]', 'openclip:<folder with "
        "open_clip_config.json>', 'sd-vae', 'sd-unet', or module.path:factory (factory() "
        "returns (nn.Module, {'size', 'mean', 'std'})); comma-separated for several",
    )
    store_root: str = setting("data/stores", "where stores live")
    store_shared: str | None = setting(
        None,
        "a teammates' root (path or s3://...), only read: complete members "
        "with the same key are copied from it instead of computed",
    )
    shards: int | None = setting(None, "extraction ranges per split (default: one per shard)")
    shard_len: int = setting(16, "samples per shard")
    shard_mb: float = setting(
        64.0,
        "at most about this many MB of float16 pixels per shard; large images get "
        "shards of their own",
    )
    tile: int = setting(64, "spatial chunk edge in px")
    seed: int = setting(0, "degradation seed (per sample: (seed, source index))")
    clip_weights: str | None = setting(
        None,
        "OpenCLIP checkpoint file; default: the Hugging Face cache (offline), "
        "else random weights for the demo only",
    )
    sd_weights: str | None = setting(
        None,
        "diffusers folder with vae/ and unet/ (save_pretrained layout) or a VAE "
        "folder, for sd-vae/sd-unet; default: the Hugging Face cache (offline), else "
        "random weights for the demo only",
    )
    allow_random_weights: bool = setting(
        False,
        "allow a random encoder or built-in network target on real data "
        "(recorded as weights: random)",
    )
    init_seed: int = setting(0, "seed of a random encoder or network target initialisation")
    splits: tuple = setting(("train", "test"), "comma-separated")
    batch: int | None = setting(
        None, "images per encoder call, each x4 flips (default: 8 on a CPU, 256 on a GPU)"
    )
    encoder_dtype: str = setting(
        "fp32",
        "the encoders' dtype: fp32 (the stored features as always) or bf16 (about 2x faster on "
        "a CPU with native bfloat16, more on a GPU; features close to fp32's, a cosine above 0.99, "
        "not equal). A bf16 member has its own key and name, <encoder>-bf16 (train with "
        "--encoder clip-vit-b32-bf16)",
    )
    max_bad: float = setting(
        0.05,
        "fraction of samples that may be excluded (unreadable, mismatched, non-finite "
        "target output) before the run stops; the members stay incomplete",
    )

    lease_seconds: float = setting(
        120.0,
        "a range lease not renewed for this long (its writer died or is paused) is taken over",
    )
    device: str = setting(
        "auto",
        "where network targets and encoders run: 'auto' (a CUDA GPU when visible), 'cpu' "
        "or 'cuda[:i]'",
    )
    rehash: bool = setting(
        False,
        "hash every source file again, even those whose (size, mtime) the last run "
        "recorded (by default a re-run costs a stat per file)",
    )
    wds: bool = setting(
        False,
        "also write each split's WebDataset export (<store>-wds/, as `python -m stores "
        "export-wds`) from the samples as they are extracted",
    )


SOURCES_FILE = "files.json"


def known_sources(store_root: str, data: str, split: str) -> dict | None:
    """The newest source records of an earlier run on the same dataset folder and split (any
    task), or None: files whose (size, mtime) they list unchanged are not hashed again."""
    root = parse_data(data)[1].resolve()
    found = sorted(
        Path(store_root).glob(f"{dataset_name(str(root))}-{split}-*/{SOURCES_DIR}/{SOURCES_FILE}"),
        key=lambda p: p.stat().st_mtime_ns,
        reverse=True,
    )
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
        if (
            cfg.rehash
            or is_user_target(self.target)
            or any(is_user_encoder(n) for n in self.encoders)
        ):
            return False
        if (cfg.data != "demo" and not self.stat_cache) or rec.get("changed") or rec.get("touched"):
            return False  # the full path names the changed files and records the new stats
        try:
            members = Store(self.path).manifest()["members"]
        except (StoreError, OSError, ValueError, KeyError):
            return False
        done = [
            info
            for info in members.values()
            if info.get("status") == "complete" and _unchanged(info)
        ]
        return (
            members.get("pairs", {}).get("status") == "complete"
            and self._target_done(done)
            and all(self._encoder_done(name, done) for name in self.encoders)
        )

    def _target_done(self, done: list) -> bool:
        recipe = (
            TARGET_RECIPE if is_network_target(self.target) else CLASSICAL_RECIPE
        )  # tiling is a network's
        want = {f: getattr(self.cfg, f) for f in recipe}
        return any(
            i.get("target")
            == self.target.split(":")[0]  # what it computed, not what the default was then
            and local_path(i["config"].get("target") or self.task.target) == self.target
            and {f: local_path(i["config"].get(f, RECIPE_SINCE.get(f))) for f in recipe} == want
            for i in done
        )

    def _encoder_done(self, name: str, done: list) -> bool:
        cfg = self.cfg
        want = {
            **{f: getattr(cfg, f) for f in ENCODER_RECIPE},
            "weights": weights_arg(name, cfg.clip_weights, cfg.sd_weights),
        }
        return any(
            local_path(i.get("encoder")) == name
            and want
            == {
                **{f: local_path(i["config"].get(f, RECIPE_SINCE.get(f))) for f in ENCODER_RECIPE},
                "weights": local_path(
                    weights_arg(
                        name, i["config"].get("clip_weights"), i["config"].get("sd_weights")
                    )
                ),
            }
            for i in done
        )


def plan_split(cfg: FeaturesConfig, task: Task, split: str) -> SplitPlan:
    """List one split's source (the only listing of the dataset folder) and work out its store."""
    stat_cache = (
        None if cfg.rehash or cfg.data == "demo" else known_sources(cfg.store_root, cfg.data, split)
    )
    source = open_source(cfg.data, split, *task.demo_tiles, known=stat_cache)
    key, spec = pairs_key(source, task, cfg.seed)
    path = Path(cfg.store_root) / store_name(source.dataset, split, task.name, key)
    log.debug(
        f"{split}: {len(source.samples)} samples from {source.dataset} "
        f"({'stat cache of an earlier store' if stat_cache is not None else 'every file hashed'}); "
        f"pairs key {key}; store {path}"
    )
    return SplitPlan(
        cfg,
        task,
        split,
        source,
        key,
        spec,
        path,
        cfg.target or task.target,
        tuple((cfg.encoder or task.encoder).split(",")),
        stat_cache is not None,
    )


def plan_features(cfg: FeaturesConfig) -> list[SplitPlan]:
    """The plan of every split `cfg` names."""
    task = get_task(cfg.task)
    return [plan_split(cfg, task, split) for split in cfg.splits]


def report_complete(plans: list[SplitPlan], wds: bool) -> list[Path]:
    """Every split is complete: say so and, with --wds, write the export of the members this
    command names (no network is built)."""
    for p in plans:
        log.info(f"{p.path.name}: complete; nothing to compute")
        if wds:
            suffix = dtype_suffix(p.cfg.encoder_dtype)  # the members this command asked for
            export_split(
                p.path, p.target.split(":")[0], [encoder_id(n) + suffix for n in p.encoders]
            )
    return [p.path for p in plans]


def export_split(path: Path, target: str, encoders: list[str]) -> Path:
    """A split's WebDataset export of these members, completed (the tars of shards not streamed
    by this run) and indexed."""
    return export_wds(
        path,
        target=target,
        encoders=encoders,
        ranges=[[a, b] for _, a, b in Store(path).layout.shards()],
    )


# -- "nothing to compute" without building a network --------------------------------------------
TARGET_RECIPE = (
    "task",
    "target_weights",
    "target_tile",
    "target_overlap",
    "target_budget_mb",
    "target_compile",
    "init_seed",
    "allow_random_weights",
)
CLASSICAL_RECIPE = tuple(
    f
    for f in TARGET_RECIPE
    if not f.startswith(("target_tile", "target_overlap", "target_budget", "target_compile"))
)
RECIPE_SINCE = {  # settings added later: what members made before them ran with
    "target_compile": False,
    "encoder_dtype": "fp32",
}
ENCODER_RECIPE = ("init_seed", "allow_random_weights", "encoder_dtype")


def _unchanged(info: dict) -> bool:
    """A member's weight files still have the (size, mtime) they had when it was computed; a member
    with pre-trained weights recorded before inputs were kept is not trusted."""
    inputs = info.get("inputs")
    if inputs is None:
        return info.get("weights") == "random"
    try:  # recorded paths are shareable (`~/...`): this user's home first
        return all(
            (st := os.stat(local_path(p))).st_size == size and st.st_mtime_ns == mtime
            for p, size, mtime in inputs
        )
    except OSError:
        return False
