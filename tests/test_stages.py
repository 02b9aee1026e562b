"""Extraction stages alone and swapped (pipeline/stages.py), and the WebDataset export as a second
writer of the extraction stream."""

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline import stages
from pipeline.degrade import DEGRADATIONS
from pipeline.sources import Sample, SourceError
from stores import Store

ROOT = Path(__file__).resolve().parents[1]


def toy_stream(n=5, hw=(20, 24), bad=(), paired=False):
    """A read stage on made-up samples: sample i is a constant image of value 10 * i (its lq too
    when `paired`); `bad` fail to read."""

    def sample(i):
        def load():
            if i in bad:
                raise SourceError(f"toy{i}.png: cannot read")
            gt = np.full((*hw, 3), 10 * i, np.uint8)
            return (
                gt,
                gt.copy() if paired else None,
                ["grayscale converted to RGB"] if i == 1 else [],
            )

        return 100 + i, Sample(f"toy{i}.png", load, hw)

    return stages.read(
        [stages.Shard((0, n), 0, 3, last=False), stages.Shard((0, n), 3, n)], sample_at=sample
    )


def test_degrade_stage_alone_seeds_by_source_index_and_excludes_bad_samples():
    out = list(stages.degrade(toy_stream(bad={3}), degradation=DEGRADATIONS["denoise25"], seed=7))
    assert [(s.lo, s.hi) for s in out] == [(0, 3), (3, 5)]
    first, second = out
    assert (
        list(first.data["source_index"]) == [100, 101, 102] and first.data["names"][1] == "toy1.png"
    )
    assert first.stats["notes"] == [
        {"index": 1, "name": "toy1.png", "note": "grayscale converted to RGB"}
    ]
    assert (
        second.stats["excluded"]["pairs"][0]["name"] == "toy3.png" and second.data["lq"][0] is None
    )
    assert list(second.data["hw"][0]) == [0, 0] and list(second.data["hw"][1]) == [20, 24]
    noise = first.data["lq"][2].astype(int) - 20
    assert noise.std() > 5 and json.loads(first.data["meta"][2])  # degraded, with what was drawn
    again = list(stages.degrade(toy_stream(bad={3}), degradation=DEGRADATIONS["denoise25"], seed=7))
    assert np.array_equal(
        again[0].data["lq"][2], first.data["lq"][2]
    )  # (seed, source index) -> same lq


class Halve:
    """A swapped-in target: half the input, a NaN for sample 4."""

    id = "halve"

    def __call__(self, lq, meta):
        return np.full_like(lq, np.nan) if lq[0, 0, 0] == 40 / 255 else lq / 2


def test_a_swapped_target_stage_runs_only_where_its_member_is_missing():
    class M:
        path = "targets/halve"

    shards = list(stages.degrade(toy_stream(paired=True), degradation=None, seed=0))
    shards[0].jobs = [(M, 0)]  # the second shard's base is already stored: not recomputed
    out = list(stages.target(shards, member="targets/halve", net=Halve()))
    base = out[0].outputs["targets/halve"]["base"]
    assert base[0].dtype == np.float16 and np.allclose(
        base[1], out[0].data["lq"][1] / 255 / 2, atol=1e-3
    )
    assert "targets/halve" not in out[1].outputs
    out[1].jobs = [(M, 1)]
    (last,) = stages.target([out[1]], member="targets/halve", net=Halve())
    assert (
        last.stats["excluded"]["targets/halve"][0]["index"] == 4
        and "non-finite" in last.stats["excluded"]["targets/halve"][0]["reason"]
    )
    assert list(stages.usable_hw(last)[1]) == [0, 0]  # excluded by the target: no WebDataset entry


def test_prefetch_keeps_order_and_write_gets_every_shard_from_each_writer():
    seen_a, seen_b = [], []
    shards = (stages.Shard((0, 4), k, k + 1) for k in range(4))
    n = stages.write(
        stages.prefetch(shards), lambda s: seen_a.append(s.lo), lambda s: seen_b.append(s.lo)
    )
    assert n == 4 and seen_a == seen_b == [0, 1, 2, 3]


def test_features_wds_writes_the_export_as_it_extracts_like_export_wds(tmp_path, tiny_clip):
    args = [
        "-m",
        "pipeline",
        "features",
        "--task",
        "deblur",
        "--data",
        "demo",
        "--splits",
        "test",
        "--shard-len",
        "8",
        "--encoder",
        f"openclip:{tiny_clip}",
        "--store-root",
        str(tmp_path / "st"),
        "--wds",
    ]
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (store,) = (tmp_path / "st").glob("demo-test-*[0-9a-f]")
    folder = tmp_path / "st" / f"{store.name}-wds"
    index = json.loads((folder / "index.json").read_text())
    s = Store(store)
    assert index["complete"] and [
        [x["first"], x["first"] + x["samples"]] for x in index["shards"]
    ] == [[a, b] for _, a, b in s.layout.shards()]  # one tar per store shard
    from stores.wds import export_wds

    again = export_wds(
        store,
        out=tmp_path / "re",
        ranges=index["settings"]["ranges"],
        target=index["target"],
        encoders=index["encoders"],
    )
    for shard in index[
        "shards"
    ]:  # the stream's tars are the bytes export-wds writes from the store
        assert filecmp.cmp(folder / shard["name"], again / shard["name"], shallow=False), shard[
            "name"
        ]
