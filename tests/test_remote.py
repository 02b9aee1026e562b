"""Sharing stores: push/pull through a real S3 server (SeaweedFS on 127.0.0.1) and between folders."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from faults import cut_copies_after
from services import SeaweedS3, count_s3_reads
from toys import make_store, same

from stores import ArraySpec, Store, StoreError
from stores.__main__ import main as stores_main
from stores.remote import storage_options

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "team"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server for the session, stopped by PID at the end; bucket `team` exists."""
    try:
        server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    except RuntimeError as e:
        pytest.fail(f"cannot start the S3 test server: {e}")
    try:
        server.filesystem().mkdir(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(tmp_path):
    """A complete toy store (pairs, target, osf) plus one incomplete osf member."""
    path = make_store(tmp_path / "local", "train", n=10, hw=(24, 28), dim=8)
    s = Store(path, mode="a")
    s.begin_member(
        "osf/half-000000000000", "h" * 64, {"half": 1}, [ArraySpec("g", "float32", (4, 8))]
    )
    s.write_range("osf/half-000000000000", 0, {"g": np.ones((4, 4, 8), np.float32)}, {})
    return path


def stores_cli(*args, env=None, check=True):
    out = subprocess.run(
        [sys.executable, "-m", "stores", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if check and out.returncode:
        raise AssertionError(
            f"stores {args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
        )
    return out


def skipped(out) -> tuple[int, int]:
    m = re.search(r"(\d+) files copied .*?, (\d+) already present and skipped", out.stdout)
    assert m, out.stdout + out.stderr
    return int(m[1]), int(m[2])


def assert_same_arrays(a, b):
    sa, sb = Store(a), Store(b)
    members = sa.members("targets") + sa.members("osf") + ["pairs"]
    assert sorted(sb.manifest()["members"]) == sorted(members)
    for m in members:
        for name in sa.manifest()["members"][m]["arrays"]:
            assert same(sa.array(m, name)[:], sb.array(m, name)[:]), f"{m}/{name}"


def test_push_then_pull_through_s3_gives_identical_verified_store(s3, store, tmp_path):
    env = s3.env()
    push = stores_cli("push", store, f"s3://{BUCKET}/stores", env=env)
    assert "leaving out member osf/half-000000000000 (incomplete)" in push.stdout
    fs = s3.filesystem()
    remote = f"{BUCKET}/stores/{store.name}"
    assert fs.exists(f"{remote}/manifest.json")
    assert not fs.exists(f"{remote}/osf/half-000000000000")
    pull = stores_cli("pull", f"s3://{remote}", tmp_path / "pulled", env=env)
    assert skipped(pull) == (skipped(push)[0], 0)
    pulled = tmp_path / "pulled" / store.name
    assert_same_arrays(store, pulled)
    assert stores_cli("verify", pulled).stdout.strip() == "ok"
    again = stores_cli("pull", f"s3://{remote}", tmp_path / "pulled", env=env)
    assert skipped(again) == (0, skipped(push)[0])
    texts = [p.read_text() for p in pulled.rglob("*.json")] + [
        fs.cat(p).decode() for p in fs.find(remote) if p.endswith(".json")
    ]
    for secret in (s3.access_key, s3.secret_key):
        assert not any(secret in t for t in texts)
        assert secret not in push.stdout + push.stderr + pull.stdout + pull.stderr


def test_interrupted_push_publishes_no_store_and_rerun_skips_copied_files(
    s3, store, tmp_path, monkeypatch, capsys
):
    env = s3.env()
    url = f"s3://{BUCKET}/cut"
    with monkeypatch.context() as m:  # the copy fails in this process after 5 files
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            m.delenv(k)
        for k, v in env.items():
            m.setenv(k, v)
        cut_copies_after(m, 5)
        assert stores_main(["push", str(store), url]) == 2
    assert "test fault" in capsys.readouterr().err
    fs = s3.filesystem()
    remote = f"{BUCKET}/cut/{store.name}"
    assert len(fs.find(remote)) >= 5 and not fs.exists(f"{remote}/manifest.json")
    refused = stores_cli("pull", f"s3://{remote}", tmp_path / "p", env=env, check=False)
    assert refused.returncode == 2 and "not a feature store" in refused.stderr
    assert not (tmp_path / "p" / store.name).exists()
    copied, skipped_files = skipped(stores_cli("push", store, url, env=env))
    assert skipped_files >= 5 and copied > 0
    fs.invalidate_cache()
    assert fs.exists(f"{remote}/manifest.json")


def test_interrupted_local_pull_leaves_no_store_and_resumes(store, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    stores_cli("push", store, shared)  # local to local
    dst = tmp_path / "mine"
    with monkeypatch.context() as m:
        cut_copies_after(m, 4)
        assert stores_main(["pull", str(shared / store.name), str(dst), "--jobs", "1"]) == 2
    with pytest.raises(StoreError, match="not a feature store"):
        Store(dst / store.name)
    assert not (dst / store.name).exists() and len(list(dst.glob(f".partial-{store.name}-*"))) == 1
    copied, skipped_files = skipped(stores_cli("pull", shared / store.name, dst))
    assert skipped_files == 4 and copied > 0
    assert not list(dst.glob(".partial-*"))
    assert_same_arrays(store, dst / store.name)
    assert stores_cli("verify", dst / store.name).returncode == 0


def test_include_incomplete_copies_the_incomplete_member(store, tmp_path):
    stores_cli("pull", store, tmp_path / "all", "--include-incomplete")
    copy = Store(tmp_path / "all" / store.name)
    assert copy.status("osf/half-000000000000") == "incomplete"
    assert copy.done_ranges("osf/half-000000000000") == {0}


def test_pull_onto_an_existing_copy_adds_the_newly_completed_member(store, tmp_path):
    first = stores_cli("pull", store, tmp_path / "mine")
    copied = skipped(first)[0]
    src = Store(store, mode="a")
    for t in (1, 2):
        src.write_range(
            "osf/half-000000000000", t, {"g": np.ones((4 if t == 1 else 2, 4, 8), np.float32)}, {}
        )
    src.finalize("osf/half-000000000000")
    again = skipped(stores_cli("pull", store, tmp_path / "mine"))
    assert again[1] == copied and again[0] > 0
    assert Store(tmp_path / "mine" / store.name).status("osf/half-000000000000") == "complete"
    other = make_store(tmp_path / "other", "train", n=4, hw=(24, 28), dim=8, seed=1)
    (tmp_path / "mine" / other.name).mkdir()
    (tmp_path / "mine" / other.name / "manifest.json").write_text(
        json.dumps({"pairs_key": "f" * 64, "members": {}})
    )
    refused = stores_cli("pull", other, tmp_path / "mine", check=False)
    assert refused.returncode == 2 and "holds another store" in refused.stderr


def test_wrong_credentials_fail_clearly_without_leaking_them(s3, store):
    bad_key, bad_secret = "WRONGACCESSKEY0000001", "wrong-secret-3f9aK2pQ7zT1"
    for env in (s3.env(bad_key, bad_secret), s3.env(s3.access_key, bad_secret)):
        out = stores_cli("push", store, f"s3://{BUCKET}/denied", env=env, check=False)
        assert out.returncode == 2 and "access denied" in out.stderr, out.stderr
        text = out.stdout + out.stderr
        assert bad_secret not in text and env["AWS_ACCESS_KEY_ID"] not in text
        assert "Traceback" not in text
    assert not s3.filesystem().exists(f"{BUCKET}/denied/{store.name}/manifest.json")
    for command in (
        ["ls", f"s3://{BUCKET}/stores"],
        ["info", f"s3://{BUCKET}/stores/{store.name}"],
        ["catalog", f"s3://{BUCKET}/stores", "--html", store.parent / "c.html"],
    ):
        out = stores_cli(*command, env=s3.env(bad_key, bad_secret), check=False)
        assert (
            out.returncode == 2
            and "access denied" in out.stderr
            and "AWS_SECRET_ACCESS_KEY" in out.stderr
        ), (command, out.stderr)
        assert bad_secret not in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert not (store.parent / "c.html").exists()


def test_endpoint_comes_from_flag_or_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://a:1")
    assert storage_options("s3://b/p") == {"client_kwargs": {"endpoint_url": "http://a:1"}}
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://b:2")
    assert storage_options("s3://b/p")["client_kwargs"]["endpoint_url"] == "http://b:2"
    assert (
        storage_options("s3://b/p", "http://c:3")["client_kwargs"]["endpoint_url"] == "http://c:3"
    )
    assert storage_options("/local/path") == {}


def test_ls_and_info_of_s3_read_only_manifests_and_compare_with_the_local_copy(
    s3, store, tmp_path, monkeypatch, capsys
):
    """`stores ls|info s3://...` lists stores, members, keys, weights, bytes and provenance from the
    manifests alone (every S3 GET is counted: no array data), and says which have a complete local copy."""
    from stores.provenance import provenance

    Store(store, mode="a")._update_member("pairs", provenance=provenance("cpu"))
    other = make_store(tmp_path / "local", "test", n=6, hw=(24, 28), dim=8)
    env, url = s3.env(), f"s3://{BUCKET}/listed"
    for s in (store, other):
        stores_cli("push", s, url, env=env)
    mine = tmp_path / "mine"
    stores_cli("pull", f"{url}/{store.name}", mine, env=env)
    manifests = {
        f"listed/{s.name}/manifest.json": len(
            s3.filesystem().cat(f"{BUCKET}/listed/{s.name}/manifest.json")
        )
        for s in (store, other)
    }
    gets = count_s3_reads(monkeypatch, env)
    assert stores_main(["ls", url, "--json", "--local", str(mine)]) == 0
    rows = {r["store"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {store.name, other.name}
    pushed = Store(store).manifest()["members"]
    row = rows[store.name]
    assert row["members"] == {m: "complete" for m, i in pushed.items() if i["status"] == "complete"}
    pairs = row["details"]["pairs"]
    assert (
        pairs["key"] == pushed["pairs"]["key"][:12]
        and pairs["bytes"] == pushed["pairs"]["bytes"] > 0
    )
    assert pairs["tasks_done"] == f"{pushed['pairs']['tasks']}/{pushed['pairs']['tasks']}"
    assert pairs["provenance"]["device"] == "cpu" and pairs["provenance"]["libraries"]["zarr"]
    osf = next(v for m, v in row["details"].items() if m.startswith("osf/"))
    assert (
        osf["weights"] == "random" and osf["provenance"] is None
    )  # made without provenance: unknown
    assert row["local"]["exists"] and row["local"]["complete"]
    assert not rows[other.name]["local"]["exists"]
    assert sorted(gets) == sorted(manifests.items())  # nothing but the two manifests was read

    gets.clear()
    assert stores_main(["info", f"{url}/{store.name}", "--local", str(mine)]) == 0
    out = capsys.readouterr().out
    assert "made by: ptgrm" in out and "made by: unknown" in out and "device cpu" in out
    assert f"local copy: complete ({mine / store.name})" in out
    assert [k for k, _ in gets] == [f"listed/{store.name}/manifest.json"]
    assert stores_main(["info", f"{url}/{other.name}", "--local", str(mine)]) == 0
    assert "local copy: none" in capsys.readouterr().out


def test_catalog_of_an_s3_root_shows_the_same_thumbnails_as_the_local_store(s3, store, tmp_path):
    env, url = s3.env(), f"s3://{BUCKET}/catalogued"
    stores_cli("push", store, url, env=env)
    remote, local = tmp_path / "remote.html", tmp_path / "local.html"
    stores_cli("catalog", url, "--html", remote, "--local", tmp_path / "none", env=env)
    stores_cli("catalog", store.parent, "--html", local)
    thumbs = [
        re.findall(r"src='(data:image/png;base64,[^']+)'", p.read_text()) for p in (remote, local)
    ]
    assert (
        len(thumbs[0]) == 2 and thumbs[0] == thumbs[1]
    )  # lq and base of the first sample, read from S3
    page = remote.read_text()
    assert f"<h2>{store.name}</h2>" in page and "local copy: none" in page
    assert "osf/half-000000000000" not in page  # left out of the push: incomplete
    assert s3.secret_key not in page and s3.access_key not in page


@pytest.mark.parametrize("damage", ["lost", "swapped"])
def test_catalog_of_an_s3_root_never_shows_a_lost_or_swapped_shard_as_an_image(
    s3, store, tmp_path, damage
):
    """Zarr reads a missing S3 object as zeros (a plausible black thumbnail) and a swapped one as the
    wrong pixels: the catalogue checks the shard against its done marker and says why instead."""
    env, url = s3.env(), f"s3://{BUCKET}/catalogued-{damage}"
    stores_cli("push", store, url, env=env)
    fs = s3.filesystem()
    shards = sorted(
        p for p in fs.find(f"{BUCKET}/catalogued-{damage}/{store.name}/pairs") if "/lq/c/" in p
    )
    assert len(shards) >= 2
    if damage == "lost":
        fs.rm(shards[0])
    else:
        fs.pipe(shards[0], fs.cat(shards[1]))  # another shard's bytes under the first one's name
    page_file = tmp_path / "remote.html"
    stores_cli("catalog", url, "--html", page_file, "--local", tmp_path / "none", env=env)
    page = page_file.read_text()
    section = page[page.index(f"<h2>{store.name}</h2>") :]
    assert "<img " not in section and "thumbnails unavailable" in section
    assert "/lq/c/" in section and ("repair" in section or "pull" in section)
