"""Stores shared between people and processes: manifest updates under the lock, racing creators,
no writes through planted symlinks, nothing private in what is pushed or logged."""

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from toys import add_osf_member, fill_member, make_store, same

from common.log import collect
from stores import Store, key_of
from stores.remote import Copier, copy_store

MINE = "osf/mine-000000000000"


def pause_copies(monkeypatch):
    """Each copy_store stops before its first file until `go` is set; `started` counts the copies
    that got there."""
    go, started, copy = threading.Event(), threading.Semaphore(0), Copier.copy

    def paused(self, *args):
        if not getattr(self, "_paused", False):
            self._paused = True
            started.release()
            assert go.wait(60), "test: the copy was never released"
        return copy(self, *args)

    monkeypatch.setattr(Copier, "copy", paused)
    return go, started


def in_thread(fn, *args, **kw):
    out = {}

    def run():
        try:
            out["value"] = fn(*args, **kw)
        except BaseException as e:  # reported by the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def joined(t, out):
    t.join(120)
    assert not t.is_alive(), "copy did not finish"
    if "error" in out:
        raise out["error"]
    return out.get("value")


@pytest.mark.parametrize("finalize_before_copy_lands", [False, True])
def test_shared_copy_landing_during_a_live_writer_keeps_its_member(
    tmp_path, monkeypatch, finalize_before_copy_lands
):
    shared = make_store(tmp_path / "shared", "train", n=8, hw=(24, 28), dim=8)
    extra = add_osf_member(shared, "extra", 8)  # what the teammates have and we do not
    local = make_store(
        tmp_path / "local", "train", n=8, hw=(24, 28), dim=8
    )  # same pairs: same store name
    go, started = pause_copies(monkeypatch)
    copy = in_thread(copy_store, str(shared), str(tmp_path / "local"))
    assert started.acquire(timeout=60)  # the copy read the manifest and is copying files
    writer = Store(local, mode="a")
    g = np.random.default_rng(3).normal(size=(8, 4, 8)).astype(np.float32)
    fill_member(
        writer,
        MINE,
        key_of({"mine": 1}),
        {"g": g},
        {"encoder": "mine"},
        complete=finalize_before_copy_lands,
    )
    go.set()
    joined(*copy)
    writer.finalize(MINE)  # on a manifest rewritten from a stale read: the member is gone
    now = Store(local)
    assert now.status(MINE) == "complete" and now.status(extra) == "complete"
    assert same(now.array(MINE, "g")[:], g)
    assert same(now.array(extra, "g")[:], Store(shared).array(extra, "g")[:])


@pytest.mark.parametrize("other", ["copy", "writer"])
def test_two_creators_of_one_new_store_both_succeed(tmp_path, monkeypatch, other):
    shared = make_store(tmp_path / "shared", "train", n=8, hw=(24, 28), dim=8)
    go, started = pause_copies(monkeypatch)
    first = in_thread(copy_store, str(shared), str(tmp_path / "mine"))
    assert started.acquire(timeout=60)
    if other == "copy":  # a second pull (or `--store-shared` run) of the same store
        second = in_thread(copy_store, str(shared), str(tmp_path / "mine"))
        started.acquire(timeout=2)  # the second one either waits for the first or copies beside it
    else:  # `make features` creating the same store meanwhile
        make_store(tmp_path / "mine", "train", n=8, hw=(24, 28), dim=8)
    go.set()
    joined(*first)
    if other == "copy":
        joined(*second)
    got, want = Store(tmp_path / "mine" / shared.name), Store(shared)
    assert sorted(got.manifest()["members"]) == sorted(want.manifest()["members"])
    for m, info in want.manifest()["members"].items():
        assert got.status(m) == "complete"
        for name in info["arrays"]:
            assert same(got.array(m, name)[:], want.array(m, name)[:]), f"{m}/{name}"
    assert not list((tmp_path / "mine").glob(".partial-*/")), "a partial folder was left behind"


def plant(path: Path, victim: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.symlink_to(victim)


def test_symlinks_planted_where_we_write_never_write_through(tmp_path):
    from training.train import _log, keep_metrics_until

    victim = tmp_path / "home" / ".bashrc"
    victim.parent.mkdir()
    victim.write_text("export PATH=/usr/bin\n")
    path = make_store(tmp_path / "s", "train", n=4, hw=(24, 28), dim=8)
    store = Store(path, mode="a")
    lock = path / "_locks" / "manifest.lock"
    plant(lock, victim)  # a group-shared store: anyone may plant this
    with pytest.raises(RuntimeError, match=f"{lock}: is a symbolic link"):
        fill_member(store, MINE, key_of({"mine": 1}), {"g": np.zeros((4, 4, 8), np.float32)})
    lock.unlink()
    fill_member(
        store, MINE, key_of({"mine": 1}), {"g": np.zeros((4, 4, 8), np.float32)}, complete=False
    )
    records = path / "_records" / f"{MINE.replace('/', '__')}.json"
    plant(records, victim)  # replaced by the new file, never written through
    store.finalize(MINE)
    assert not records.is_symlink() and json.loads(records.read_text())["excluded"] == []
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    plant(metrics, victim)
    with pytest.raises(RuntimeError, match=f"{metrics}: is a symbolic link"):
        _log(metrics, None, {"step": 1, "loss": 0.5})
    keep_metrics_until(metrics, 0)  # a resume rewrites it: the link is replaced, not followed
    assert not metrics.is_symlink() and metrics.read_text() == ""
    assert victim.read_text() == "export PATH=/usr/bin\n"
    fifo = run / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(RuntimeError, match=f"{fifo}: is not a regular file"):
        _log(fifo, None, {"step": 1})


def test_nothing_private_in_pushed_files_or_logs(tmp_path, monkeypatch, tiny_clip, capsys):
    import fsspec
    from PIL import Image

    from pipeline.extract import FeaturesConfig, build_features

    home = tmp_path / "home" / "alice"
    monkeypatch.setenv("HOME", str(home))
    data = home / "data"
    rng = np.random.default_rng(0)
    for k in range(5):
        for kind in ("gt", "lq"):
            (data / "test" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
                data / "test" / kind / f"{k}.png"
            )
    raw = (data / "test" / "lq" / "4.png").read_bytes()  # excluded, with a reason naming the file
    (data / "test" / "lq" / "4.png").write_bytes(raw[: len(raw) // 2])
    secret = "s3cretTOKEN9f2"
    shared = f"memory://alice:{secret}@team/shared"
    lines = []

    def features(root, **kw):
        cfg = FeaturesConfig(
            task="deblur",
            data=str(data),
            target="identity",
            encoder=f"openclip:{tiny_clip}",
            store_root=str(root),
            shard_len=4,
            splits=("test",),
            max_bad=0.5,
            **kw,
        )
        with collect() as said:
            path = build_features(cfg)[0]
        lines.extend(said)
        return path

    first = features(home / "stores")
    assert Store(first).manifest()["members"]["pairs"]["n_excluded"] == 1
    with collect() as said:
        copy_store(str(first), shared)  # a push
    second = features(home / "stores2", store_shared=shared)  # found complete in the shared root
    with collect() as said_too:
        copy_store(str(second), str(tmp_path / "pushed"))
    lines.extend(said + said_too)
    fs = fsspec.filesystem("memory")
    texts = [
        p.read_bytes().decode(errors="replace")
        for p in (tmp_path / "pushed").rglob("*")
        if p.is_file()
    ]
    texts += [fs.cat_file(p).decode(errors="replace") for p in fs.find("/")]
    out = capsys.readouterr()
    logs = "\n".join(map(str, lines)) + out.out + out.err
    assert "found complete in" in logs
    assert len(texts) > 20 and any(
        "4.png" in t for t in texts
    )  # the exclusion is recorded, by name
    for (
        t
    ) in texts:  # what teammates get: no home path (the user's own terminal may show it), no secret
        assert str(home) not in t, t[:2000]
    for t in texts + [logs]:
        assert secret not in t, t[:2000]
