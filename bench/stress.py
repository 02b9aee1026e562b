"""`make stress`: fault tolerance measured with real processes, signals and a full disk.

Scenarios (docs/fault-tolerance.md), each against a reference made by one clean run:
  writers   4 concurrent `pipeline features` writers on one store, random SIGKILLs over --rounds
            rounds; then: every member complete, `stores verify` clean, arrays byte-identical to
            the reference, and no shard written after its task's done marker (no rework)
  disk-full extraction into a small tmpfs (ENOSPC mid-write; a file-size limit where mounting is
            not allowed): a clear error, done tasks still verify; the re-run with space completes
  kill-op   SIGKILL at a random moment during finalize, push, pull and export-wds; the re-run
            completes and nothing is corrupt
  manifest  truncated and garbled manifest.json: a clear error naming it; the documented recovery
            (pull the store again) gives a verified store
  sigstop   a lease holder paused with SIGSTOP past its lease, a second writer takes over and
            finishes; the resumed holder loses the task cleanly and writes nothing after a done marker
  sync      a partial sync (one lq shard and one hw chunk missing): training, evaluation, verify,
            push and pull each fail naming the missing file; none reads the store as if whole
  symlink   `_locks/manifest.lock` replaced by a symlink to a file outside the store: the writer
            refuses it, naming it, and the file it points to is unchanged
  landing   a shared copy pulled into a store while a writer is between creating a member and
            finalising it: both succeed and the store verifies, identical to the reference
  race      two writers whose target outputs differ (a stand-in for other GPUs), one paused past
            its lease: the store verifies and holds exactly one writer's bytes per shard
  fuzz      200 random damages (delete, truncate, flip, swap, symlink, empty JSON) to a complete
            store and its WebDataset export (tests/damage.py); counted: silent wrong reads
Writes bench/results-stress.json and prints the table of docs/fault-tolerance.md. Corruptions: damaged or differing
arrays, failed verification, writes after a done marker; the target is 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import faults as tests_faults  # noqa: E402
from conftest import make_tiny_clip  # noqa: E402
from damage import names_file  # noqa: E402

from stores import Store  # noqa: E402
from stores.cli import Parser  # noqa: E402
from stores.store import StoreError  # noqa: E402

log = logging.getLogger("bench.stress")  # __main__ when run as a script

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class Stress:
    def __init__(self, work: Path, seed: int):
        self.work, self.rng = work, random.Random(seed)
        self.clip = work / "clip"
        self.clip.mkdir(parents=True, exist_ok=True)
        make_tiny_clip(self.clip, 0)
        self.rows: list[dict] = []

    def features(self, root: Path, split: str = "train", *extra) -> list[str]:
        return [
            PY,
            "-m",
            "pipeline",
            "features",
            "--task",
            "deblur",
            "--data",
            "demo",
            "--splits",
            split,
            "--encoder",
            f"openclip:{self.clip}",
            "--store-root",
            str(root),
            "--shard-len",
            "2",
            *extra,
        ]

    def spawn(self, argv, **kw) -> subprocess.Popen:
        """A process with its output in a log file (a pipe nobody reads would block it)."""
        self.n_logs = getattr(self, "n_logs", 0) + 1
        log = self.work / "logs" / f"{self.n_logs:04d}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "w") as f:
            p = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=kw.pop("env", ENV),
                stdout=f,
                stderr=subprocess.STDOUT,
                text=True,
                **kw,
            )
        p.log = log
        return p

    def call(self, argv, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, **kw)

    def reference(self, split: str) -> Path:
        root = self.work / f"ref-{split}"
        out = self.call(self.features(root, split))
        assert out.returncode == 0, out.stdout + out.stderr
        return next(root.glob(f"demo-{split}-*"))

    # -- checks ----------------------------------------------------------------------------------
    def corruptions(self, path: Path, ref: Path, extracted: bool = True) -> list[str]:
        """What is wrong with a finished store: incomplete or damaged members, arrays that differ
        from the reference and, for a store extracted here (not copied: a copy has new mtimes),
        shards written after their task's done marker."""
        try:
            store = Store(path)
        except StoreError as e:
            return [str(e)]
        out = []
        verify = self.call([PY, "-m", "stores", "verify", str(path)])
        if verify.returncode != 0:
            out.append("verify: " + verify.stderr.strip()[-500:])
        refs = Store(ref)
        for member, info in refs.manifest()["members"].items():
            if store.status(member) != "complete":
                out.append(f"{member}: {store.status(member)}")
                continue
            for name in info["arrays"]:
                a, b = refs.array(member, name)[:], store.array(member, name)[:]
                same = (
                    (len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)))
                    if isinstance(a, list)
                    else np.array_equal(a, b)
                )
                if not same:
                    out.append(f"{member}/{name}: differs from the reference")
        return out + (rework(store) if extracted else [])

    def record(self, scenario: str, runs: int, kills: int, problems: list[str], **extra) -> None:
        self.rows.append(
            {
                "scenario": scenario,
                "runs": runs,
                "kills": kills,
                "corruptions": len(problems),
                "problems": problems[:10],
                **extra,
            }
        )
        log.info(
            f"{scenario}: {runs} runs, {kills} kills, {len(problems)} corruptions"
            + "".join(f"\n    {p}" for p in problems[:10])
        )

    # -- scenarios -------------------------------------------------------------------------------
    def writers(self, ref: Path, rounds: int) -> None:
        root = self.work / "writers"
        argv = self.features(root, "train", "--lease-seconds", "6")
        procs: list[subprocess.Popen] = []
        runs = kills = 0
        for _ in range(rounds):
            procs = [p for p in procs if p.poll() is None]
            while len(procs) < 4:
                procs.append(self.spawn(argv))
                runs += 1
            time.sleep(self.rng.uniform(2.0, 6.0))
            alive = [p for p in procs if p.poll() is None]
            for p in self.rng.sample(alive, min(len(alive), self.rng.randint(1, 2))):
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
        problems, store_dir = [], None
        while True:  # let the survivors finish (and one more writer, if every one died)
            procs = [p for p in procs if p.poll() is None]
            if not procs:
                procs, runs = [self.spawn(argv)], runs + 1
            for p in procs:
                p.wait(timeout=900)
                if p.returncode != 0:
                    problems.append(f"writer exited {p.returncode}: {p.log.read_text()[-400:]}")
            store_dir = next(root.glob("demo-train-*"), None)
            if store_dir and all(
                i.get("status") == "complete"
                for i in Store(store_dir).manifest()["members"].values()
            ):
                break
        self.record(
            "4 writers, random SIGKILL",
            runs,
            kills,
            problems + self.corruptions(store_dir, ref),
            rounds=rounds,
        )

    def disk_full(self, ref: Path) -> None:
        mnt = self.work / "small-disk"
        mnt.mkdir(exist_ok=True)
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True
            ).returncode
            == 0
        )
        problems, runs = [], 0
        try:
            limit = (
                None
                if mounted
                else (
                    lambda: __import__("resource").setrlimit(
                        __import__("resource").RLIMIT_FSIZE, (120_000, 120_000)
                    )
                )
            )
            out = self.call(self.features(mnt, "train"), preexec_fn=limit)
            runs += 1
            text = out.stdout + out.stderr
            if (
                out.returncode == 0
                or not any(s in text for s in ("No space left", "File too large"))
                or "free space" not in text
            ):
                problems.append(
                    f"no clear error when the disk filled (exit {out.returncode}): {text[-400:]}"
                )
            store_dir = next(mnt.glob("demo-train-*"), None)
            if store_dir is not None:  # whatever was marked done still verifies
                store = Store(store_dir)
                for member in store.manifest()["members"]:
                    problems += store.verify(member)
                problems += rework(store)
            if mounted:
                subprocess.run(["mount", "-o", "remount,size=400m", str(mnt)], check=True)
            out = self.call(self.features(mnt, "train"))
            runs += 1
            if out.returncode != 0:
                problems.append(f"re-run with space failed: {(out.stdout + out.stderr)[-400:]}")
            problems += self.corruptions(next(mnt.glob("demo-train-*")), ref)
        finally:
            if mounted:
                subprocess.run(["umount", str(mnt)])
        self.record(
            "disk full mid-write",
            runs,
            0,
            problems,
            medium="tmpfs 6 MB" if mounted else "RLIMIT_FSIZE",
        )

    def kill_ops(self, ref: Path, rounds: int) -> None:
        for op in ("finalize", "push", "pull", "export-wds"):
            problems, runs, kills = [], 0, 0
            for i in range(rounds):
                case = self.work / f"{op}-{i}"
                if op == "finalize":  # every task done, no member marked complete yet
                    path = case / ref.name
                    shutil.copytree(ref, path)
                    m = json.loads((path / "manifest.json").read_text())
                    for info in m["members"].values():
                        info["status"] = "incomplete"
                    (path / "manifest.json").write_text(json.dumps(m))
                    argv, check = self.features(case, "train"), path
                elif op == "push":
                    argv, check = [PY, "-m", "stores", "push", str(ref), str(case)], case / ref.name
                elif op == "pull":
                    shared = self.work / "shared"
                    if not (shared / ref.name).is_dir():
                        assert (
                            self.call(
                                [PY, "-m", "stores", "push", str(ref), str(shared)]
                            ).returncode
                            == 0
                        )
                    argv, check = (
                        [PY, "-m", "stores", "pull", str(shared / ref.name), str(case)],
                        case / ref.name,
                    )
                else:
                    argv, check = (
                        [
                            PY,
                            "-m",
                            "stores",
                            "export-wds",
                            str(ref),
                            "--out",
                            str(case),
                            "--min-shards",
                            "4",
                            "--samples-per-shard",
                            "32",
                        ],
                        case,
                    )
                p = self.spawn(argv)
                runs += 1
                if op == "finalize":  # verifying every shard takes seconds: somewhere in it
                    time.sleep(self.rng.uniform(1.0, 5.0))
                else:  # a copy or export takes about a second: kill once files appear at the destination
                    deadline = time.time() + 60
                    while (
                        p.poll() is None
                        and time.time() < deadline
                        and not any(f.is_file() for f in case.rglob("*"))
                    ):
                        time.sleep(0.01)
                    time.sleep(self.rng.uniform(0.0, 0.3))
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                    kills += 1
                p.wait()
                out = self.call(argv)
                runs += 1
                if out.returncode != 0:
                    problems.append(f"{op} re-run failed: {(out.stdout + out.stderr)[-400:]}")
                problems += (
                    self.check_wds(check, ref)
                    if op == "export-wds"
                    else self.corruptions(check, ref, extracted=op == "finalize")
                )
            self.record(f"SIGKILL during {op}", runs, kills, problems)

    def check_wds(self, case: Path, ref: Path) -> list[str]:
        from training.wds_data import WdsSplit

        folders = list(case.glob("*-wds"))
        if len(folders) != 1:
            return [f"{case}: {len(folders)} export folders"]
        try:
            split = WdsSplit.open(folders[0])
            refs = Store(ref).array("pairs", "gt")
            got = [split.image(i)["gt"] for i in range(0, len(refs), 37)]
            want = [
                refs[i][: g.shape[0], : g.shape[1]] for i, g in zip(range(0, len(refs), 37), got)
            ]
            return (
                []
                if all(np.array_equal(a, b) for a, b in zip(got, want))
                else ["export differs from the store"]
            )
        except Exception as e:  # a damaged export fails its sha256 checks on read
            return [f"export unreadable: {type(e).__name__}: {e}"]

    def manifest_damage(self, ref: Path) -> None:
        problems, runs = [], 0
        shared = self.work / "shared-m"
        assert self.call([PY, "-m", "stores", "push", str(ref), str(shared)]).returncode == 0
        for damage in ("truncated", "garbled"):
            path = self.work / f"manifest-{damage}" / ref.name
            shutil.copytree(ref, path)
            raw = (path / "manifest.json").read_bytes()
            bad = (
                raw[: len(raw) // 3]
                if damage == "truncated"
                else raw[:200] + bytes(self.rng.randrange(256) for _ in range(64)) + raw[264:]
            )
            (path / "manifest.json").write_bytes(bad)
            out = self.call([PY, "-m", "stores", "verify", str(path)])
            runs += 1
            if out.returncode == 0 or f"{path}/manifest.json: damaged" not in out.stderr:
                problems.append(
                    f"{damage}: no clear error naming manifest.json: {out.stderr[-300:]}"
                )
            shutil.rmtree(path)  # the documented recovery: remove the store, pull it again
            out = self.call([PY, "-m", "stores", "pull", str(shared / ref.name), str(path.parent)])
            runs += 1
            problems += self.corruptions(path, ref, extracted=False)
        self.record("truncated / garbled manifest.json", runs, 0, problems)

    def sigstop(self, ref: Path) -> None:
        root = self.work / "sigstop"
        argv = self.features(root, "train", "--lease-seconds", "3")
        a = self.spawn(argv)
        deadline = time.time() + 300
        while time.time() < deadline and not holds_lease(root, a.pid):
            time.sleep(0.05)
        a.send_signal(signal.SIGSTOP)
        time.sleep(4.5)  # past its lease
        b = self.call(argv, timeout=900)
        a.send_signal(signal.SIGCONT)
        a.wait(timeout=900)
        out_a = a.log.read_text()
        problems = []
        if b.returncode != 0 or a.returncode != 0:
            problems.append(
                f"exits {a.returncode}, {b.returncode}: {out_a[-300:]} {b.stdout[-300:]}{b.stderr[-300:]}"
            )
        if "lost" not in out_a:
            problems.append(f"the paused holder did not say it lost its lease: {out_a[-500:]}")
        self.record(
            "SIGSTOP past the lease, then SIGCONT",
            2,
            0,
            problems + self.corruptions(next(root.glob("demo-train-*")), ref),
            lost_lines=[x for x in out_a.splitlines() if "lost" in x][:3],
        )

    def partial_sync(self, ref: Path) -> None:
        """One lq shard and one hw chunk lost (a partial rsync or S3 sync): every reader fails naming them."""
        problems, runs = [], 0
        for i in range(2):
            case = self.work / f"sync-{i}"
            path = case / ref.name
            shutil.copytree(ref, path)
            lq = sorted(p for p in (path / "pairs").glob("*/lq/c/**/*") if p.is_file())
            hw = sorted(p for p in (path / "pairs").glob("*/hw/c/**/*") if p.is_file())
            lost = [self.rng.choice(lq)] if i == 0 else [self.rng.choice(hw)]
            for f in lost:
                f.unlink()
            names = [str(f.relative_to(path)) for f in lost]
            read = (
                "import sys; from training.data import Split; s = Split.open(sys.argv[1], None, None); "
                "[s.image(i) for i in range(len(s.hw)) if s.hw[i][0]]"
            )
            for what, argv in (
                ("train/eval read", [PY, "-c", read, str(path)]),
                ("verify", [PY, "-m", "stores", "verify", str(path)]),
                ("push", [PY, "-m", "stores", "push", str(path), str(case / "pushed")]),
                ("pull", [PY, "-m", "stores", "pull", str(path), str(case / "pulled")]),
            ):
                out = self.call(argv)
                runs += 1
                text = out.stdout + out.stderr
                if out.returncode == 0:
                    problems.append(f"{what} succeeded on a store missing {names}")
                elif not names_file(text, names):
                    problems.append(f"{what} failed without naming {names}: {text[-300:]}")
        self.record("partial sync (missing shard or chunk)", runs, 0, problems)

    def symlinked_lock(self, ref: Path) -> None:
        """A planted symlink at the manifest lock of a group-shared store never writes its target."""
        case = self.work / "symlink"
        path = case / ref.name
        shutil.copytree(ref, path)
        m = json.loads((path / "manifest.json").read_text())
        for info in m["members"].values():
            info["status"] = "incomplete"  # the writer must take the manifest lock to finalise
        (path / "manifest.json").write_text(json.dumps(m))
        victim = self.work / "victim-bashrc"
        victim.write_text("export PATH=$HOME/bin:$PATH\n")
        lock = path / "_locks" / "manifest.lock"
        lock.parent.mkdir(exist_ok=True)
        lock.unlink(missing_ok=True)
        lock.symlink_to(victim)
        out = self.call(self.features(case, "train"))
        problems = []
        if victim.read_text() != "export PATH=$HOME/bin:$PATH\n":
            problems.append(
                f"the file behind the symlinked lock was changed: {victim.read_text()[:100]!r}"
            )
        if out.returncode == 0 or "manifest.lock" not in out.stdout + out.stderr:
            problems.append(
                f"the writer did not refuse the symlinked lock by name (exit {out.returncode}): "
                f"{(out.stdout + out.stderr)[-300:]}"
            )
        self.record("symlinked lock file", 1, 0, problems)

    def shared_landing(self, ref: Path) -> None:
        """`stores pull` of a complete shared copy into a store a live writer is building."""
        problems, runs = [], 0
        shared = self.work / "shared-landing"
        assert self.call([PY, "-m", "stores", "push", str(ref), str(shared)]).returncode == 0
        for i in range(2):
            root = self.work / f"landing-{i}"
            writer = self.spawn(self.features(root, "train", "--lease-seconds", "6"))
            deadline = time.time() + 300
            while (
                time.time() < deadline
                and writer.poll() is None
                and not list(root.glob("demo-train-*/_done/*/*/*.json"))
                and not list(root.glob("demo-train-*/_done/*/*.json"))
            ):
                time.sleep(0.05)
            time.sleep(self.rng.uniform(0.0, 1.0))
            pull = self.call([PY, "-m", "stores", "pull", str(shared / ref.name), str(root)])
            writer.wait(timeout=900)
            runs += 2
            if pull.returncode != 0:
                problems.append(
                    f"pull beside a live writer failed: {(pull.stdout + pull.stderr)[-300:]}"
                )
            if writer.returncode != 0:
                problems.append(
                    f"the live writer failed when a shared copy landed: {writer.log.read_text()[-300:]}"
                )
            again = self.call(self.features(root, "train"))
            runs += 1
            if again.returncode != 0:
                problems.append(f"re-run failed: {(again.stdout + again.stderr)[-300:]}")
            problems += self.corruptions(root / ref.name, ref, extracted=False)
        self.record("shared copy lands during a live writer", runs, 0, problems)

    def racing_outputs(self, ref: Path) -> None:
        """Two writers whose target bytes differ; the first paused past its lease, then resumed."""
        fault_env = tests_faults.env

        root = self.work / "race"
        argv = self.features(root, "train", "--lease-seconds", "3")
        a = self.spawn(argv, env={**ENV, **fault_env(PTGRM_TEST_PERTURB_TARGET="0.25")})
        deadline = time.time() + 300
        while time.time() < deadline and not holds_lease(root, a.pid):
            time.sleep(0.05)
        a.send_signal(signal.SIGSTOP)
        time.sleep(4.5)
        b = self.call(argv, timeout=900)
        a.send_signal(signal.SIGCONT)
        a.wait(timeout=900)
        problems, out_a = [], a.log.read_text()
        if b.returncode != 0:
            problems.append(f"the second writer failed: {(b.stdout + b.stderr)[-300:]}")
        if "lost" not in out_a:
            problems.append(f"the paused writer did not say it lost its lease: {out_a[-300:]}")
        store_dir = next(root.glob("demo-train-*"), None)
        if store_dir is None:
            problems.append("no store was made")
        else:
            store = Store(store_dir)
            for member in store.manifest()["members"]:
                problems += store.verify(member)
            if a.returncode == 0 and b.returncode == 0:
                self.call(self.features(root, "train"))  # completes whatever the paused writer left
            store = Store(store_dir)
            for member in store.manifest()["members"]:
                if store.status(member) != "complete":
                    problems.append(f"{member}: {store.status(member)}")
                else:
                    problems += store.verify(member)
            problems += mixed_targets(store, Store(ref))
        self.record(
            "two writers, different target bytes",
            2,
            0,
            problems,
            lost_lines=[x for x in out_a.splitlines() if "lost" in x][:3],
        )

    def fuzz(self, rounds: int) -> None:
        from damage import STORE_OPS, WDS_OPS, fuzz
        from test_wds import build_store

        from stores.wds import export_wds

        store = build_store(self.work / "fuzz")
        folder = export_wds(store, self.work / "fuzz-export", min_shards=4)
        for what, path, ops in (
            ("store", store, STORE_OPS),
            ("WebDataset export", folder, WDS_OPS),
        ):
            result = fuzz(path, ops, rounds, seed=self.rng.randrange(1 << 30))
            n = sum(sum(c.values()) for c in result["counts"].values())
            problems = [
                f"{b['op']} after {b['damage']} of {b['files']}: {b['outcome']} ({b['error']})"
                for b in result["bad"]
            ]
            self.record(
                f"{rounds} random damages to a {what}",
                n,
                0,
                problems,
                counts=result["counts"],
                silent=sum(b["outcome"] == "silent" for b in result["bad"]),
                unnamed=sum(b["outcome"] == "unnamed" for b in result["bad"]),
            )


def mixed_targets(store: Store, ref: Store) -> list[str]:
    """Target shards that hold neither the reference's bytes nor one consistent perturbed copy."""
    out, hw = [], ref.array("pairs", "hw")[:]
    for member in store.members("targets"):
        got, want = store.array(member, "base"), ref.array(member, "base")
        for i, (h, w) in enumerate(hw):
            a, b = (np.asarray(x[i][:h, :w]).astype(np.float32) for x in (got, want))
            if not (np.array_equal(a, b) or np.allclose(a - b, 0.25, atol=4e-3)):
                out.append(f"{member}: sample {i} is neither writer's output")
    return out


def holds_lease(root: Path, pid: int) -> bool:
    for p in root.glob("demo-train-*/_leases/*/*.json"):
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if f":{pid}:" in info.get("owner", ""):
            return True
    return False


def rework(store: Store) -> list[str]:
    """Shard files written after their task's done marker (mtime order)."""
    out = []
    shards = store.layout.shards()
    by_bucket = {}
    for k, a, b in shards:
        by_bucket.setdefault(store.layout.buckets[k].name, []).append(a)
    for member in store.manifest()["members"]:
        plan = store.ranges(member)
        marker_time = {
            t: store.done_path(member, t).stat().st_mtime_ns for t in store.done_ranges(member)
        }
        for f in (store.path / member).glob("*/*/c/**/*"):
            if not f.is_file():
                continue
            bucket, i = (
                f.relative_to(store.path / member).parts[0],
                int(f.relative_to(store.path / member).parts[3]),
            )
            start = by_bucket[bucket][i]
            task = next(t for t, (a, b) in enumerate(plan) if a <= start < b)
            if task in marker_time and f.stat().st_mtime_ns > marker_time[task]:
                out.append(
                    f"{member}: {f.relative_to(store.path)} written after the done marker of task {task}"
                )
    return out


def table(rows: list[dict]) -> str:
    lines = ["| scenario | runs | kills | corruptions |", "|---|---|---|---|"]
    lines += [
        f"| {r['scenario']} | {r['runs']} | {r['kills']} | {r['corruptions']} |" for r in rows
    ]
    total = {k: sum(r[k] for r in rows) for k in ("runs", "kills", "corruptions")}
    return "\n".join(
        lines + [f"| **total** | {total['runs']} | {total['kills']} | {total['corruptions']} |"]
    )


def main(argv=None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--rounds", type=int, default=20, help="kill rounds of the 4 writers (default: 20)"
    )
    p.add_argument(
        "--op-rounds",
        type=int,
        default=3,
        help="kills per finalize/push/pull/export-wds (default: 3)",
    )
    p.add_argument(
        "--fuzz-rounds",
        type=int,
        default=200,
        help="random damages per fuzzed store and export (default: 200)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results-stress.json")
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated scenarios: writers, disk-full, kill-ops, manifest, sigstop, "
        "sync, symlink, landing, race, fuzz",
    )
    args = p.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="ptgrm-stress-") as tmp:
        s = Stress(Path(tmp), args.seed)
        ref = s.reference("train")
        scenarios = {
            "writers",
            "disk-full",
            "kill-ops",
            "manifest",
            "sigstop",
            "sync",
            "symlink",
            "landing",
            "race",
            "fuzz",
        }
        only = set(args.only.split(",")) if args.only else scenarios
        if "writers" in only:
            s.writers(ref, args.rounds)
        if "sigstop" in only:
            s.sigstop(ref)
        if "disk-full" in only:
            s.disk_full(ref)
        if "kill-ops" in only:
            s.kill_ops(ref, args.op_rounds)
        if "manifest" in only:
            s.manifest_damage(ref)
        if "sync" in only:
            s.partial_sync(ref)
        if "symlink" in only:
            s.symlinked_lock(ref)
        if "landing" in only:
            s.shared_landing(ref)
        if "race" in only:
            s.racing_outputs(ref)
        if "fuzz" in only:
            s.fuzz(args.fuzz_rounds)
    result = {
        "seconds": round(time.time() - t0, 1),
        "cpus": len(os.sched_getaffinity(0)),
        "rounds": args.rounds,
        "seed": args.seed,
        "rows": s.rows,
        "table": table(s.rows),
    }
    if not args.only:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["table"])
    print(f"{result['seconds']:.0f} s on {result['cpus']} CPUs")
    return 1 if any(r["corruptions"] for r in s.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
