"""Damage from outside (a partial rsync or S3 sync, a repair under a running reader, leftovers of
killed writers, a garbled manifest) is either harmless or named: never silently read as zeros."""

import json
import os
import shutil
import time

import numpy as np
import pytest
from toys import fill_member, make_store, make_task_stores, same

from stores import Store, StoreError
from stores.maintain import gc, repair
from stores.remote import RemoteError, copy_store
from training.data import Split, find_store


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "root", "train", 10, (48, 48))


def target_of(path) -> str:
    return Store(path).members("targets")[0]


def test_a_missing_lq_shard_is_named_with_repair_not_read_as_zeros(store):
    (store / "pairs/h48w48/lq/c/1/0/0/0").unlink()  # samples 4-7: a partial sync lost it
    split = Split.open(store, None, None)
    assert Store(store).status("pairs") == "complete"  # nothing on disk says otherwise
    for read in (
        lambda: split.image(5),
        lambda: Store(store).array("pairs", "lq")[5],
        lambda: Store(store).array("pairs", "lq")[0:10],
    ):
        with pytest.raises(
            StoreError, match=r"pairs.*lq/c/1/0/0/0.*missing.*python -m stores repair"
        ):
            read()
    assert split.image(1)["lq"].shape == (48, 48, 3)  # shards that are there still read


def test_a_missing_hw_chunk_is_named_not_read_as_excluded_samples(store):
    (store / "pairs/h48w48/hw/c/2/0").unlink()
    with pytest.raises(StoreError, match=r"pairs.*hw/c/2/0.*missing.*stores repair"):
        Store(store).usable_hw([target_of(store)])
    with pytest.raises(StoreError, match=r"hw/c/2/0"):
        Split.open(store, None, None).hw


def test_a_missing_records_file_is_named_and_repair_rewrites_it(store):
    target = target_of(store)
    records = store / "_records" / (target.replace("/", "__") + ".json")
    before = json.loads(records.read_text())
    records.unlink()
    with pytest.raises(StoreError, match=rf"{records.name}.*missing.*python -m stores repair"):
        Store(store).usable_hw([target])
    repair(store, recompute=False)
    assert json.loads(records.read_text()) == before
    assert Store(store).status(target) == "complete"


def test_a_shard_of_zeros_that_zarr_never_wrote_still_reads(tmp_path):
    """zarr writes no chunk equal to the fill value: such a shard is absent and vouched for."""
    from stores import make_layout

    s = Store.open_or_create(
        tmp_path / "s",
        {"dataset": "t", "split": "train", "task": "deblur", "pairs_key": "0" * 64},
        make_layout([(16, 16)] * 8, 8, 4)[0],
    )
    base = np.zeros((8, 16, 16, 3), np.float16)
    base[:4] = 1
    fill_member(s, "pairs", "k" * 64, {"base": base, "hw": np.zeros((8, 2), np.int32)})
    assert not (tmp_path / "s/pairs/h16w16/base/c/1/0/0/0").exists()
    r = Store(tmp_path / "s")
    assert np.array_equal(np.stack(r.array("pairs", "base")[0:8]), base)
    assert np.array_equal(r.array("pairs", "hw")[:], np.zeros((8, 2), np.int32))


@pytest.mark.parametrize(
    "lost",
    [
        "pairs/h48w48/gt/c/0/0/0/0",
        "pairs/h48w48/names/c/1/0",
        "_records/pairs.json",
        "_done/pairs/00001.json",
    ],
)
def test_copy_refuses_a_source_store_with_missing_files(store, tmp_path, lost):
    (store / lost).unlink()
    dst = tmp_path / "shared"
    with pytest.raises(RemoteError, match=lost.replace("/", ".")):
        copy_store(str(store), str(dst))
    assert not (dst / store.name / "manifest.json").exists()  # no store published


def test_copy_checks_every_listed_file_arrived(store, tmp_path, monkeypatch):
    from stores import remote

    real = remote.Copier.copy

    def lossy(self, rel, size):  # a copy that loses one file on the way
        if rel != "pairs/h48w48/lq/c/2/0/0/0":
            real(self, rel, size)

    monkeypatch.setattr(remote.Copier, "copy", lossy)
    with pytest.raises(RemoteError, match=r"lq/c/2/0/0/0"):
        copy_store(str(store), str(tmp_path / "local"))
    assert not (tmp_path / "local" / store.name / "manifest.json").exists()


def test_tile_reader_rereads_a_shard_rewritten_under_it(store):
    """A repair (or a recompute with other bytes) replaces a shard file while a trainer reads."""
    split = Split.open(store, None, None)
    old = split.image(5)["base"]
    arr = Store(store, mode="a")._bucket_array(split.target, 0, "base")
    new = (np.arange(4 * 48 * 48 * 3).reshape(4, 48, 48, 3) % 97 / 97).astype(np.float16)
    arr[4:8] = new
    got = split.image(5)["base"]
    assert not np.array_equal(got, old) and np.array_equal(got, new[1].astype(np.float32))


def test_gc_removes_zarr_partial_leftovers_and_copies_skip_them(store, tmp_path):
    left = (
        store / "pairs/h48w48/lq/c/1/0/0/0.3f2a9c.partial"
    )  # what zarr leaves when killed mid-write
    left.write_bytes(b"half a shard")
    copy_store(str(store), str(tmp_path / "shared"))
    assert not (tmp_path / "shared" / store.name / left.relative_to(store)).exists()
    gc(store)
    assert left.exists()  # young: may belong to a live writer
    old = time.time() - 3600
    os.utime(left, (old, old))
    gc(store)
    assert not left.exists()


def test_a_garbled_manifest_affects_only_its_own_store(tmp_path, capsys):
    from stores.__main__ import main

    train, test = make_task_stores(tmp_path / "root")
    (test / "manifest.json").write_text('{"schema": 2, "memb')
    assert find_store(str(tmp_path / "root"), str(tmp_path / "toy"), "deblur", "train") == train
    with pytest.raises(StoreError, match=rf"{test.name}/manifest.json: damaged"):
        find_store(str(tmp_path / "root"), str(tmp_path / "toy"), "deblur", "test")
    assert main(["ls", str(tmp_path / "root"), "--json"]) == 0
    rows = {r["store"]: r for r in json.loads(capsys.readouterr().out)}
    assert (
        rows[train.name]["members"]["pairs"] == "complete"
        and "manifest.json: damaged" in rows[test.name]["error"]
    )


def test_reads_of_an_intact_store_are_unchanged(store):
    split = Split.open(store, None, None)
    s = Store(store)
    assert same(split.image(6)["lq"], s.array("pairs", "lq")[6][:48, :48])
    assert (split.hw == 48).all()


@pytest.mark.parametrize("planted", ["_staging", "_staging/0-4", "_records", "_done", "_locks"])
def test_a_symlinked_folder_inside_a_store_is_never_written_or_removed_through(tmp_path, planted):
    """O_NOFOLLOW guards only a path's last part: a link planted as a folder of a group-shared
    store (`_staging/<range>`, `_records`, `_done`, `_locks`) must not send a writer's files, or
    its clean-up, into the victim's folder."""
    from types import SimpleNamespace

    from pipeline import stages
    from stores import Leases
    from stores.files import UnsafeFileError

    path = make_store(tmp_path, "train", 8, (16, 16))
    store = Store(path, mode="a")
    member = store.pick("targets", None)
    store.done_path(member, 0).unlink()
    store._update_member(member, status="incomplete")
    victim = tmp_path / "victim"
    (victim / member / "keep").mkdir(parents=True)
    (victim / "pairs.json").write_text("mine")
    before = sorted(str(p.relative_to(victim)) for p in victim.rglob("*"))
    link = path / planted
    if link.exists():
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim, target_is_directory=True)
    r = tuple(store.ranges(member)[0])
    shard = stages.Shard(
        r,
        0,
        4,
        True,
        [(SimpleNamespace(path=member), 0)],
        outputs={member: {"base": [np.zeros((16, 16, 3), np.float16)] * 4}},
        stats={"excluded": {}, "notes": [], "samples": 4},
    )
    with pytest.raises(UnsafeFileError, match=str(link)):
        leases = Leases(path, ttl=30)
        assert leases.claim(r)
        stages.StoreWriter(Store(path, mode="a"), leases)(shard)
        Store(path, mode="a").finalize(member)
        Store(path, mode="a").rewrite_records("pairs")
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*")) == before
    assert (victim / "pairs.json").read_text() == "mine"


def test_pull_refuses_a_source_manifest_naming_a_member_outside_the_store_layout(tmp_path):
    """A pulled manifest decides which folders are copied and what the destination's manifest
    lists: a member named `_leases` (or `../x`) is refused before anything is copied, and the
    destination's own store stays readable."""
    src = make_store(tmp_path / "src", "train", 4, (16, 16))
    copy_store(str(src), str(tmp_path / "dst"))
    m = json.loads((src / "manifest.json").read_text())
    m["members"]["_leases"] = dict(m["members"]["pairs"])
    (src / "manifest.json").write_text(json.dumps(m))
    for rel, obj in {
        "_leases/0-4/00000099.json": {"ttl": 1e12},
        "_done/_leases/00000.json": {"task": 0},
        "_records/_leases.json": {"excluded": [], "notes": []},
    }.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(json.dumps(obj))
    with pytest.raises(StoreError, match="_leases"):
        copy_store(str(src), str(tmp_path / "dst"))
    assert Store(tmp_path / "dst" / src.name).status("pairs") == "complete"
    assert not (tmp_path / "dst" / src.name / "_leases" / "0-4" / "00000099.json").exists()
