"""Orphan detection: the pure classifier, and sweeps over a real database with an injected clock."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from evalrunner import recovery
from evalrunner.faults import Faults
from evalrunner.models import Cause
from evalrunner.owner import Owner, this_process
from evalrunner.runner import RunOptions, run_suite
from evalrunner.store import CaseEvent, DuckDBStore, RunRequest
from evalrunner.suites import suite_from_data

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def dead_owner() -> Owner:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return Owner(kind="process", host=socket.gethostname(), pid=proc.pid, process_started_at=0.0)


def remote_owner() -> Owner:
    return Owner(kind="process", host="another-host", pid=4242, process_started_at=1.0)


@pytest.fixture
def clock():
    return Clock(T0)


@pytest.fixture
def store(tmp_path, clock):
    s = DuckDBStore.open(tmp_path / "db.duckdb", clock=clock, faults=Faults(""))
    yield s
    s.close()


def start(store, owner, cases=("a", "b"), timeout=10, grace=60, suite="s"):
    return store.start_run(RunRequest(suite=suite, case_names=tuple(cases), timeout_seconds=timeout, owner=owner,
                                      deadline_grace_seconds=grace)).run


# ---------------------------------------------------------------- the pure decision


def test_classify_prefers_a_dead_owner_then_deadline_then_heartbeat(store, clock):
    run = start(store, remote_owner(), cases=("a",), timeout=10, grace=5)  # deadline T0 + 15 s
    alive = lambda owner: "alive"  # noqa: E731
    dead = lambda owner: "dead"  # noqa: E731
    unknown = lambda owner: "unknown"  # noqa: E731

    assert recovery.classify_orphan(run, T0 + timedelta(seconds=1), alive) is None
    assert recovery.classify_orphan(run, T0 + timedelta(seconds=1), dead).cause is Cause.KILLED
    late = recovery.classify_orphan(run, T0 + timedelta(seconds=16), unknown)
    assert late.cause is Cause.DEADLINE_EXCEEDED and "deadline" in late.reason
    assert recovery.classify_orphan(run, T0 + timedelta(seconds=16), dead).cause is Cause.KILLED

    long_run = start(store, remote_owner(), cases=("a",), timeout=3600, suite="long")
    lost = recovery.classify_orphan(long_run, T0 + timedelta(seconds=31), unknown, heartbeat_timeout_s=30)
    assert lost.cause is Cause.HEARTBEAT_LOST and "no heartbeat for 31s" in lost.reason
    assert recovery.classify_orphan(long_run, T0 + timedelta(seconds=29), unknown, heartbeat_timeout_s=30) is None
    # An owner seen alive is given until its deadline: the lapse may be the store's, not its own.
    assert recovery.classify_orphan(long_run, T0 + timedelta(seconds=31), alive, heartbeat_timeout_s=30) is None


def test_one_verdict_for_every_detector(store):
    """The controller's pod view feeds the same decision: a dead pod's cause, its summary, or the lease."""
    run = start(store, Owner(kind="pod", namespace="ns", pod="p-1"), cases=("a",), timeout=3600)
    later = T0 + timedelta(seconds=31)
    deleted = recovery.OwnerState.dead(Cause.POD_DELETED, "pod ns/p-1 no longer exists")
    assert recovery.orphan_verdict(run, T0, deleted).cause is Cause.POD_DELETED
    assert recovery.orphan_verdict(run, later, recovery.ALIVE) is None  # a live pod outlasts a lapsed lease
    assert recovery.orphan_verdict(run, later, recovery.UNKNOWN).cause is Cause.HEARTBEAT_LOST
    assert recovery.orphan_verdict(run, T0 + timedelta(hours=2), recovery.ALIVE).cause is Cause.DEADLINE_EXCEEDED


# ---------------------------------------------------------------- sweeps on a real file


def test_sweep_terminates_each_kind_of_orphan_with_its_cause(store, clock, logs):
    killed = start(store, dead_owner(), suite="killed")
    late = start(store, remote_owner(), cases=("a",), timeout=1, grace=1, suite="late")
    silent = start(store, remote_owner(), cases=("a",), timeout=3600, suite="silent")
    live = start(store, this_process(), cases=("a",), timeout=3600, suite="live")
    store.save_cases([CaseEvent(f"{killed.id}/a", killed.id, "a", "completed", T0, T0, passed=True, score=1.0),
                      CaseEvent(f"{killed.id}/b", killed.id, "b", "running", T0)])

    clock.now = T0 + timedelta(seconds=45)
    store.heartbeat(live.id)  # the live owner keeps beating
    closed = {r.suite: r for r in recovery.sweep(store, clock.now, heartbeat_timeout_s=30).terminated}

    assert {k: v.cause for k, v in closed.items()} == {
        "killed": "killed", "late": "deadline_exceeded", "silent": "heartbeat_lost"}
    assert store.get_run(live.id).status == "running"
    cases = {c.name: c for c in store.cases(killed.id)}
    assert cases["a"].status == "completed"  # nothing completed is lost
    assert (cases["b"].status, cases["b"].cause) == ("failed", "killed")
    logged = {e["run_id"]: e for e in logs.events("eval.run_terminated")}
    assert logged[killed.id]["cause"] == "killed" and logged[killed.id]["suite"] == "killed"
    assert logged[late.id]["cause"] == "deadline_exceeded"
    assert logged[silent.id]["cause"] == "heartbeat_lost"

    # A second sweep finds nothing: each row terminated exactly once.
    assert recovery.sweep(store, clock.now, heartbeat_timeout_s=30).terminated == []
    assert len(logs.events("eval.run_terminated")) == 3


def test_manual_recovery_refuses_a_live_owner_unless_forced(store):
    run = start(store, this_process())
    with pytest.raises(recovery.RecoveryRefused, match="live process"):
        recovery.recover_run(store, run, "looks stuck")
    closed = recovery.recover_run(store, run, "looks stuck", force=True)
    assert (closed.status, closed.cause, closed.error) == ("failed", "manual", "Manual recovery: looks stuck")
    assert recovery.recover_run(store, store.get_run(run.id), "again", force=True) is None


def test_running_runner_keeps_its_heartbeat_fresh(tmp_path):
    """While a run is in flight its heartbeat advances, so no sweeper mistakes it for dead."""
    (tmp_path / "sleepy.py").write_text("import asyncio\nasync def nap(x):\n    await asyncio.sleep(0.6)\n    return 'ok'\n")
    suite = suite_from_data({
        "name": "beat", "timeout_seconds": 5, "target": {"python": {"callable": "sleepy:nap"}},
        "cases": [{"id": "one", "input": 1, "expected": "ok"}],
    })
    beats = []
    with DuckDBStore.open(tmp_path / "db.duckdb", faults=Faults("")) as store:
        async def main():
            task = asyncio.create_task(run_suite(suite, store, RunOptions(
                handle_signals=False, heartbeat_interval_s=0.1, search_path=(str(tmp_path),))))
            for _ in range(5):
                await asyncio.sleep(0.1)
                got = store._con.cursor().execute("SELECT heartbeat_at FROM eval_runs").fetchall()
                if got:
                    beats.append(got[0][0])
            return await task

        result = asyncio.run(main())
    assert result.run.status == "completed"
    assert len(set(beats)) >= 3, beats  # the lease was renewed several times during one case
