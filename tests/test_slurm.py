"""SLURM launchers against a real local cluster (`make slurm-up`; skipped with the reason when it
is not up, failed instead when PTGRM_REQUIRE_SLURM=1), plus submitit's local executor without SLURM.

Extraction: a job array over the unfinished tasks and a finalize job give the same arrays as
`python -m pipeline features`; a failed task keeps the others' shards and the rerun submits only
it; a complete store submits nothing. Training: a job requeued mid-run resumes from its checkpoint
to the bytes of an uninterrupted run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import faults
import numpy as np
import pytest
from toys import make_task_stores, same

from stores import Store

ROOT = Path(__file__).resolve().parents[1]
SPLIT = [
    "--task",
    "deblur",
    "--data",
    "demo",
    "--splits",
    "test",
    "--shard-len",
    "1",
    "--shards",
    "3",
]
TRAIN = [
    "--task",
    "deblur",
    "--data",
    "toy",
    "--store-root",
    "toy",
    "--runs-dir",
    "runs",
    "--steps",
    "150",
    "--batch",
    "4",
    "--crop",
    "32",
    "--log-every",
    "10",
    "--ckpt-every",
    "5",
    "--workers",
    "0",
    "--threads",
    "1",
]


def cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    if not shutil.which("sinfo") or not shutil.which("sacct"):
        return "SLURM client commands not found; start the local cluster with `make slurm-up` (root, Debian)"
    try:
        nodes = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10
        )
        acct = subprocess.run(
            ["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        return "slurmctld does not answer; `make slurm-up`"
    if nodes.returncode or not re.search(r"^(idle|mixed|allocated)", nodes.stdout, re.M):
        return (
            f"no idle node (sinfo: {(nodes.stdout + nodes.stderr).strip()[:200]}); `make slurm-up`"
        )
    if acct.returncode:
        return f"sacct fails (no accounting): {acct.stderr.strip()[:200]}; `make slurm-up`"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = cluster_problem()
    if problem and os.environ.get("PTGRM_REQUIRE_SLURM") == "1":
        pytest.fail(f"PTGRM_REQUIRE_SLURM=1 but {problem}")
    if problem:
        pytest.skip(problem)


def run(cwd, *args, env=None, timeout=240):
    """`python *args` in `cwd`, importing this checkout (and what `env` adds, e.g. faults.env())."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    out = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
    )
    return out.returncode, out.stdout + out.stderr


def features(cwd, clip, *extra, env=None):
    return run(
        cwd,
        "-m",
        "slurm",
        "features",
        *SPLIT,
        "--encoder",
        f"openclip:{clip}",
        "--store-root",
        "st",
        "--cpus",
        "1",
        *extra,
        env=env,
    )


def records(cwd) -> list[dict]:
    return [
        json.loads(p.read_text())
        for p in sorted((Path(cwd) / "slurm_logs" / "submissions").glob("*.json"))
    ]


def the_store(root) -> Path:
    (path,) = sorted(Path(root).glob("demo-test-*"))
    return path


def assert_same_arrays(a: Path, b: Path) -> None:
    sa, sb = Store(a), Store(b)
    members = sa.manifest()["members"]
    assert members.keys() == sb.manifest()["members"].keys()
    for member in members:
        for name in members[member]["arrays"]:
            assert same(sa.array(member, name)[:], sb.array(member, name)[:]), (member, name)


def verify(store: Path) -> None:
    rc, out = run(ROOT, "-m", "stores", "verify", str(store))
    assert rc == 0, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_clip):
    """The same settings built locally by `python -m pipeline features`."""
    root = tmp_path_factory.mktemp("reference")
    rc, out = run(
        root,
        "-m",
        "pipeline",
        "features",
        *SPLIT,
        "--encoder",
        f"openclip:{tiny_clip}",
        "--store-root",
        "st",
    )
    assert rc == 0, out[-3000:]
    return the_store(root / "st")


def test_parsers_reuse_the_stages_flags_and_helpers():
    from slurm.__main__ import build_parser
    from slurm.submit import _expand, chunks

    a = build_parser().parse_args(
        ["features", "--shards", "4", "--partition", "gpu", "--max-parallel", "8"]
    )
    assert (a.shards, a.partition, a.max_parallel, a.cluster, a.shard_len) == (
        4,
        "gpu",
        8,
        "slurm",
        16,
    )
    b = build_parser().parse_args(
        ["train", "--ckpt-every", "50", "--gpus", "4", "--account", "lab"]
    )
    assert (b.ckpt_every, b.gpus, b.account, b.resume) == (50, 4, "lab", False)
    assert chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert _expand("2-4,7%2") == [2, 3, 4, 7]


def test_local_executor_builds_the_same_store_without_slurm(tmp_path, tiny_clip, reference):
    rc, out = features(tmp_path, tiny_clip, "--cluster", "local")
    assert rc == 0, out[-3000:]
    assert_same_arrays(the_store(tmp_path / "st"), reference)
    verify(the_store(tmp_path / "st"))
    said = "".join(p.read_text() for p in (tmp_path / "slurm_logs").rglob("*.out"))
    assert "done in" in said  # the tasks say what they did, at the submitter's level


def test_an_array_task_reads_only_its_range_of_descriptors_never_the_dataset_folder(
    tmp_path, tiny_clip, monkeypatch
):
    """Files of other ranges deleted from the dataset folder, and the descriptor files of other
    ranges too: the task of [2, 4) and the finalize job still do their work."""
    from PIL import Image

    import pipeline.layouts
    import pipeline.plan
    import pipeline.sources
    from pipeline import descriptors
    from pipeline.extract import FeaturesConfig, build_features
    from pipeline.plan import plan_features
    from slurm import features as sf

    rng = np.random.default_rng(0)
    data = tmp_path / "photos"
    (data / "test").mkdir(parents=True)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            data / "test" / f"im{k}.png"
        )
    cfg = FeaturesConfig(
        task="deblur",
        data=str(data),
        encoder=f"openclip:{tiny_clip}",
        splits=("test",),
        store_root=str(tmp_path / "st"),
        shard_len=2,
    )
    (reference,) = build_features(replace(cfg, store_root=str(tmp_path / "reference")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(descriptors, "PER_FILE", 2)  # one descriptor file per task here
    (plan,) = plan_features(cfg)
    jobs = sf.open_jobs(cfg, [plan])
    todo = sf.to_finalize(jobs)
    store = todo["test"]["path"]
    assert sorted(jobs["test"].work()) == [(0, 2), (2, 4), (4, 6)]
    for a, b in ((0, 2), (4, 6)):
        assert sf.run_task(cfg, "test", a, b, str(tmp_path), store)["descriptor_files"] == [a // 2]

    names = [s.name for s in plan.source.samples]
    for k in (0, 1, 4, 5):  # other ranges' sources and descriptors are gone
        (data / names[k]).unlink()
    for k in (0, 2):
        (descriptors.folder(store) / descriptors.chunk_name(k)).unlink()

    def no_listing(*args, **kwargs):
        raise AssertionError("an array task or the finalize job listed the dataset folder")

    for module, name in (
        (pipeline.layouts, "list_pairs"),
        (pipeline.sources, "list_pairs"),
        (pipeline.sources, "open_source"),
        (pipeline.plan, "open_source"),
    ):
        monkeypatch.setattr(module, name, no_listing)
    assert sf.run_task(cfg, "test", 2, 4, str(tmp_path), store)["descriptor_files"] == [1]
    sf.finalize(cfg, str(tmp_path), todo)
    assert Store(store).status("pairs") == "complete" and Path(store).name == reference.name
    assert_same_arrays(Path(store), reference)


def test_failed_task_is_the_only_one_resubmitted_then_nothing_is(
    cluster, tmp_path, tiny_clip, reference
):
    rc, out = features(
        tmp_path, tiny_clip, "--wait", env=faults.env(PTGRM_TEST_FAIL_TASK="test:11")
    )
    assert rc == 1 and "failed" in out, out[-3000:]
    (first,) = records(tmp_path)
    assert [t["range"] for t in first["tasks"]] == [
        [0, 11],
        [11, 22],
        [22, 33],
    ]  # the demo's 33 test tiles
    store = Store(the_store(tmp_path / "st"))
    for member in first["members"]["test"]:  # the other tasks' shards are kept
        assert store.done_ranges(member) == {0, 2} and store.status(member) == "incomplete"
    rc, status = run(tmp_path, "-m", "slurm", "status")
    assert rc == 0 and re.search(r"\[11, 22\)\s+failed", status) and "2 done" in status, status
    assert re.search(
        r"failed: test \[11, 22\) \(failed\).*submits only these unfinished tasks", status
    ), status

    rc, out = features(tmp_path, tiny_clip, "--wait")
    assert rc == 0, out[-3000:]
    second = records(tmp_path)[-1]
    assert [t["range"] for t in second["tasks"]] == [[11, 22]]  # exactly the failed task
    verify(store.path)
    assert_same_arrays(store.path, reference)

    t0 = time.time()
    rc, out = features(tmp_path, tiny_clip)
    assert rc == 0 and "no job submitted" in out, out[-3000:]
    assert time.time() - t0 < 30 and len(records(tmp_path)) == 2


def test_finalize_leaves_the_queue_when_its_array_fails_and_nobody_waits(
    cluster, tmp_path, tiny_clip
):
    rc, out = features(
        tmp_path, tiny_clip, env=faults.env(PTGRM_TEST_FAIL_TASK="test:0")
    )  # no --wait
    assert rc == 0, out[-3000:]
    fin = records(tmp_path)[-1]["finalize"]["job"]
    deadline = time.time() + 300
    while time.time() < deadline:
        queued = subprocess.run(
            ["squeue", "-h", "-j", fin, "-o", "%T %r"], capture_output=True, text=True
        ).stdout
        if not queued.strip():
            break
        time.sleep(2)
    assert not queued.strip(), f"finalize job {fin} still queued: {queued}"
    assert job_state(fin) == "FAILED", job_state(fin)
    log = Path(tmp_path, records(tmp_path)[-1]["finalize"]["stderr"]).read_text()
    assert re.search(r"missing ranges \[0\]", log), log[-2000:]
    rc, status = run(tmp_path, "-m", "slurm", "status")
    assert re.search(r"finalize\s+failed", status) and re.search(
        r"failed: test \[0, \d+\) \(failed\)", status
    ), status


def job_state(job: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job], capture_output=True, text=True
    )
    return (out.stdout.split() or ["?"])[0]


def checkpoint_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "model.json").read_text())["step"]
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def test_training_requeued_mid_run_resumes_to_the_uninterrupted_weights(cluster, tmp_path):
    make_task_stores(tmp_path / "toy")
    rc, out = run(tmp_path, "-m", "slurm", "train", *TRAIN, "--run", "requeued", "--cpus", "1")
    assert rc == 0, out[-3000:]
    job = records(tmp_path)[-1]["job"]
    run_dir = tmp_path / "runs" / "requeued"
    deadline = time.time() + 90
    while checkpoint_step(run_dir) < 5 and time.time() < deadline:
        time.sleep(0.05)
    at = checkpoint_step(run_dir)
    assert 5 <= at < 150, f"no checkpoint mid-run (step {at})"
    subprocess.run(
        ["scontrol", "requeue", job], check=True
    )  # restarts after cred_expire (10 s here)
    deadline = time.time() + 150
    while job_state(job) != "COMPLETED" and time.time() < deadline:
        assert job_state(job) not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), job_state(job)
        time.sleep(0.5)
    log = Path(records(tmp_path)[-1]["stdout"]).read_text()
    assert job_state(job) == "COMPLETED", log[-3000:]
    resumed = [int(s) for s in re.findall(r"resuming at (\d+)", log)]
    assert len(resumed) == 1 and 5 <= resumed[0] < 150, log[-3000:]
    assert (
        "Restarts=1"
        in subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    )
    rc, out = run(tmp_path, "-m", "training", "train", *TRAIN, "--run", "straight")
    assert rc == 0, out[-3000:]
    assert (run_dir / "model.safetensors").read_bytes() == (
        tmp_path / "runs/straight/model.safetensors"
    ).read_bytes()
