"""Damage fuzzing (tests/damage.py): 200 random damages to a complete store and to a WebDataset
export; training, evaluation, verify and pull either read exactly the original data or fail naming
the damaged file. Never a silent wrong read."""

import pytest
from damage import STORE_OPS, WDS_OPS, fuzz
from test_wds import build_store

from stores.wds import export_wds

ROUNDS = 200


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("fuzz"))


def check(result):
    bad = result["bad"]
    silent = [b for b in bad if b["outcome"] == "silent"]
    unnamed = [b for b in bad if b["outcome"] == "unnamed"]
    assert not silent, f"{len(silent)} silent wrong reads, e.g. {silent[:3]}"
    assert not unnamed, f"{len(unnamed)} errors not naming the damaged file, e.g. {unnamed[:3]}"


def test_damaged_store_never_reads_wrong(store):
    result = fuzz(store, STORE_OPS, ROUNDS, seed=1)
    for op, counts in result["counts"].items():
        assert sum(counts.values()) == ROUNDS
    assert (
        result["counts"]["eval"].get("loud", 0) > ROUNDS // 4
    )  # the damage does reach the readers
    check(result)


def test_damaged_export_never_reads_wrong(store, tmp_path):
    folder = export_wds(store, tmp_path / "export", min_shards=4)
    result = fuzz(folder, WDS_OPS, ROUNDS, seed=2)
    assert result["counts"]["eval"].get("loud", 0) > ROUNDS // 4
    check(result)
