"""Runs with chosen case verdicts, for the compare and history tests: built row by row, or through the real store."""

from __future__ import annotations

from datetime import datetime, timedelta

from evalrunner.models import LockPolicy, RunStatus
from evalrunner.owner import this_process
from evalrunner.store import CaseEvent, DuckDBStore, RunRequest
from evalrunner.store.duckdb_store import utcnow
from evalrunner.store.records import CaseRow, RunRow

T0 = datetime(2026, 1, 5, 9, 0, 0).astimezone()

# A verdict as the tests write it: "pass", "fail", "error", or (verdict, score) to set the score.
Verdict = str | tuple[str, float | None]


def _split(verdict: Verdict) -> tuple[str, float | None]:
    if isinstance(verdict, tuple):
        return verdict
    return verdict, {"pass": 1.0, "fail": 0.0}.get(verdict)


def run_row(run_id: str, suite: str = "qa", status: str = "completed", case_count: int | None = None,
            cause: str | None = None, attempt: int = 1, parent: str | None = None, minute: int = 0,
            passed: int | None = None, failed: int | None = None, errored: int | None = None,
            duration_s: float = 10.0) -> RunRow:
    created = T0 + timedelta(minutes=minute)
    return RunRow(
        id=run_id, suite=suite, status=status, created_at=created, started_at=created,
        completed_at=None if status == "running" else created + timedelta(seconds=duration_s), error=None,
        cause=cause, owner=None, heartbeat_at=None, deadline_at=None, attempt=attempt, parent_run_id=parent,
        timeout_seconds=30.0, case_count=case_count, passed=passed, failed=failed, errored=errored,
        lock_policy="Allow", terminated_by=None, source=None,
    )


def case_row(run_id: str, name: str, verdict: Verdict, carried_from: str | None = None,
             detail: str | None = None, error: str | None = None) -> CaseRow:
    word, score = _split(verdict)
    status = {"pass": "completed", "fail": "completed", "error": "failed", "running": "running"}[word]
    return CaseRow(
        id=f"{run_id}/{name}", run_id=run_id, name=name, status=status, created_at=T0, started_at=T0,
        completed_at=T0, error=error if word == "error" else None, cause="case_raised" if word == "error" else None,
        passed=None if status != "completed" else word == "pass", score=score, output=None, detail=detail,
        duration_ms=5.0, carried_from=carried_from,
    )


def cases(run_id: str, verdicts: dict[str, Verdict], carried_from: str | None = None) -> list[CaseRow]:
    return [case_row(run_id, name, v, carried_from) for name, v in verdicts.items()]


def record(store: DuckDBStore, suite: str, verdicts: dict[str, Verdict], *, status: RunStatus = RunStatus.COMPLETED,
           cause: str | None = None, planned: tuple[str, ...] = (), parent: RunRow | None = None,
           carried: tuple[str, ...] = (), at: datetime | None = None, duration_s: float = 2.0,
           finish: bool = True, run_id: str | None = None) -> RunRow:
    """A run through the real store API: opened (as if at `at`), its cases saved, closed `duration_s` later.

    `planned` adds cases the run meant to run but never did (a terminated run); `carried` are cases
    carried over from `parent`, as `evalrunner run --resume` does.
    """
    at = at or utcnow()
    clock = store.clock
    store.clock = lambda: at
    try:
        run = store.start_run(RunRequest(
            suite, tuple(verdicts) + planned, 30.0, this_process(), lock_policy=LockPolicy.ALLOW,
            parent_run_id=parent.id if parent else None, carried_case_names=carried, run_id=run_id,
        )).run
        events = []
        for name, verdict in verdicts.items():
            word, score = _split(verdict)
            status_word = "failed" if word == "error" else "completed"
            events.append(CaseEvent(
                f"{run.id}/{name}", run.id, name, status_word, at, at, error="boom" if word == "error" else None,
                cause="case_raised" if word == "error" else None,
                passed=None if word == "error" else word == "pass", score=score, duration_ms=20.0,
                detail="output did not match" if word == "fail" else None))
        if events:
            store.save_cases(events)
        if not finish:
            return run
        store.clock = lambda: at + timedelta(seconds=duration_s)
        return store.finish_run(run.id, status, cause, "it was terminated" if cause else None)
    finally:
        store.clock = clock
