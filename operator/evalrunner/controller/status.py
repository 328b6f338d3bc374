"""EvalRun status, rebuilt from the world (store rows) on every change. Pure functions.

The status never remembers what the rows can tell: each suite's latest
attempt, its phase, counts and cause come from the store. Only a refusal (by
the suite's concurrency policy, or of a suite too large for its ConfigMap) has
no row, so it is carried over from the previous status; so is a finished
suite whose rows retention deleted (`--retain-days`): the status is then the
only record that it ran, and it must not run again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..models import Cause, EvalRunPhase, EvalRunSpec, RunStatus
from ..store.records import RunRow

# Causes after which another attempt may succeed. Not: a deadline (the time
# budget is spent), a replacement or manual termination (a person decided),
# never_started (the same image or request would fail again).
RETRYABLE_CAUSES = frozenset({
    Cause.KILLED, Cause.OOM_KILLED, Cause.ERROR_EXIT, Cause.CONTAINER_RESTARTED, Cause.EVICTED, Cause.NODE_LOST,
    Cause.POD_DELETED, Cause.HEARTBEAT_LOST, Cause.SHUTDOWN_REQUESTED, Cause.STATUS_WRITE_FAILED,
    Cause.RUNNER_ERROR, Cause.CASE_SAVE_FAILED,
})
REFUSED_PREFIX = "refused:"


def should_retry(row: RunRow, retries: int) -> bool:
    """A failed attempt gets a successor while attempts remain and its cause is worth retrying."""
    if row.status != RunStatus.FAILED.value or row.attempt > retries:
        return False
    try:
        return Cause(row.cause) in RETRYABLE_CAUSES
    except ValueError:
        return False


@dataclass(frozen=True)
class SuiteState:
    """What the world says about one suite: its latest attempt's row (if any) and whether a Job exists."""

    name: str
    latest: RunRow | None
    job_name: str | None
    refused: str | None = None  # message, when the concurrency policy refused the suite
    expired: dict[str, Any] | None = None  # its finished entry in the last status, when retention deleted its rows


def finished_entries(evalrun: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The suites the EvalRun's status records as finished (Succeeded or Failed), by name."""
    done = (EvalRunPhase.SUCCEEDED.value, EvalRunPhase.FAILED.value)
    return {entry["name"]: entry for entry in (evalrun.get("status") or {}).get("suites", [])
            if entry.get("name") and entry.get("phase") in done}


def suite_status(state: SuiteState, retries: int) -> dict[str, Any]:
    row = state.latest
    out: dict[str, Any] = {"name": state.name, "attempt": 0, "phase": EvalRunPhase.PENDING.value,
                           "passed": 0, "failed": 0, "errored": 0}
    if state.job_name:
        out["jobName"] = state.job_name
    if state.refused:
        out.update(phase=EvalRunPhase.FAILED.value, message=state.refused)
        return out
    if row is None:
        return dict(state.expired) if state.expired else out
    out.update(runId=row.id, attempt=row.attempt, passed=row.passed or 0, failed=row.failed or 0,
               errored=row.errored or 0)
    if row.status == RunStatus.RUNNING.value:
        out["phase"] = EvalRunPhase.RUNNING.value
    elif row.status == RunStatus.COMPLETED.value:
        out["phase"] = EvalRunPhase.SUCCEEDED.value
    else:
        out["cause"] = row.cause
        out["message"] = (row.error or "")[:4096]
        out["phase"] = (EvalRunPhase.RUNNING if should_retry(row, retries) else EvalRunPhase.FAILED).value
    return out


def build_status(
    spec: EvalRunSpec,
    generation: int | None,
    states: list[SuiteState],
    old: dict[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    old = old or {}
    suites = [suite_status(s, spec.retries) for s in states]
    phases = [s["phase"] for s in suites]
    done = [p for p in phases if p in (EvalRunPhase.SUCCEEDED.value, EvalRunPhase.FAILED.value)]
    if len(done) == len(phases):
        phase = EvalRunPhase.SUCCEEDED if all(p == EvalRunPhase.SUCCEEDED.value for p in phases) else EvalRunPhase.FAILED
    elif any(p != EvalRunPhase.PENDING.value for p in phases):
        phase = EvalRunPhase.RUNNING
    else:
        phase = EvalRunPhase.PENDING
    totals = {k: sum(s[k] for s in suites) for k in ("passed", "failed", "errored")}
    status: dict[str, Any] = {
        "phase": phase.value,
        "observedGeneration": generation,
        "suites": suites,
        "progress": f"{len(done)}/{len(phases)}",
        **totals,
        "startedAt": old.get("startedAt") or _iso(now),
    }
    finished = phase in (EvalRunPhase.SUCCEEDED, EvalRunPhase.FAILED)
    if finished:
        status["completedAt"] = old.get("completedAt") or _iso(now)
    failed_suites = [s["name"] for s in suites if s["phase"] == EvalRunPhase.FAILED.value]
    wanted = [
        ("Running", phase == EvalRunPhase.RUNNING, "SuitesRunning" if phase == EvalRunPhase.RUNNING else phase.value,
         f"{len(done)} of {len(phases)} suites finished"),
        ("Complete", finished, phase.value if finished else "InProgress",
         "every suite finished" if finished else f"{len(phases) - len(done)} suite(s) not finished"),
        ("Failed", bool(failed_suites) and finished, "SuiteFailed" if failed_suites else "NoSuiteFailed",
         f"failed: {', '.join(failed_suites)}" if failed_suites else "no suite failed"),
        ("CasesPassed", finished and totals["failed"] == 0 and totals["errored"] == 0 and not failed_suites,
         "AllCasesPassed" if finished and not (totals["failed"] or totals["errored"] or failed_suites) else
         ("CasesFailedOrErrored" if finished else "InProgress"),
         f"{totals['passed']} passed, {totals['failed']} failed, {totals['errored']} errored"),
    ]
    old_conditions = {c["type"]: c for c in old.get("conditions", [])}
    status["conditions"] = [
        _condition(kind, truth, reason, message, generation, old_conditions.get(kind), now)
        for kind, truth, reason, message in wanted
    ]
    return status


def _condition(kind: str, truth: bool, reason: str, message: str, generation: int | None,
               old: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
    value = "True" if truth else "False"
    since = old["lastTransitionTime"] if old and old.get("status") == value else _iso(now)
    cond = {"type": kind, "status": value, "reason": reason, "message": message, "lastTransitionTime": since}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


FINISHED = (EvalRunPhase.SUCCEEDED.value, EvalRunPhase.FAILED.value)


def transitions(old: dict[str, Any] | None, new: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Events worth posting for the change old -> new: (type, reason, message)."""
    before = {s["name"]: s for s in (old or {}).get("suites", [])}
    out = []
    for suite in new["suites"]:
        prev = before.get(suite["name"], {})
        key = (suite.get("runId"), suite["phase"])
        if key == (prev.get("runId"), prev.get("phase")):
            continue
        counts = f"{suite['passed']} passed, {suite['failed']} failed, {suite['errored']} errored"
        started = f"suite {suite['name']} attempt {suite.get('attempt')} run {suite.get('runId')}"
        if suite["phase"] in FINISHED and suite.get("runId") and prev.get("runId") != suite["runId"]:
            # Opened and closed between two refreshes: it still started, and says so first.
            out.append(("Normal", "SuiteStarted", started))
        if suite["phase"] == EvalRunPhase.SUCCEEDED.value:
            out.append(("Normal", "SuiteCompleted", f"suite {suite['name']} run {suite.get('runId')} completed: {counts}"))
        elif suite["phase"] == EvalRunPhase.FAILED.value:
            out.append(("Warning", "SuiteFailed",
                        f"suite {suite['name']} failed ({suite.get('cause') or 'refused'}): {suite.get('message', '')}"))
        elif suite["phase"] == EvalRunPhase.RUNNING.value and suite.get("runId") and prev.get("runId") != suite.get("runId"):
            out.append(("Normal", "SuiteStarted", started))
    if new["phase"] != (old or {}).get("phase") and new["phase"] in (EvalRunPhase.SUCCEEDED.value, EvalRunPhase.FAILED.value):
        kind = "Normal" if new["phase"] == EvalRunPhase.SUCCEEDED.value else "Warning"
        out.append((kind, new["phase"], f"EvalRun {new['phase'].lower()}: {new['passed']} passed, "
                                        f"{new['failed']} failed, {new['errored']} errored"))
    return out


def termination_event(closed: RunRow, reason: str | None) -> tuple[str, str, str]:
    """The `RunTerminated` Event for a run closed on behalf of its dead runner: (type, reason, message)."""
    how = " (from the runner's summary)" if closed.terminated_by and "summary" in closed.terminated_by else ""
    kind = "Warning" if closed.status == RunStatus.FAILED.value else "Normal"
    detail = " ".join(filter(None, (closed.cause, reason)))
    return kind, "RunTerminated", f"run {closed.id} {closed.status}{how}: {detail}"


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch that turns status `old` into `new`, or None when nothing a reader sees would change.

    A merge patch keeps every key it does not name, so a key that no longer
    applies (`completedAt` once a suite is added) is sent as null, which
    removes it. Nulls inside `new` are dropped: the API server prunes them,
    and an old status without them must compare equal. Lists (suites,
    conditions) are replaced whole by a merge patch.
    """
    old = old or {}
    wanted = _without_nulls(new)
    if _comparable(_without_nulls(old)) == _comparable(wanted):
        return None
    return {**wanted, **{key: None for key in old.keys() - wanted.keys()}}


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _comparable(status_obj: dict[str, Any]) -> dict[str, Any]:
    """Status without the timestamps a rebuild would restate (a condition's lastTransitionTime)."""
    out = dict(status_obj)
    out["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                         for c in status_obj.get("conditions", [])]
    return out
