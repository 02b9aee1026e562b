"""The store contract: round trip, keys, completion, damage detection, CLI output."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from toys import fill_member

from stores import Store, StoreError, key_of, make_layout

ROOT = Path(__file__).resolve().parents[1]
ATTRS = {"dataset": "toy", "split": "train", "task": "deblur", "pairs_key": "0" * 64}


def toy_store(path, n=10, shard_len=4, complete=True):
    store = Store.open_or_create(path, ATTRS, make_layout([(20, 30)] * n, 8, shard_len)[0])
    rng = np.random.default_rng(0)
    lq = rng.integers(0, 256, (n, 20, 30, 3), dtype=np.uint8)
    names = [f"img{i:03d}.png" for i in range(n)]
    fill_member(
        store,
        "pairs",
        "k" * 64,
        {"lq": lq, "hw": np.full((n, 2), (20, 30), np.int32), "names": names},
        complete=complete,
    )
    return store, lq, names


def test_round_trip_reads_back_exactly(tmp_path):
    store, lq, names = toy_store(tmp_path / "s")
    reopened = Store(tmp_path / "s")  # read-only
    assert np.array_equal(np.stack(reopened.array("pairs", "lq")[:])[:, :20, :30], lq)
    assert list(reopened.array("pairs", "names")[:]) == list(names)
    assert reopened.array("pairs", "lq")[3, 5:13, 7:20].shape == (8, 13, 3)
    info = reopened.member_info("pairs")
    assert info["status"] == "complete" and info["bytes"] > 0


def test_plan_owns_whole_shards_and_covers_every_sample():
    mixed = [(20, 30), (300, 200), (20, 30), (200, 300), (64, 64)] * 9 + [(4000, 3000)]
    for hws, shard_len, tasks in [
        ([(8, 8)] * 10, 4, None),
        ([(8, 8)] * 89, 16, 4),
        ([(8, 8)] * 3, 16, 8),
        ([(8, 8)] * 64, 16, 3),
        (mixed, 4, None),
        (mixed, 4, 5),
    ]:
        layout, order = make_layout(hws, 64, shard_len, shard_bytes=2e6)
        plan = layout.ranges(tasks)
        assert (
            plan[0][0] == 0 and plan[-1][1] == len(hws) and sorted(order) == list(range(len(hws)))
        )
        starts = {a for _, a, _ in layout.shards()} | {len(hws)}
        assert all(a in starts and b in starts for a, b in plan)  # whole shards only
        assert all(b == c for (_, b), (c, _) in zip(plan, plan[1:]))
        assert len(plan) == (tasks or len(layout.shards())) or tasks > len(layout.shards())


def test_key_changes_with_any_setting_and_is_order_free():
    spec = {"target": "wiener", "lam": 0.02, "pairs": "abc"}
    assert key_of(spec) == key_of(dict(reversed(list(spec.items()))))
    assert key_of(spec) != key_of({**spec, "lam": 0.021})
    assert key_of(spec) != key_of({**spec, "pairs": "abd"})


def test_member_with_other_key_is_refused(tmp_path):
    store, _, _ = toy_store(tmp_path / "s")
    with pytest.raises(StoreError, match="other settings"):
        store.array("pairs", "lq", key="x" * 64)
    with pytest.raises(StoreError, match="pairs key"):
        Store.open_or_create(tmp_path / "s", {**ATTRS, "pairs_key": "1" * 64})


def test_incomplete_member_is_refused_by_readers(tmp_path):
    store, _, _ = toy_store(tmp_path / "s", complete=False)
    assert store.status("pairs") == "incomplete"
    with pytest.raises(StoreError, match="incomplete"):
        Store(tmp_path / "s").array("pairs", "lq")


def test_finalize_refuses_missing_tasks(tmp_path):
    store, _, _ = toy_store(tmp_path / "s", complete=False)
    (tmp_path / "s" / "_done" / "pairs" / "00001.json").unlink()
    with pytest.raises(StoreError, match=r"missing ranges \[1\]"):
        store.finalize("pairs")


def test_damaged_shard_is_named_by_verify(tmp_path):
    toy_store(tmp_path / "s")
    shard = next(
        p
        for p in (tmp_path / "s" / "pairs" / "h24w32" / "lq").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = subprocess.run(
        [sys.executable, "-m", "stores", "verify", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 1
    assert "pairs/lq shard" in out.stderr and "samples" in out.stderr


def test_cli_ls_and_info_json(tmp_path):
    toy_store(tmp_path / "root" / "toy-train-deblur-000000000000")
    ls = subprocess.run(
        [sys.executable, "-m", "stores", "ls", str(tmp_path / "root"), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    rows = json.loads(ls.stdout)
    assert rows[0]["store"] == "toy-train-deblur-000000000000"
    assert rows[0]["members"] == {"pairs": "complete"}
    info = subprocess.run(
        [sys.executable, "-m", "stores", "info", rows[0]["path"], "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    member = json.loads(info.stdout)["members"]["pairs"]
    assert member["key"] == "k" * 64 and member["status"] == "complete" and member["bytes"] > 0


def test_info_of_a_store_made_before_provenance_says_unknown(tmp_path):
    toy_store(tmp_path / "root" / "toy-train-deblur-000000000000")  # members without `provenance`
    info = subprocess.run(
        [
            sys.executable,
            "-m",
            "stores",
            "info",
            str(tmp_path / "root" / "toy-train-deblur-000000000000"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert "made by: unknown" in info.stdout
    ls = subprocess.run(
        [sys.executable, "-m", "stores", "ls", str(tmp_path / "root"), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert json.loads(ls.stdout)[0]["details"]["pairs"]["provenance"] is None


def test_provenance_names_every_device_that_computed_a_member_and_leaves_its_key(tmp_path):
    """A SLURM planner begins a member on a CPU node; array tasks on GPU nodes compute it."""
    from toys import spec_of

    from stores.provenance import provenance

    store = Store.open_or_create(tmp_path / "s", ATTRS, make_layout([(20, 30)] * 8, 8, 4)[0])
    planned = provenance("cpu")
    lq = np.zeros((8, 20, 30, 3), np.uint8)
    store.begin_member(
        "pairs", "k" * 64, {"member": "pairs"}, [spec_of("lq", lq)], None, {"provenance": planned}
    )
    for t, (a, b) in enumerate(store.ranges("pairs")):
        hashes = {
            lo: store.write_shard("pairs", lo, hi, {"lq": list(lq[lo:hi])})
            for _, lo, hi in store.shards_of(a, b)
        }
        store.mark_done(
            "pairs", t, hashes, {}, made_by={"device": f"GPU {'AB'[t % 2]}", "arch": "aarch64"}
        )
    info = store.finalize("pairs")
    assert info["key"] == "k" * 64 and Store(tmp_path / "s").status("pairs", "k" * 64) == "complete"
    assert info["provenance"] == {**planned, "device": "GPU A, GPU B", "arch": "aarch64"}
    shown = subprocess.run(
        [sys.executable, "-m", "stores", "info", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    assert "device GPU A, GPU B (aarch64)" in shown


def test_catalog_names_damage_in_words_and_never_shows_a_lost_shard_as_an_image(tmp_path):
    from toys import make_store

    intact = make_store(tmp_path / "root", "train", n=6, hw=(24, 28), dim=8)
    lost = make_store(tmp_path / "root", "test", n=6, hw=(24, 28), dim=8)
    garbled = tmp_path / "root" / "toy-val-deblur-000000000000"
    garbled.mkdir()
    (garbled / "manifest.json").write_text('{"schema": 2, "memb')
    for f in (lost / "pairs").glob("*/lq/c/0/*/*/*"):
        f.unlink()  # the first shard of lq, lost by a partial copy
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stores",
            "catalog",
            str(tmp_path / "root"),
            "--html",
            str(tmp_path / "c.html"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert "wrote" in out.stdout
    page = (tmp_path / "c.html").read_text()
    sections = dict(re.findall(r"<h2>([^<]+)</h2>(.*?)</section>", page, re.S))
    assert sections[intact.name].count("<img ") == 2
    assert "<img " not in sections[lost.name] and "thumbnails unavailable" in sections[lost.name]
    assert "pairs/" in sections[lost.name] and "repair" in sections[lost.name]
    assert (
        "DAMAGED" in sections[garbled.name] and "manifest.json: damaged" in sections[garbled.name]
    )


def test_store_holds_no_pickle(tmp_path):
    toy_store(tmp_path / "s")
    for p in (tmp_path / "s").rglob("*"):
        if p.is_file():
            head = p.read_bytes()[:2]
            assert head != b"\x80\x04" and head != b"\x80\x05", f"{p} looks like a pickle"
        if p.name.endswith(".json"):
            json.loads(p.read_text())  # every metadata file is plain JSON
    codecs = json.dumps(
        json.loads((tmp_path / "s" / "pairs" / "h24w32" / "lq" / "zarr.json").read_text())
    )
    assert "crc32c" in codecs and "sharding_indexed" in codecs and "pickle" not in codecs


def test_gc_removes_leftovers_of_killed_runs_and_nothing_else(tmp_path):
    import os
    import time

    from stores.maintain import gc

    toy_store(tmp_path / "s")
    s = tmp_path / "s"
    old = time.time() - 3600
    leases = s / "_leases" / "0-4"
    leases.mkdir(parents=True)
    superseded, newest = leases / "00000000.json", leases / "00000001.json"
    superseded.write_text('{"owner": "dead:1", "gen": 0}')
    newest.write_text('{"owner": "alive:2", "gen": 1}')
    (s / "_locks").mkdir(exist_ok=True)
    lock = s / "_locks" / "manifest.lock"
    lock.write_text("")
    tmp_old, tmp_new = s / "pairs" / ".zarr.json.tmp-1-abc", s / ".manifest.json.tmp-2-def"
    tmp_old.write_text("x")
    tmp_new.write_text("y")
    for p in (superseded, newest, lock, tmp_old):
        os.utime(p, (old, old))
    before = {p for p in s.rglob("*") if p.is_file()}
    removed = set(gc(s))
    assert removed == {
        superseded,
        tmp_old,
    }  # the newest generation fences late writers; the lock is an OS lock
    assert {p for p in s.rglob("*") if p.is_file()} == before - removed
    Store(s).array("pairs", "lq")  # the store itself is untouched and still complete


def test_store_of_an_older_schema_is_refused_with_how_to_rebuild(tmp_path):
    from training.data import find_store

    toy_store(tmp_path / "root" / "toy-train-deblur-000000000000")
    manifest = tmp_path / "root" / "toy-train-deblur-000000000000" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "schema": 1}))
    for attempt in (
        lambda: Store(manifest.parent),
        lambda: find_store(tmp_path / "root", "toy", "deblur", "train"),
    ):
        with pytest.raises(StoreError, match=r"schema 1.*reads schema 2.*make features"):
            attempt()


def test_text_is_stored_as_core_uint8_and_read_back(tmp_path):
    store, _, names = toy_store(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "pairs" / "h24w32" / "names" / "zarr.json").read_text())
    assert meta["data_type"] == "uint8" and meta["attributes"]["encoding"].startswith("utf-8")
    for p in (tmp_path / "s").rglob("zarr.json"):  # every array uses a Zarr v3 core data type
        dtype = json.loads(p.read_text()).get("data_type")
        assert dtype is None or dtype in {
            "bool",
            "int8",
            "int16",
            "int32",
            "int64",
            "uint8",
            "uint16",
            "uint32",
            "uint64",
            "float16",
            "float32",
            "float64",
        }, (p, dtype)
    assert Store(tmp_path / "s").array("pairs", "names")[:] == names
    assert Store(tmp_path / "s").array("pairs", "names")[3] == names[3]


def test_manifest_does_not_grow_with_the_samples(tmp_path):
    sizes = []
    for n in (8, 64):
        store, _, _ = toy_store(tmp_path / f"s{n}", n=n)
        sizes.append((tmp_path / f"s{n}" / "manifest.json").stat().st_size)
    assert abs(sizes[1] - sizes[0]) < 64, (
        sizes
    )  # a bucket table and task counts, no per-task or per-sample list


def test_repair_never_runs_a_user_target_the_user_did_not_name(tmp_path):
    from stores.maintain import features_command

    config = {
        "task": "deblur",
        "data": "~/data/GoPro",
        "target": "evil_module:build",
        "shard_len": 16,
        "tile": 64,
        "seed": 0,
    }
    with pytest.raises(StoreError, match=r"evil_module:build.*--target evil_module:build"):
        features_command(config, tmp_path, "train")
    with pytest.raises(StoreError, match="you named 'other:build'"):
        features_command(config, tmp_path, "train", allow_target="other:build")
    argv = features_command(config, tmp_path, "train", allow_target="evil_module:build")
    assert "--target=evil_module:build" in argv
    assert f"--data={Path.home() / 'data' / 'GoPro'}" in argv  # recorded portable, used locally
    path = tmp_path / "s"
    toy_store(path)
    m = json.loads((path / "manifest.json").read_text())
    m["members"]["pairs"]["config"] = config  # as if a user target's store, pulled from someone
    (path / "manifest.json").write_text(json.dumps(m))
    shard = next(p for p in (path / "pairs").rglob("*") if p.is_file() and p.name != "zarr.json")
    shard.write_bytes(shard.read_bytes()[::-1])
    out = subprocess.run(
        [sys.executable, "-m", "stores", "repair", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2 and "--target evil_module:build" in out.stderr, out.stderr
    assert len(list((path / "_done" / "pairs").glob("*.json"))) == len(
        Store(path).ranges("pairs")
    )  # nothing withdrawn


def test_repair_never_imports_a_user_encoder_the_user_did_not_name(tmp_path):
    """A pulled store whose recorded encoder is `evilmod:factory` (importing it writes a marker)."""
    code = tmp_path / "code"
    code.mkdir()
    marker = tmp_path / "imported"
    (code / "evilmod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef factory():\n    raise SystemExit\n"
    )
    path = tmp_path / "s"
    toy_store(path)
    m = json.loads((path / "manifest.json").read_text())
    m["members"]["pairs"]["config"] = {
        "task": "deblur",
        "data": "demo",
        "target": "identity",
        "shard_len": 4,
        "encoder": "evilmod:factory,openclip:ViT-B-32",
        "splits": ["test"],
        "tile": 64,
        "seed": 0,
    }
    (path / "manifest.json").write_text(json.dumps(m))
    shard = next(p for p in (path / "pairs").rglob("*") if p.is_file() and p.name != "zarr.json")
    shard.write_bytes(shard.read_bytes()[::-1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(code)])}
    out = subprocess.run(
        [sys.executable, "-m", "stores", "repair", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert out.returncode == 2 and "--encoder evilmod:factory" in out.stderr, out.stderr
    assert not marker.exists()
    assert len(list((path / "_done" / "pairs").glob("*.json"))) == len(
        Store(path).ranges("pairs")
    )  # nothing withdrawn
    from stores.maintain import features_command

    for key in ("encoder", "enc"):  # argparse reads `--enc` as --encoder
        with pytest.raises(StoreError, match="--encoder evilmod:factory"):
            features_command({"task": "deblur", key: "evilmod:factory"}, tmp_path, "test")
    argv = features_command(
        m["members"]["pairs"]["config"], tmp_path, "test", allow_encoders=["evilmod:factory"]
    )
    assert "--encoder=evilmod:factory,openclip:ViT-B-32" in argv


@pytest.mark.parametrize(
    "name", ["../../etc", "/abs/path", "targets/../../x", "osf/", "other/x", "osf/a/b"]
)
def test_member_names_from_a_manifest_are_validated(tmp_path, name):
    path = tmp_path / "s"
    toy_store(path)
    m = json.loads((path / "manifest.json").read_text())
    m["members"][name] = m["members"]["pairs"]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"manifest.json names a member .*expected 'pairs'"):
        Store(path)


@pytest.mark.parametrize("damage", ["truncated", "garbled", "not an object"])
def test_a_damaged_manifest_is_named_with_its_recovery(tmp_path, damage):
    path = tmp_path / "s"
    toy_store(path)
    raw = (path / "manifest.json").read_bytes()
    (path / "manifest.json").write_bytes(
        {
            "truncated": raw[: len(raw) // 2],
            "garbled": raw[:40] + b"\x00\xff" * 20,
            "not an object": b"[1, 2]",
        }[damage]
    )
    with pytest.raises(StoreError, match=rf"{path}/manifest.json: damaged .*pull.*rm -r {path}"):
        Store(path)
    out = subprocess.run(
        [sys.executable, "-m", "stores", "verify", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2 and "manifest.json: damaged" in out.stderr


def test_manifests_hold_no_home_paths_or_url_credentials(tmp_path):
    from common.privacy import scrub, shareable

    home = str(Path.home())
    path = tmp_path / "s"
    store, _, _ = toy_store(path)
    store._update_member(
        "pairs",
        config={
            "data": f"{home}/datasets/GoPro",
            "store_shared": "s3://alice:hunter2secret@minio.lab:9000/team",
            "clip_weights": f"{home}/w/ViT-B-32.pt",
        },
    )
    text = (path / "manifest.json").read_text()
    assert home + "/" not in text and "hunter2secret" not in text and "alice" not in text
    config = Store(path).member_info("pairs")["config"]
    assert (
        config["data"] == "~/datasets/GoPro"
        and config["store_shared"] == "s3://minio.lab:9000/team"
    )
    assert shareable({"u": "https://bob:pw@x.org/a"}) == {"u": "https://x.org/a"}
    from common.privacy import local_path

    name = f"openclip:{home}/models/clip"  # a path after a prefix, as encoder names hold them
    assert shareable(name) == "openclip:~/models/clip" and local_path(shareable(name)) == name
    assert local_path(shareable(f"{home}/x")) == f"{home}/x"
    assert scrub("GET https://bob:pw@x.org/a failed") == "GET https://***@x.org/a failed"


def test_messages_scrub_aws_secrets_from_the_environment_and_the_credentials_file(
    tmp_path, monkeypatch
):
    from common.privacy import scrub

    creds = tmp_path / "credentials"
    creds.write_text(
        "[default]\naws_access_key_id = FILEKEYID1234\naws_secret_access_key = fileSecretValue/xyz+1\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envSecretValue987")
    msg = "denied for FILEKEYID1234 with fileSecretValue/xyz+1 and envSecretValue987 (key AKIAABCDEFGHIJKLMNOP)"
    out = scrub(msg)
    assert all(
        s not in out
        for s in ("FILEKEYID1234", "fileSecretValue", "envSecretValue987", "AKIAABCDEFGHIJKLMNOP")
    )
    assert out.count("***") == 4
    bad = tmp_path / "nostore"
    bad.mkdir()
    env = {**os.environ, "AWS_SHARED_CREDENTIALS_FILE": str(creds)}
    res = subprocess.run(
        [sys.executable, "-m", "stores", "push", str(bad), "s3://FILEKEYID1234:x@nowhere/p"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert res.returncode != 0 and "FILEKEYID1234" not in res.stderr + res.stdout, res.stderr


def test_gc_removes_staged_shards_of_lost_leases_and_keeps_what_a_marker_or_the_holder_needs(
    tmp_path,
):
    import time

    from stores.maintain import gc

    toy_store(tmp_path / "s")
    s = tmp_path / "s"
    leases = s / "_leases" / "0-4"
    leases.mkdir(parents=True)
    for g in range(3):  # 2 is the live holder's
        (leases / f"{g:08d}.json").write_text(json.dumps({"owner": f"w:{g}", "gen": g}))
    marker = s / "_done" / "pairs" / "00000.json"
    marker.write_text(
        json.dumps({**json.loads(marker.read_text()), "generation": 1})
    )  # vouches for generation 1
    old = time.time() - 3600
    staged = {
        g: s
        / "_staging"
        / "0-4"
        / f"{g:08d}"
        / "pairs"
        / "h24w32"
        / "lq"
        / "c"
        / "0"
        / "0"
        / "0"
        / "0"
        for g in range(3)
    }
    for f in staged.values():
        f.parent.mkdir(parents=True)
        f.write_bytes(b"x")
        os.utime(f, (old, old))
    (s / "_staging" / "0-4" / "00000009").mkdir()  # empty, and no lease generation 9 yet
    removed = set(gc(s))
    assert s / "_staging" / "0-4" / "00000000" in removed  # a lost writer's: nothing will read it
    assert not (s / "_staging" / "0-4" / "00000000").exists()
    assert staged[1].is_file() and staged[2].is_file()  # to be published; the live holder's
    assert (s / "_staging" / "0-4" / "00000009").is_dir()
