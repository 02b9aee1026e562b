"""Writers of one store with real processes: fenced leases, the manifest lock, no rework."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from toys import make_store

from common.log import collect
from stores import Leases, Store, store_lock
from stores.leases import LeaseLost

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        **kw,
    )


def test_expired_lease_is_taken_over_and_the_old_holder_is_fenced(tmp_path):
    old = Leases(tmp_path, ttl=0.3)  # never entered: no heartbeat, like a paused holder
    assert old.claim((0, 4))
    assert not Leases(tmp_path, ttl=0.3).claim(
        (0, 4)
    )  # live (just renewed, as far as this observer knows)
    time.sleep(0.4)
    new = Leases(
        tmp_path, ttl=0.3
    )  # a writer's next attempt: observations outlive one Leases object
    assert new.claim((0, 4))  # unchanged for ttl: taken over as generation 1
    with pytest.raises(LeaseLost, match=r"\[0, 4\).*superseded by 1.*not writing its done marker"):
        old.check((0, 4), "done marker")
    old.release((0, 4))  # releasing a lost lease leaves the new holder's alone
    new.check((0, 4))
    assert not Leases(tmp_path, ttl=0.3).claim((0, 4))
    new.release((0, 4))
    assert Leases(tmp_path, ttl=0.3).claim((0, 4))  # a released lease is free at once


def test_a_renewed_lease_is_never_taken_over(tmp_path):
    with Leases(tmp_path, ttl=0.4) as holder:
        assert holder.claim((0, 4))
        other = Leases(tmp_path, ttl=0.4)
        for _ in range(12):  # 3 ttl
            assert not other.claim((0, 4))
            time.sleep(0.1)
        holder.check((0, 4))


TAKEOVER = """
import sys, time
from stores import Leases
with Leases(sys.argv[1], ttl=0.2) as l:  # the winner renews its lease: later contenders see it live
    assert not l.claim((0, 4))
    time.sleep(0.3)
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    won = l.claim((0, 4))
    print("won" if won else "lost", flush=True)
    time.sleep(3.0)
    if won:
        l.check((0, 4))  # raises in a winner that was taken over
"""


def test_takeover_has_one_winner_among_many(tmp_path):
    Leases(tmp_path, ttl=0.2).claim((0, 4))  # a dead holder
    go = time.time() + 4.0
    procs = [python(TAKEOVER, tmp_path, go) for _ in range(6)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(o[0].strip() for o in outs) == ["lost"] * 5 + ["won"], outs
    assert sorted(os.listdir(tmp_path / "_leases" / "0-4"))[:2] == [
        "00000000.json",
        "00000001.json",
    ]


HOLD = """
import sys, time
from stores import store_lock
with store_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_manifest_lock_is_never_taken_from_a_live_holder_and_freed_by_its_death(tmp_path):
    holder = python(HOLD, tmp_path)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGSTOP)  # alive but not running: still the holder
    try:
        with pytest.raises(TimeoutError, match=rf"held for over 1 s by .*:{holder.pid} "):
            with store_lock(tmp_path, timeout=1.0):
                pass
    finally:
        holder.kill()
        holder.wait()
    t0 = time.monotonic()
    with store_lock(tmp_path, timeout=5.0):
        assert time.monotonic() - t0 < 2.0
    assert (tmp_path / "_locks" / "manifest.lock").is_file()  # never deleted


COUNT = """
import sys
from stores import Store
s = Store(sys.argv[1], mode="a")
for _ in range(25):
    with __import__("stores").store_lock(s.path):
        n = s.refresh()["members"]["pairs"].get("counter", 0)
        s._update_member("pairs", counter=n + 1)
"""


def test_manifest_updates_from_concurrent_processes_are_never_lost(tmp_path):
    path = make_store(tmp_path, "train", 8, (16, 16))
    procs = [python(COUNT, path) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert Store(path).manifest()["members"]["pairs"]["counter"] == 100


def test_a_done_marker_is_written_once_and_a_complete_member_never_again(tmp_path):
    path = make_store(tmp_path, "train", 8, (16, 16))
    store = Store(path, mode="a")
    member = next(m for m in store.manifest()["members"] if m.startswith("osf/"))
    marker = store.done_path(member, 0)
    before = (marker.read_bytes(), marker.stat().st_mtime_ns)
    assert not store.mark_done(member, 0, {0: {"g": "0" * 64}}, {})
    assert (marker.read_bytes(), marker.stat().st_mtime_ns) == before
    manifest = (path / "manifest.json").stat().st_mtime_ns
    store.finalize(member)  # already complete: not written again
    assert (path / "manifest.json").stat().st_mtime_ns == manifest
    assert not list(path.rglob(".*tmp-*"))


def test_expiry_follows_the_holders_lease_seconds_not_the_observers(tmp_path):
    """A holder that asked for a long lease renews slowly (every lease/4): an observer with a short
    --lease-seconds must not take it over early, and one with a long setting must not wait too long."""
    patient = Leases(tmp_path / "a", ttl=60.0)  # renews every 15 s
    assert patient.claim((0, 4))
    hasty = Leases(tmp_path / "a", ttl=0.2)
    assert not hasty.claim((0, 4))
    time.sleep(0.4)
    assert not hasty.claim((0, 4)), "a 60 s lease was taken over after 0.4 s"
    patient.check((0, 4))
    brief = Leases(tmp_path / "b", ttl=0.2)  # never renewed: a dead holder with a 0.2 s lease
    assert brief.claim((0, 4))
    slow = Leases(tmp_path / "b", ttl=60.0)
    assert not slow.claim((0, 4))
    time.sleep(0.4)
    assert slow.claim((0, 4)), "a dead holder's 0.2 s lease was still held after 0.4 s"


class PausedLeases(Leases):
    """The leases of a writer that is paused (SIGSTOP, a suspended VM) at one point of its write
    path, right after a check passed: `pause()` runs the rest of the world meanwhile."""

    def __init__(self, *args, at: str, pause, **kw):
        super().__init__(*args, **kw)
        self.at, self.pause = at, pause

    def check(self, r, what="write"):
        held = super().check(r, what)
        self._maybe_pause(what)
        return held

    def release(self, r):
        self._maybe_pause("release")
        super().release(r)

    def _maybe_pause(self, what):
        if self.pause is not None and what.startswith(self.at):
            pause, self.pause = self.pause, None
            pause()


@pytest.mark.parametrize("at,winner", [("shards", "new"), ("release", "late")])
def test_a_late_writer_with_other_bytes_never_replaces_what_the_done_marker_vouches_for(
    tmp_path, at, winner
):
    """Two writers of one task compute different bytes (a network target on a GPU and on a CPU).
    The first is paused past its lease right after a check passed (before its shard write, or
    after its done marker), the second takes over and writes the task; then the first resumes.
    The member must verify and read exactly the bytes of the writer whose done marker stands."""
    from types import SimpleNamespace

    from pipeline import stages

    path = make_store(tmp_path, "train", 8, (16, 16))
    store = Store(path, mode="a")
    member = store.pick("targets", None)
    store.done_path(
        member, 0
    ).unlink()  # task 0 to be computed again (as `stores repair` withdraws it)
    store._update_member(member, status="incomplete")
    r = tuple(store.ranges(member)[0])
    assert r == (0, 4) and len(store.shards_of(*r)) == 1
    values = {
        "late": [np.full((16, 16, 3), 0.5, np.float16)] * 4,
        "new": [np.full((16, 16, 3), 0.25, np.float16)] * 4,
    }

    def writer(leases):
        return stages.StoreWriter(Store(path, mode="a"), leases)

    def shard(who):
        return stages.Shard(
            r,
            0,
            4,
            True,
            [(SimpleNamespace(path=member), 0)],
            outputs={member: {"base": values[who]}},
            stats={"excluded": {}, "notes": [], "samples": 4},
        )

    def new_owner_takes_over():
        time.sleep(0.4)  # the late writer's lease expires meanwhile
        assert new.claim(r)
        writer(new)(shard("new"))

    late = PausedLeases(path, ttl=0.3, at=at, pause=new_owner_takes_over)  # no heartbeat: paused
    new = Leases(path, ttl=0.3)
    assert late.claim(r) and not new.claim(r)
    with collect(logging.WARNING) as lines:
        writer(late)(shard("late"))
    if winner == "new":
        assert any("lease on range [0, 4) lost" in line for line in lines), lines

    store = Store(path, mode="a")
    store.finalize(member)  # verifies every shard against the done markers
    assert store.verify(member) == []
    got = Store(path).array(member, "base")[0:4]
    assert all(np.array_equal(x, values[winner][0]) for x in got)
    assert not [
        p for p in (path / "_staging").rglob("*") if p.is_file()
    ]  # nothing staged is left behind


def test_a_marker_of_another_store_naming_the_same_generation_never_publishes_this_writers_bytes(
    tmp_path,
):
    """Lease generations are numbered per store: a done marker pulled from a teammate's store may
    name generation 0 while a local writer stages its own generation 0. The marker's stage (the
    generation and its writer's token) decides what is published, so the local writer's bytes are
    never moved in under the pulled marker."""
    import json
    from types import SimpleNamespace

    from pipeline import stages

    path = make_store(tmp_path, "train", 8, (16, 16))
    store = Store(path, mode="a")
    member = store.pick("targets", None)
    store.done_path(member, 0).unlink()
    store._update_member(member, status="incomplete")
    r = tuple(store.ranges(member)[0])
    theirs, mine = np.full((16, 16, 3), 0.25, np.float16), np.full((16, 16, 3), 0.5, np.float16)
    leases = Leases(path, ttl=30)
    assert leases.claim(r)

    job = stages.StoreWriter(Store(path, mode="a"), leases)
    real_mark = (
        job.store.mark_done
    )  # a pulled copy lands between this writer's shard write and its marker

    def pulled_first(member_, task, *args, **kw):
        other = Store(path, mode="a")
        hashes = {0: other.write_shard(member_, 0, 4, {"base": [theirs] * 4})}
        other.mark_done(
            member_, task, hashes, {}
        )  # in place, then named like another store's generation 0
        marker = json.loads(other.done_path(member_, task).read_text())
        other.done_path(member_, task).write_text(
            json.dumps({**marker, "generation": 0, "stage": "00000000-feedface"})
        )
        return real_mark(member_, task, *args, **kw)

    job.store.mark_done = pulled_first
    shard = stages.Shard(
        r,
        0,
        4,
        True,
        [(SimpleNamespace(path=member), 0)],
        outputs={member: {"base": [mine] * 4}},
        stats={"excluded": {}, "notes": [], "samples": 4},
    )
    job(shard)
    store = Store(path, mode="a")
    store.finalize(member)
    assert store.verify(member) == []
    assert all(np.array_equal(x, theirs) for x in Store(path).array(member, "base")[0:4])
