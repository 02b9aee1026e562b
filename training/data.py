"""Stage 2 data: find a task's stores, then read aligned lq/base/gt crops and the matching g.

Batch `step` is a pure function of (seed, step), so runs repeat exactly, resume mid-way, and give
the same batches with any number of loader workers.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ptgrm.images import flip
from stores import Store, StoreError, dataset_name
from stores.store import MANIFEST, check_schema, read_manifest
from stores.tiles import TileReader

G_IN_MEMORY = 1 << 30  # OSF of all samples is held in memory below this many bytes


def find_store(root: str, data: str, task: str, split: str) -> Path:
    """The one store under `root` for (dataset, task, split) with complete pairs."""
    name = dataset_name(data)
    found, old, damaged = [], [], []
    for manifest in sorted(Path(root).glob(f"*/{MANIFEST}")):
        try:
            m = json.loads(manifest.read_bytes())
        except ValueError:  # garbled: it concerns only its own store, named when it may be this one
            m = None
        if not isinstance(m, dict):
            if manifest.parent.name.startswith(f"{name}-{split}-{task}-"):  # stores.store_name
                damaged.append(manifest.parent)
            continue
        if (m.get("dataset"), m.get("task"), m.get("split")) != (name, task, split):
            continue
        try:
            check_schema(manifest.parent, m)
        except StoreError as e:
            old.append(str(e))
            continue
        if Store(manifest.parent).status("pairs") == "complete":
            found.append(manifest.parent)
    if damaged:
        read_manifest(damaged[0])  # raises, naming the file and the recovery
    if not found and old:
        raise StoreError(old[0])
    if not found:
        raise StoreError(
            f"no complete {split} store for dataset {name!r}, task {task!r} under {root}; "
            f"run `make features TASK={task} DATA={data}` first"
        )
    if len(found) > 1:
        raise StoreError(
            f"several {split} stores for {name!r}/{task} under {root} (other degradation "
            f"settings): {', '.join(p.name for p in found)}; choose one with "
            f"--{split}-store PATH"
        )
    return found[0]


def members_info(m: dict, store: str, target: str, encoders: list) -> dict:
    """Names, keys and specs of the members a split reads, from a manifest's `members`: for
    checkpoints, reports and for rebuilding the same target and encoders at inference."""
    weights = sorted({m[e]["weights"] for e in encoders})
    build = [
        {
            "name": m[e].get("encoder"),
            "spec": m[e].get("spec", {}),
            "clip_weights": m[e].get("config", {}).get("clip_weights"),
            "sd_weights": m[e].get("config", {}).get("sd_weights"),
            "init_seed": m[e].get("config", {}).get("init_seed", 0),
        }
        for e in encoders
    ]
    return {
        "store": store,
        "pairs_key": m["pairs"]["key"],
        "target": target,
        "ground_truth": m["pairs"].get("spec", {}).get("source", {}).get("ground_truth", True),
        "target_key": m[target]["key"],
        "target_spec": m[target].get("spec", {}),
        "target_weights": m[target].get("config", {}).get("target_weights"),
        "target_weights_kind": m[target].get(
            "weights", "none"
        ),  # pretrained, random, none (classical)
        "encoders": encoders,
        "encoder_keys": [m[e]["key"] for e in encoders],
        "encoder_build": build,
        "weights": "random" if "random" in weights else weights[0],
        "osf_dim": sum(m[e]["dim"] for e in encoders),
    }


def member_keys(info: dict) -> dict[str, tuple]:
    """role -> (member, key) of every store member a split reads, from its `info()` (what
    model.json records as `train_store` / `test_store`)."""
    out = {"pairs": ("pairs", info["pairs_key"]), "target": (info["target"], info["target_key"])}
    out.update(
        {f"encoder {i}": m for i, m in enumerate(zip(info["encoders"], info["encoder_keys"]))}
    )
    return out


def check_same_members(run_dir, role: str, recorded: dict | None, current: dict) -> None:
    """Refuse a store whose members differ from those a run recorded, naming both keys (a store
    rebuilt with other data or settings would silently mix data)."""
    if not recorded or "pairs_key" not in recorded:
        return  # an imported run records no store
    old, new = member_keys(recorded), member_keys(current)
    for part in [*old, *(p for p in new if p not in old)]:  # pairs first: the root of the others
        (m0, k0), (m1, k1) = old.get(part, ("none", "-")), new.get(part, ("none", "-"))
        if k0 != k1:
            raise StoreError(
                f"{run_dir}: made with {role}-store member {m0} (its {part}) with key {k0} "
                f"from {recorded.get('store')}; {current.get('store')} has {m1} with key {k1}: "
                f"a rebuilt or other store. Use the store the run was made with, or another RUN"
            )


@runtime_checkable
class SplitLike(Protocol):
    """What evaluation, reports, distillation and the trainer read from a split, whatever holds it:
    `Split` (a Zarr store), `WdsSplit` (its WebDataset export, streamed) and `PredictedG` (a split
    whose g comes from the distilled predictor)."""

    @property
    def path(self) -> PurePath: ...  # the store or export, for messages

    @property
    def hw(self) -> np.ndarray: ...  # (N, 2) valid sizes; (0, 0) for samples excluded at extraction

    @property
    def names(self) -> list[str]: ...

    @property
    def metric_space(self) -> str: ...  # 'rgb', or 'y' for tasks evaluated on luma

    def info(self) -> dict: ...  # names, keys and specs of the members read (`members_info`)

    def image(
        self, i: int
    ) -> dict: ...  # full sample i: lq, gt uint8 (h,w,3); base float32; g (D,)


@dataclass
class Split:
    """One store with the chosen target and encoder members, opened read-only."""

    path: Path
    target: str  # member path, e.g. targets/wiener-580694c1c6e8
    encoders: list  # member paths under osf/

    @classmethod
    def open(cls, path, target: str | None, encoders: list | None) -> "Split":
        store = Store(path)
        tgt = store.pick("targets", target)
        encs = [store.pick("osf", e) for e in (encoders or [None])]
        return cls(Path(path), tgt, encs)

    def __post_init__(self):
        self._arrays, self._pid, self._g = None, None, None

    def arrays(self) -> dict:
        """The arrays, opened once per process (loader workers open their own): image arrays
        through the fast tile reader, and g read into memory when it is small (it usually is:
        8 KB per sample for one CLIP encoder; forked workers share the parent's copy)."""
        if self._pid != os.getpid():
            store = Store(self.path)
            self._arrays = {
                "lq": store.array("pairs", "lq").wrap(TileReader.wrap),
                "gt": store.array("pairs", "gt").wrap(TileReader.wrap),
                "base": store.array(self.target, "base").wrap(TileReader.wrap),
                "g": [store.array(e, "g") for e in self.encoders],
            }
            if self._g is None and sum(g.nbytes for g in self._arrays["g"]) <= G_IN_MEMORY:
                self._g = np.concatenate([g[:] for g in self._arrays["g"]], -1)
                self._g.flags.writeable = False  # Split.g hands out views of it
            self._hw = store.usable_hw([self.target, *self.encoders])
            self._pid = os.getpid()
        return self._arrays

    def __getstate__(self) -> dict:  # a spawned loader worker opens its own arrays
        return {**self.__dict__, "_arrays": None, "_pid": None, "_g": None}

    @property
    def hw(self) -> np.ndarray:
        self.arrays()
        return self._hw

    def info(self) -> dict:
        """Names, keys and specs of what this split reads (see `members_info`)."""
        return members_info(
            Store(self.path).manifest()["members"], self.path.name, self.target, self.encoders
        )

    @property
    def names(self) -> list[str]:
        return [str(n) for n in Store(self.path).array("pairs", "names")[:]]

    @property
    def metric_space(self) -> str:
        """'rgb', or 'y' for tasks evaluated on luma (deraining), as recorded by the pipeline."""
        return Store(self.path).manifest().get("metric_space", "rgb")

    def g(self, i: int, variant: int = 0) -> np.ndarray:
        """OSF of sample i seen in flip `variant` (0 none, 1 horizontal, 2 vertical, 3 both)."""
        arrays = self.arrays()
        if self._g is not None:
            return self._g[i, variant]
        return np.concatenate([g[i, variant] for g in arrays["g"]])

    def image(self, i: int) -> dict:
        """Full valid-size sample i: lq, gt uint8 (h,w,3); base float32 (h,w,3); g (D,)."""
        a = self.arrays()
        h, w = self.hw[i]
        return {
            "lq": a["lq"][i, :h, :w],
            "gt": a["gt"][i, :h, :w],
            "base": a["base"][i, :h, :w].astype(np.float32),
            "g": self.g(i),
        }


class CropBatches(torch.utils.data.Dataset):
    """Item `step`: a batch of aligned random crops with random flips and the flip's own g.

    The global batch of a step is drawn from (seed, step) alone; with `world` > 1 processes,
    rank r reads its contiguous slice of it, so DDP sees exactly the single-process batches.
    """

    def __init__(
        self,
        split: "Split",
        crop: int,
        batch: int,
        seed: int,
        steps: int,
        rank: int = 0,
        world: int = 1,
    ):
        check_crop_batch(crop, batch, world)
        usable = [i for i, (h, w) in enumerate(split.hw) if h > 0]
        self.pool = np.array([i for i in usable if min(split.hw[i]) >= crop])
        small = sorted(set(usable) - set(self.pool.tolist()))
        if small:
            warnings.warn(
                f"{split.path.name}: {len(small)} samples are smaller than the {crop}px crop and are "
                f"not trained on (e.g. sample {small[0]}, {tuple(int(v) for v in split.hw[small[0]])})",
                stacklevel=2,
            )
        if not len(self.pool):
            raise ValueError(
                f"{split.path.name}: no sample is at least {crop}px on both sides; lower --crop"
            )
        self.split, self.crop, self.batch, self.seed, self.steps = split, crop, batch, seed, steps
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.steps

    def draw(self, step: int) -> list[tuple]:
        """(sample, y, x, flip_h, flip_v) for every crop of the global batch of `step`."""
        rng = np.random.default_rng([self.seed, step])
        out = []
        for i in self.pool[rng.integers(0, len(self.pool), self.batch)]:
            y, x, variant = draw_crop(rng, *self.split.hw[i], self.crop)
            out.append((int(i), y, x, variant % 2, variant // 2))
        return out

    def __getitem__(self, step: int) -> dict:
        a, c = self.split.arrays(), self.crop
        per_rank = self.batch // self.world
        return crop_batch(
            [
                (
                    {k: a[k][i, y : y + c, x : x + c] for k in IMAGES},
                    fh + 2 * fv,
                    self.split.g(i, fh + 2 * fv),
                )
                for i, y, x, fh, fv in self.draw(step)[
                    self.rank * per_rank : (self.rank + 1) * per_rank
                ]
            ]
        )


IMAGES = ("lq", "base", "gt")  # the image fields of a batch (g is per sample)


def check_crop_batch(crop: int, batch: int, world: int) -> None:
    """The crop and batch settings both loaders (this one and training/wds_data.py) accept."""
    if crop % 4:
        raise ValueError(f"crop must be a multiple of 4, got {crop}")
    if batch % world:
        raise ValueError(f"batch {batch} must be divisible by the {world} processes")


def draw_crop(rng: np.random.Generator, h: int, w: int, crop: int) -> tuple[int, int, int]:
    """(y, x, flip variant) of a random `crop` px window of an h x w image, drawn from `rng` in
    this order: y, x, then horizontal and vertical flips (variant = fh + 2 fv, ptgrm.images.FLIPS)."""
    y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    fh, fv = rng.integers(0, 2, 2)
    return int(y), int(x), int(fh) + 2 * int(fv)


def crop_batch(crops: list) -> dict:
    """A batch from crops, each ({lq, base, gt: (c, c, 3) window}, flip variant, g of the flipped
    image (D,)): (B, 3, c, c) float32 tensors, the windows flipped, and g (B, D)."""
    out = {k: to_tensor(np.stack([flip(win[k], v) for win, v, _ in crops])) for k in IMAGES}
    return {**out, "g": torch.from_numpy(np.stack([g for *_, g in crops]))}


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """(B,H,W,3) uint8 or float -> (B,3,H,W) float32 in [0,1] for uint8."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
    return t / 255 if x.dtype == np.uint8 else t
