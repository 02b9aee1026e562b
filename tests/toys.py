"""Small, fast stores with the pipeline's layout (pairs, one target, one encoder) for trainer tests."""
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from stores import ArraySpec, Store, key_of, make_plan, store_name


def smooth_images(rng, n, h, w):
    """Natural-ish uint8 images: blurred noise with edges."""
    x = gaussian_filter(rng.random((n, h, w, 3)), sigma=(0, 3, 3, 0))
    x = (x - x.min()) / (x.max() - x.min())
    x[:, h // 3:h // 2] += 0.3
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def make_store(root, split, n, hw, dim=32, seed=0, task="deblur", dataset="toy", space="rgb"):
    """A complete store: gt smooth images, lq = gt + noise, base = a half-way restoration."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    h, w = hw
    gt = smooth_images(rng, n, h, w)
    lq = np.clip(gt + rng.normal(0, 20, gt.shape), 0, 255).astype(np.uint8)
    base = ((gt.astype(np.float32) + lq) / 2 / 255).astype(np.float16)
    g = rng.normal(size=(n, 4, dim)).astype(np.float32)
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    pairs_key = key_of({"toy": split, "seed": seed, "n": n, "hw": hw})
    path = Path(root) / store_name(dataset, split, task, pairs_key)
    store = Store.open_or_create(path, {"dataset": dataset, "split": split, "task": task,
                                        "pairs_key": pairs_key, "n": n, "max_hw": [h, w],
                                        "metric_space": space})
    plan = make_plan(n, 4)
    members = {
        "pairs": ([ArraySpec("lq", (n, h, w, 3), "uint8", 16), ArraySpec("gt", (n, h, w, 3), "uint8", 16),
                   ArraySpec("hw", (n, 2), "int32"), ArraySpec("names", (n,), "str"),
                   ArraySpec("meta", (n,), "str")],
                  {"lq": lq, "gt": gt, "hw": np.tile([h, w], (n, 1)).astype(np.int32),
                   "names": np.array([f"{split}{i:03d}.png" for i in range(n)]), "meta": np.array(["{}"] * n)},
                  {}),
        f"targets/toy-{pairs_key[:12]}": ([ArraySpec("base", (n, h, w, 3), "float16", 16)], {"base": base},
                                          {"target": "toy", "weights": "none"}),
        f"osf/clip-vit-b32-{pairs_key[:12]}": ([ArraySpec("g", (n, 4, dim), "float32")], {"g": g},
                                               {"encoder": "clip-vit-b32", "weights": "random", "dim": dim}),
    }
    for member, (arrays, data, info) in members.items():
        key = key_of({"member": member, "pairs": pairs_key})
        store.begin_member(member, key, {"member": member}, arrays, 4, plan, info)
        for t, (a, b) in enumerate(plan):
            store.write_task(member, t, {k: v[a:b] for k, v in data.items()}, {})
        store.finalize(member)
    return path


def make_task_stores(root, n_train=12, n_test=3, dim=32, space="rgb"):
    """Train and test stores of the toy dataset under `root`; returns (train path, test path)."""
    return (make_store(root, "train", n_train, (48, 48), dim, space=space),
            make_store(root, "test", n_test, (44, 52), dim, space=space))


def add_osf_member(path, encoder: str, dim: int, seed: int = 1, weights: str = "pretrained"):
    """Another complete OSF member (random unit vectors) on a toy store: a second encoder."""
    store = Store(path, mode="a")
    m = store.manifest()
    n, pairs_key = m["n"], m["pairs_key"]
    rng = np.random.default_rng([seed, n])
    g = rng.normal(size=(n, 4, dim)).astype(np.float32)
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    member = f"osf/{encoder}-{pairs_key[:12]}"
    plan = make_plan(n, 4)
    store.begin_member(member, key_of({"member": member, "pairs": pairs_key}), {"member": member},
                       [ArraySpec("g", (n, 4, dim), "float32")], 4, plan,
                       {"encoder": encoder, "weights": weights, "dim": dim})
    for t, (a, b) in enumerate(plan):
        store.write_task(member, t, {"g": g[a:b]}, {})
    store.finalize(member)
    return member
