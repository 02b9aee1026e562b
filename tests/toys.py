"""Small, fast stores with the pipeline's layout (pairs, one target, one encoder) for trainer tests."""

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from stores import TEXT, ArraySpec, Store, key_of, make_layout, store_name


def smooth_images(rng, n, h, w):
    """Natural-ish uint8 images: blurred noise with edges."""
    x = gaussian_filter(rng.random((n, h, w, 3)), sigma=(0, 3, 3, 0))
    x = (x - x.min()) / (x.max() - x.min())
    x[:, h // 3 : h // 2] += 0.3
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def make_store(
    root, split, n, hw, dim=32, seed=0, task="deblur", dataset="toy", space="rgb", names=None
):
    """A complete store: gt smooth images, lq = gt + noise, base = a half-way restoration.
    `hw` is every sample's size, or a list of n sizes (samples are then stored in size buckets,
    in storage order: see stores/layout.py; names keep the source index, or are `names[j]`)."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    hws = [tuple(hw)] * n if np.ndim(hw) == 1 else [tuple(x) for x in hw]
    h, w = max(x[0] for x in hws), max(x[1] for x in hws)
    gt = smooth_images(rng, n, h, w)
    lq = np.clip(gt + rng.normal(0, 20, gt.shape), 0, 255).astype(np.uint8)
    base = ((gt.astype(np.float32) + lq) / 2 / 255).astype(np.float16)
    g = rng.normal(size=(n, 4, dim)).astype(np.float32)
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    pairs_key = key_of({"toy": split, "seed": seed, "n": n, "hw": hws})
    names = names or [f"{split}{j:03d}.png" for j in range(n)]
    layout, order = make_layout(hws, 16, shard_len=4)
    path = Path(root) / store_name(dataset, split, task, pairs_key)
    store = Store.open_or_create(
        path,
        {
            "dataset": dataset,
            "split": split,
            "task": task,
            "pairs_key": pairs_key,
            "metric_space": space,
        },
        layout,
    )
    crop = lambda a: [a[j, : hws[j][0], : hws[j][1]] for j in order]  # noqa: E731
    for member, (data, info) in pipeline_members(
        pairs_key,
        crop(lq),
        crop(gt),
        [hws[j] for j in order],
        crop(base),
        g[order],
        [names[j] for j in order],
        ["{}"] * n,
    ).items():
        fill_member(store, member, key_of({"member": member, "pairs": pairs_key}), data, info)
    return path


def same(a, b) -> bool:
    """Equal arrays, or equal lists of per-sample arrays (images of several size buckets), dtype included."""
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, str):
        return a == b
    return a.dtype == b.dtype and np.array_equal(a, b)


def pipeline_members(pairs_key, lq, gt, hw, base, g, names, meta) -> dict:
    """member -> (arrays, info) of the members the pipeline writes; images may be lists of
    arrays of different sizes."""
    return {
        "pairs": (
            {"lq": lq, "gt": gt, "hw": np.asarray(hw, np.int32), "names": names, "meta": meta},
            {},
        ),
        f"targets/toy-{pairs_key[:12]}": ({"base": base}, {"target": "toy", "weights": "none"}),
        f"osf/clip-vit-b32-{pairs_key[:12]}": (
            {"g": g},
            {"encoder": "clip-vit-b32", "weights": "random", "dim": g.shape[-1]},
        ),
    }


def spec_of(name, values) -> ArraySpec:
    """The ArraySpec of a toy array: images (4-d arrays or lists of 3-d ones), text or rows."""
    if isinstance(values, list) and isinstance(values[0], str):
        return ArraySpec(name, TEXT, (max(64, max(len(v.encode()) for v in values)),))
    if isinstance(values, list) or np.ndim(values) == 4:
        return ArraySpec(name, str(values[0].dtype), (values[0].shape[-1],), image=True)
    return ArraySpec(name, str(values.dtype), tuple(values.shape[1:]))


def fill_member(store, member, key, data: dict, info=None, complete=True, n_tasks=None) -> None:
    """Create a member with `data` (all samples, storage order) and write all its tasks."""
    store.begin_member(
        member, key, {"member": member}, [spec_of(k, v) for k, v in data.items()], n_tasks, info
    )
    for t, (a, b) in enumerate(store.ranges(member)):
        store.write_range(member, t, {k: v[a:b] for k, v in data.items()}, {})
    if complete:
        store.finalize(member)


def make_task_stores(root, n_train=12, n_test=3, dim=32, space="rgb"):
    """Train and test stores of the toy dataset under `root`; returns (train path, test path)."""
    return (
        make_store(root, "train", n_train, (48, 48), dim, space=space),
        make_store(root, "test", n_test, (44, 52), dim, space=space),
    )


def add_osf_member(path, encoder: str, dim: int, seed: int = 1, weights: str = "pretrained"):
    """Another complete OSF member (random unit vectors) on a toy store: a second encoder."""
    store = Store(path, mode="a")
    m = store.manifest()
    n, pairs_key = len(store.array("pairs", "hw")), m["pairs_key"]
    rng = np.random.default_rng([seed, n])
    g = rng.normal(size=(n, 4, dim)).astype(np.float32)
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    member = f"osf/{encoder}-{pairs_key[:12]}"
    fill_member(
        store,
        member,
        key_of({"member": member, "pairs": pairs_key}),
        {"g": g},
        {"encoder": encoder, "weights": weights, "dim": dim},
    )
    return member
