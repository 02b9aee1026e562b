"""The demo job through the Makefile's entry points: features, then train, on tiny random CLIP."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_remote import s3  # noqa: F401 (the S3 server fixture)
from toys import same

from stores import Store

ROOT = Path(__file__).resolve().parents[1]


def run(*args, check=True):
    out = subprocess.run(
        [sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True, text=True
    )
    if check and out.returncode:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def features_args(tiny_clip, root):
    return [
        "pipeline",
        "features",
        "--task",
        "deblur",
        "--data",
        "demo",
        "--encoder",
        f"openclip:{tiny_clip}",
        "--store-root",
        root,
    ]


def stores_under(root):
    return {
        p.parent.name.split("-")[1]: Store(p.parent) for p in Path(root).glob("*/manifest.json")
    }


@pytest.fixture(scope="module")
def built(tiny_clip, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    first = run(*features_args(tiny_clip, root))
    return root, first


def test_features_build_complete_stores(built):
    root, first = built
    stores = stores_under(root)
    assert set(stores) == {"train", "test"}
    for split, store in stores.items():
        members = store.manifest()["members"]
        assert len(members) == 3 and all(m["status"] == "complete" for m in members.values())
        assert any(k.startswith("targets/wiener-") for k in members)
        osf = next(v for k, v in members.items() if k.startswith("osf/"))
        assert osf["weights"] == "pretrained" and osf["dim"] == 32
        n = store.manifest()["n"]
        assert store.array(next(k for k in members if k.startswith("osf/")), "g").shape == (
            n,
            4,
            32,
        )
        assert (
            store.array(next(k for k in members if k.startswith("targets/")), "base").dtype
            == np.float16
        )
    assert "img" in first.stderr  # the progress bar ran


def test_members_record_provenance_and_info_shows_it(built):
    import getpass
    import os
    import platform
    from importlib.metadata import version

    import torch

    root, _ = built
    store = stores_under(root)["train"]
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for member, info in store.manifest()["members"].items():
        prov = info["provenance"]
        assert prov["project"]["version"] == version("ptgrm-pipeline"), member
        if commit:  # run from a checkout
            assert prov["project"]["commit"].split("+")[0] == commit
        assert prov["libraries"] == {
            "torch": version("torch"),
            "open_clip": version("open_clip_torch"),
            "diffusers": version("diffusers"),
            "zarr": version("zarr"),
            "numpy": version("numpy"),
        }
        assert prov["device"] == device and prov["arch"] == platform.machine()
        assert time.strptime(prov["time"], "%Y-%m-%dT%H:%M:%SZ")
        text = json.dumps(prov)
        assert os.path.expanduser("~") not in text and f"/{getpass.getuser()}/" not in text
        assert len(socket.gethostname()) < 6 or socket.gethostname() not in text
        marker = json.loads(next((store.path / "_done" / member).glob("*.json")).read_text())
        assert marker["made_by"] == {
            "device": device,
            "arch": platform.machine(),
        }  # the writer's, per task
    shown = run("stores", "info", store.path).stdout
    assert shown.count(f"made by: ptgrm {version('ptgrm-pipeline')}") == 3
    assert f"torch {version('torch')}" in shown and f"device {device}" in shown


def test_pushed_demo_stores_are_listed_from_s3_with_provenance_from_manifests_only(
    built, s3, monkeypatch, capsys
):
    from services import count_s3_reads

    from stores.__main__ import main as stores_main

    root, _ = built
    url = "s3://team/e2e"
    for path in stores_under(root).values():
        subprocess.run(
            [sys.executable, "-m", "stores", "push", path.path, url],
            cwd=ROOT,
            env=s3.env(),
            check=True,
            capture_output=True,
        )
    gets = count_s3_reads(monkeypatch, s3.env())
    assert stores_main(["ls", url, "--json", "--local", str(root)]) == 0
    rows = {r["store"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {s.path.name for s in stores_under(root).values()}
    for store in stores_under(root).values():
        row = rows[store.path.name]
        assert row["local"]["exists"] and row["local"]["complete"]
        for member, info in store.manifest()["members"].items():
            assert row["details"][member]["provenance"] == info["provenance"]
            assert row["details"][member]["status"] == "complete"
    assert sorted(k for k, _ in gets) == sorted(f"e2e/{name}/manifest.json" for name in rows)
    assert sum(n for _, n in gets) == sum(
        (s.path / "manifest.json").stat().st_size for s in stores_under(root).values()
    )


def test_second_run_computes_nothing(built, tiny_clip):
    root, _ = built
    manifests = {p: p.stat().st_mtime_ns for p in Path(root).glob("*/manifest.json")}
    again = run(*features_args(tiny_clip, root))
    assert again.stdout.count("nothing to compute") == 2
    assert {p: p.stat().st_mtime_ns for p in manifests} == manifests


def test_second_encoder_is_added_without_recomputing_anything_else(built, tiny_clip, tiny_clip_b):
    root, _ = built
    before = {p: p.stat().st_mtime_ns for p in Path(root).glob("*/_done/**/*.json")}
    out = run(
        "pipeline",
        "features",
        "--task",
        "deblur",
        "--data",
        "demo",
        "--store-root",
        root,
        "--encoder",
        f"openclip:{tiny_clip},openclip:{tiny_clip_b}",
    )
    assert out.stdout.count("computing osf/openclip-tiny_clip_b") == 2  # train and test
    assert (
        "computing pairs" not in out.stdout and "targets/" not in out.stdout.split("computing")[1]
    )
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing else rewritten
    for store in stores_under(root).values():
        osf = [m for m in store.manifest()["members"] if m.startswith("osf/")]
        assert len(osf) == 2 and all(store.status(m) == "complete" for m in osf)


def test_killed_run_leaves_nothing_complete_and_resumes_to_identical_arrays(
    built, tiny_clip, tmp_path
):
    root, _ = built
    proc = subprocess.Popen(
        [sys.executable, "-m", *features_args(tiny_clip, tmp_path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob("*-train-*/_done/*/*.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train = stores_under(tmp_path)["train"]
    statuses = [m["status"] for m in train.manifest()["members"].values()]
    assert statuses and "complete" not in statuses
    info = json.loads(run("stores", "info", train.path, "--json").stdout)
    assert all(m["status"] != "complete" for m in info["members"].values())

    run(*features_args(tiny_clip, tmp_path))
    ref, resumed = stores_under(root)["train"], stores_under(tmp_path)["train"]
    assert ref.path.name == resumed.path.name  # same key: same content asked for
    assert len(resumed.manifest()["members"]) == 3
    for member in resumed.manifest()["members"]:  # (the reference may hold more encoders)
        for name in resumed.manifest()["members"][member]["arrays"]:
            assert same(ref.array(member, name)[:], resumed.array(member, name)[:]), (member, name)


def test_train_writes_run_with_eval(built, tmp_path, tiny_clip):
    root, _ = built

    def args(name):
        return [
            "training",
            "train",
            "--task",
            "deblur",
            "--data",
            "demo",
            "--store-root",
            root,
            "--encoder",
            f"openclip:{tiny_clip}",
            "--runs-dir",
            tmp_path,
            "--run",
            name,
            "--steps",
            "12",
            "--batch",
            "2",
            "--crop",
            "64",
            "--log-every",
            "4",
            "--ckpt-every",
            "8",
        ]

    run(*args("e2e"))
    run_dir = tmp_path / "e2e"
    result = json.loads((run_dir / "eval.json").read_text())
    for key in (
        "task",
        "store",
        "target",
        "encoder",
        "weights",
        "n_images",
        "psnr_input",
        "psnr_base",
        "psnr_refined",
        "ssim_base",
        "ssim_refined",
        "params",
        "steps",
    ):
        assert key in result, key
    assert result["n_images"] == 33 and result["steps"] == 12 and result["weights"] == "pretrained"
    assert result["psnr_base"] > result["psnr_input"]
    sidecar = json.loads((run_dir / "model.json").read_text())
    assert (
        sidecar["train_store"]["pairs_key"]
        == Store(next(root.glob("*-train-*"))).manifest()["pairs_key"]
    )
    assert sidecar["params"] == result["params"]
    lines = [
        r
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert [x["step"] for x in lines] == [4, 8, 12] and all(np.isfinite(x["loss"]) for x in lines)

    # the same seed and store give the same weights, bit for bit
    first = (run_dir / "model.safetensors").read_bytes()
    run(*args("e2e-again"))
    assert (tmp_path / "e2e-again" / "model.safetensors").read_bytes() == first

    again = run(
        "training",
        "eval",
        "--task",
        "deblur",
        "--data",
        "demo",
        "--store-root",
        root,
        "--encoder",
        f"openclip:{tiny_clip}",
        "--runs-dir",
        tmp_path,
        "--run",
        "e2e",
        "--save-images",
    )
    assert "refined" in again.stdout
    assert json.loads((run_dir / "eval.json").read_text())["psnr_refined"] == result["psnr_refined"]

    # inference on the test inputs (with their recorded kernels) gives the evaluated images
    test = stores_under(root)["test"]
    src = tmp_path / "degraded"
    src.mkdir()
    for name, lq, hw, meta in zip(
        test.array("pairs", "names")[:],
        test.array("pairs", "lq")[:],
        test.array("pairs", "hw")[:],
        test.array("pairs", "meta")[:],
    ):
        Image.fromarray(lq[: hw[0], : hw[1]]).save(src / f"{name}.png")
        (src / f"{name}.json").write_text(str(meta))
    run(
        "pipeline",
        "restore",
        "--in",
        src,
        "--out",
        tmp_path / "restored",
        "--run",
        "e2e",
        "--runs-dir",
        tmp_path,
    )
    for name in test.array("pairs", "names")[:]:
        restored = np.asarray(Image.open(tmp_path / "restored" / f"{name}.png"))
        evaluated = np.asarray(Image.open(run_dir / "images" / f"{name}.png"))
        assert np.array_equal(restored, evaluated), name

    # OSF=distilled: g from the run's distilled predictor, no pre-trained encoder at inference
    run(
        "training",
        "distill",
        "--task",
        "deblur",
        "--data",
        "demo",
        "--store-root",
        root,
        "--encoder",
        f"openclip:{tiny_clip}",
        "--runs-dir",
        tmp_path,
        "--run",
        "e2e",
        "--distill-steps",
        "20",
    )
    out = run(
        "pipeline",
        "restore",
        "--in",
        src,
        "--out",
        tmp_path / "distilled",
        "--run",
        "e2e",
        "--runs-dir",
        tmp_path,
        "--osf",
        "distilled",
    )
    assert "distilled predictor" in out.stdout + out.stderr
    from common.metrics import to_uint8
    from ptgrm.predictor import load_predictor
    from ptgrm.refine import load_model, refine
    from training.data import Split
    from training.distill import PredictedG

    model, _ = load_model(run_dir)
    split = PredictedG(
        Split.open(test.path, None, [f"openclip:{tiny_clip}"]), load_predictor(run_dir)
    )
    for i, name in enumerate(test.array("pairs", "names")[:]):
        s = split.image(i)
        got = np.asarray(Image.open(tmp_path / "distilled" / f"{name}.png"))
        assert np.array_equal(got, to_uint8(refine(model, s["lq"], s["base"], s["g"]))), name


def test_training_imports_no_frozen_network_code():
    code = (
        "import sys, training, training.train, training.data, training.evaluate, training.__main__;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'pipeline', 'open_clip', 'diffusers'});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def arrays_equal(a: Store, b: Store) -> None:
    for member, info in a.manifest()["members"].items():
        for name in info["arrays"]:
            assert same(a.array(member, name)[:], b.array(member, name)[:]), (member, name)


def test_two_writers_at_once_finish_one_verified_member(built, tiny_clip, tmp_path):
    root, _ = built
    args = [
        sys.executable,
        "-m",
        *features_args(tiny_clip, tmp_path),
        "--splits",
        "train",
        "--shard-len",
        "4",
    ]
    procs = [
        subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    mine = stores_under(tmp_path)["train"]
    assert run("stores", "verify", mine.path).returncode == 0
    assert all(m["status"] == "complete" for m in mine.manifest()["members"].values())
    ref = stores_under(root)["train"]
    for member in mine.manifest()["members"]:
        for name in mine.manifest()["members"][member]["arrays"]:
            assert same(ref.array(member, name)[:], mine.array(member, name)[:]), (member, name)
    owners = set()
    for folder in (mine.path / "_leases").iterdir():  # every lease released
        gens = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        assert gens[-1].get("released"), folder
        owners |= {g["owner"].rsplit(":", 1)[0] for g in gens if "owner" in g}
    assert owners == {f"{socket.gethostname()}:{p.pid}" for p in procs}, (
        owners
    )  # both writers did work


def test_repair_recomputes_only_the_damaged_task(built, tiny_clip, tmp_path):
    root, _ = built
    src = stores_under(root)["test"].path
    copy = tmp_path / src.name
    shutil.copytree(src, copy)
    member = next(m for m in Store(copy).manifest()["members"] if m.startswith("targets/"))
    shard = next(
        p
        for p in (copy / member).rglob("*")
        if p.is_file() and "base" in p.parts and p.name != "zarr.json"
    )
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x5A
    shard.write_bytes(bytes(data))
    assert run("stores", "verify", copy, check=False).returncode == 1
    markers = {p: p.stat().st_mtime_ns for p in copy.glob("_done/**/*.json")}
    out = run("stores", "repair", copy)
    assert "withdrawn" in out.stdout
    assert run("stores", "verify", copy).returncode == 0
    changed = [p for p, t in markers.items() if not p.exists() or p.stat().st_mtime_ns != t]
    assert changed and all(member in str(p) for p in changed)  # only the damaged member's task
    for name in ("base",):
        assert same(Store(copy).array(member, name)[:], Store(src).array(member, name)[:])


def test_complete_members_are_copied_from_a_shared_root(built, tiny_clip, tmp_path):
    root, _ = built
    out = run(*features_args(tiny_clip, tmp_path / "mine"), "--store-shared", root)
    assert "copying instead of computing" in out.stdout and "nothing to compute" in out.stdout
    for split, store in stores_under(tmp_path / "mine").items():
        assert all(m["status"] == "complete" for m in store.manifest()["members"].values())
        assert run("stores", "verify", store.path).returncode == 0


def test_wds_format_trains_end_to_end_with_two_processes(built, tiny_clip, tmp_path):
    root, _ = built
    train, test = stores_under(root)["train"].path, stores_under(root)["test"].path
    run(
        "stores",
        "export-wds",
        train,
        "--out",
        tmp_path,
        "--min-shards",
        "8",
        "--samples-per-shard",
        "32",
    )
    export = tmp_path / f"{train.name}-wds"

    def args(name, *extra):
        return [
            "training",
            "train",
            "--task",
            "deblur",
            "--data",
            "demo",
            "--format",
            "wds",
            "--train-store",
            export,
            "--test-store",
            test,
            "--encoder",
            f"openclip:{tiny_clip}",
            "--runs-dir",
            tmp_path,
            "--run",
            name,
            "--steps",
            "6",
            "--batch",
            "4",
            "--crop",
            "64",
            "--log-every",
            "2",
            *extra,
        ]

    run(*args("wds2", "--nproc", "2"))
    run(*args("wds1"))
    two, one = (json.loads((tmp_path / r / "eval.json").read_text()) for r in ("wds2", "wds1"))
    assert two["n_images"] == one["n_images"] == 33 and np.isfinite(two["psnr_refined"])
    assert (
        json.loads((tmp_path / "wds2" / "model.json").read_text())["train_store"]["format"] == "wds"
    )
    assert (
        abs(two["psnr_refined"] - one["psnr_refined"]) < 0.05
    )  # the same global batches, split over ranks
