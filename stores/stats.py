"""Store-wide numbers computed in parallel over shards with dask: `python -m stores info STORE --stats`.

Per sample: input PSNR (pairs), base PSNR (targets), g norms (osf); per array: stored bytes.
"""

from __future__ import annotations

import numpy as np

from common.metrics import psnr, to_uint8

from .store import TEXT, Store, dir_bytes


def shard_stats(store: Store, member: str, lo: int, hi: int) -> dict:
    """Per-sample statistics of samples [lo, hi) of one member (one dask task)."""
    if member.startswith("osf/"):
        norms = np.linalg.norm(
            store.array(member, "g")[lo:hi].astype(np.float64), axis=-1
        )  # (n, 4)
        return {
            "g_norm_mean": norms.mean(1).tolist(),
            "g_norm_min": norms.min(1).tolist(),
            "g_norm_max": norms.max(1).tolist(),
        }
    gt, hw = store.array("pairs", "gt")[lo:hi], store.array("pairs", "hw")[lo:hi]
    if member == "pairs":
        x, field, conv = store.array("pairs", "lq")[lo:hi], "psnr_input", np.asarray
    else:
        x, field, conv = store.array(member, "base")[lo:hi], "psnr_base", to_uint8
    return {field: [psnr(conv(x[j][:h, :w]), gt[j][:h, :w]) for j, (h, w) in enumerate(hw)]}


def summarise(values: list) -> dict:
    """mean/min/max of the finite values (PSNR is infinite for identical images), and how many are not."""
    finite = [v for v in values if np.isfinite(v)]
    return {
        "mean": float(np.mean(finite)) if finite else None,
        "min": min(finite, default=None),
        "max": max(finite, default=None),
        "infinite": len(values) - len(finite),
    }


def member_stats(store: Store, member: str, info: dict, jobs: int) -> dict:
    """Per-sample statistics of a complete member computed over its shards in parallel with dask,
    plus stored bytes per array and per sample."""
    import dask

    n, buckets = store.layout.n, store.layout.buckets
    arrays = {}
    for name, a in info["arrays"].items():
        stored = sum(dir_bytes(store.path / member / b.name / name) for b in buckets)
        itemsize = 1 if a["dtype"] == TEXT else np.dtype(a["dtype"]).itemsize
        per_row = [b.hw[0] * b.hw[1] if a["image"] else 1 for b in buckets]
        raw = (
            sum(b.count * r for b, r in zip(buckets, per_row))
            * int(np.prod(a["row"], dtype=np.int64))
            * itemsize
        )
        arrays[name] = {
            "bytes": stored,
            "bytes_per_sample": stored / max(n, 1),
            "raw_bytes": int(raw),
        }
    out = {
        "arrays": arrays,
        "bytes_per_sample": sum(a["bytes_per_sample"] for a in arrays.values()),
    }
    pairs = store.member_info("pairs") or {}
    if not member.startswith("osf/") and (
        pairs.get("status") != "complete" or not {"lq", "gt", "hw"} <= set(pairs.get("arrays", {}))
    ):
        return out  # PSNR needs complete pairs with lq, gt and hw
    parts = dask.compute(
        *[dask.delayed(shard_stats)(store, member, lo, hi) for _, lo, hi in store.layout.shards()],
        scheduler="threads",
        num_workers=jobs,
    )
    for field in parts[0]:
        values = [v for p in parts for v in p[field]]
        out[field] = {
            "per_sample": [v if np.isfinite(v) else None for v in values],
            **summarise(values),
        }
    return out
