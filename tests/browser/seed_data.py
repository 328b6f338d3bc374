"""The database the browser tests look at, filled through the real store API before the server starts."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from evalrunner.models import LockPolicy, RunStatus
from evalrunner.owner import Owner, this_process
from evalrunner.store import CaseEvent, DuckDBStore, RunRequest
from evalrunner.store.duckdb_store import utcnow

ADMIN_TOKEN = "browser-test-admin-token-0123456789"
READ_TOKEN = "browser-test-read-token-9876543210"
SCRIPT_SUITE = "<script>window.__xss=1;alert(1)</script>evil-suite"
SCRIPT_CASE = "<b onmouseover=alert(5)>bold-case</b>"
SCRIPT_OUTPUT = '<img src=x onerror="window.__xss=2;alert(2)">'
SCRIPT_ERROR = "<script>window.__xss=3;alert(3)</script>"


@dataclass
class Seeded:
    db: Path
    completed: str
    failed: str
    running: str
    stuck: str
    hostile: str


def _dead_owner() -> Owner:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the PID is gone, so the owner is provably dead
    me = this_process()
    return Owner(kind="process", host=me.host, pid=proc.pid, process_started_at=me.process_started_at)


def _case(run_id: str, name: str, passed: bool | None, output: str | None = None, error: str | None = None,
          duration_ms: float = 120.0, when=None) -> CaseEvent:
    when = when or utcnow()
    return CaseEvent(f"{run_id}/{name}", run_id, name, "failed" if passed is None else "completed", when, when,
                     error=error, cause="case_raised" if passed is None else None, passed=passed,
                     score=None if passed is None else float(passed), output=output, duration_ms=duration_ms)


def seed(db: Path) -> Seeded:
    store = DuckDBStore.open(db)
    try:
        def start(suite, cases, timeout_s=30.0, owner=None, at=None):
            if at is not None:
                store.clock = lambda: at
            try:
                return store.start_run(RunRequest(suite, tuple(cases), timeout_s, owner or this_process(),
                                                  lock_policy=LockPolicy.ALLOW)).run
            finally:
                store.clock = utcnow

        two_hours_ago = utcnow() - timedelta(hours=2)
        stuck = start("flaky-suite", ("warmup", "long-one", "never-ran"), timeout_s=10, owner=_dead_owner(),
                      at=two_hours_ago)
        store.save_cases([_case(stuck.id, "warmup", True, output="ok", when=two_hours_ago),
                          CaseEvent(f"{stuck.id}/long-one", stuck.id, "long-one", "running", two_hours_ago)])

        completed = start("qa-smoke", ("add", "capital", "haiku"))
        store.save_cases([_case(completed.id, "add", True, output="4"),
                          _case(completed.id, "capital", True, output="Paris"),
                          _case(completed.id, "haiku", False, output="An old silent pond\nA frog jumps in\nSplash")])
        store.finish_run(completed.id, RunStatus.COMPLETED)

        failed = start("qa-smoke", ("add", "divide"))
        store.save_cases([_case(failed.id, "add", True, output="4"),
                          _case(failed.id, "divide", None, error="ZeroDivisionError: division by zero")])
        store.finish_run(failed.id, RunStatus.FAILED, "case_raised", "1 case raised")

        hostile = start(SCRIPT_SUITE, (SCRIPT_CASE,))
        store.save_cases([_case(hostile.id, SCRIPT_CASE, None, output=SCRIPT_OUTPUT, error=SCRIPT_ERROR)])
        store.finish_run(hostile.id, RunStatus.FAILED, "case_raised", SCRIPT_ERROR)

        running = start("nightly-big", ("q1", "q2", "q3", "q4"), timeout_s=600)
        store.save_cases([_case(running.id, "q1", True, output="yes")])
        return Seeded(db, completed.id, failed.id, running.id, stuck.id, hostile.id)
    finally:
        store.close()


HISTORY_SUITE = "nightly-qa"


@dataclass
class SeededHistory:
    db: Path
    runs: list[str]  # oldest first
    regressed: str  # the run where `capital` and `divide` stopped passing
    before_regression: str


def seed_history(db: Path) -> SeededHistory:
    """Seven nightly runs of one suite, a day apart; the fifth regresses two cases and takes longer."""
    nights = [  # (cases that do not pass: name -> passed False / None for an error, seconds taken)
        ({"haiku": False}, 40), ({"haiku": False}, 42), ({}, 38), ({}, 45),
        ({"capital": False, "divide": None}, 71), ({"capital": False}, 50), ({}, 44),
    ]
    names = ("add", "capital", "divide", "haiku", "json", "regex")
    store = DuckDBStore.open(db)
    ids = []
    try:
        for night, (failing, seconds) in enumerate(nights):
            began = utcnow() - timedelta(days=len(nights) - night)
            store.clock = lambda at=began: at
            run = store.start_run(RunRequest(HISTORY_SUITE, names, 30.0, this_process(),
                                             lock_policy=LockPolicy.ALLOW)).run
            store.save_cases([_case(run.id, name, failing.get(name, True), output="ok", when=began,
                                    error="ZeroDivisionError" if name in failing and failing[name] is None else None)
                              for name in names])
            store.clock = lambda at=began + timedelta(seconds=seconds): at
            store.finish_run(run.id, RunStatus.COMPLETED)
            ids.append(run.id)
    finally:
        store.clock = utcnow
        store.close()
    return SeededHistory(db, ids, regressed=ids[4], before_regression=ids[3])
