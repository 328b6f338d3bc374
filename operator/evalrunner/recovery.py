"""Find runs whose owner is gone and terminate them: the runbook, as code.

`orphan_verdict` is the one decision every detector makes over a running row
(the local sweeper, `evalrunner serve`'s sweeper, the controller's sweep);
each detector only says what it saw of the owner. `sweep` applies it to all
running rows of a database and repairs case rows left running under closed
runs; `recover_run` is the runbook's manual recovery. All of them close rows
through `store.terminate_run`, the same transaction the runner uses for its
own failure write, and log `eval.run_terminated`.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Callable

from . import log, summary
from .models import Cause, RunStatus
from .owner import Liveness, Owner, local_liveness
from .store.protocol import RunStore
from .store.records import RunRow, StrandedCases
from .timing import HEARTBEAT_LEASE_S



@dataclass(frozen=True)
class OwnerState:
    """What a detector saw of a run's owner: alive, dead (and of what), or nothing it can tell."""

    liveness: Liveness
    cause: Cause = Cause.KILLED  # of a dead owner
    reason: str = ""
    summary: summary.RunSummary | None = None  # the runner's own account, when it left one

    @classmethod
    def dead(cls, cause: Cause, reason: str, runner_summary: summary.RunSummary | None = None) -> OwnerState:
        return cls("dead", cause, reason, runner_summary)


ALIVE = OwnerState("alive")
UNKNOWN = OwnerState("unknown")


@dataclass(frozen=True)
class Orphan:
    run: RunRow
    cause: Cause
    reason: str
    summary: summary.RunSummary | None = None


def orphan_verdict(
    run: RunRow, now: datetime, owner: OwnerState, heartbeat_timeout_s: float = HEARTBEAT_LEASE_S
) -> Orphan | None:
    """Why `run` must be terminated, or None while its owner may still finish it.

    In order of precedence:
    1. the owner is dead: the cause its detector saw (a process gone, a pod's classified death);
    2. the hard deadline (`started_at + timeout_seconds * cases + grace`) has passed, whatever the owner's state;
    3. the heartbeat is older than the lease and the owner is not seen alive. An owner seen alive is
       given until its deadline: a lapse may be the store's fault (a restarting controller), not its own.
    """
    if run.status != RunStatus.RUNNING.value:
        return None
    if owner.liveness == "dead":
        return Orphan(run, owner.cause, owner.reason, owner.summary)
    if run.deadline_at is not None and now > run.deadline_at:
        return Orphan(run, Cause.DEADLINE_EXCEEDED, f"still running past its deadline {run.deadline_at.isoformat()}")
    if owner.liveness != "alive" and run.heartbeat_at is not None and \
            now - run.heartbeat_at > timedelta(seconds=heartbeat_timeout_s):
        age = (now - run.heartbeat_at).total_seconds()
        return Orphan(run, Cause.HEARTBEAT_LOST, f"no heartbeat for {age:.0f}s (lease {heartbeat_timeout_s:.0f}s)")
    return None


LivenessCheck = Callable[[Owner | None], Liveness]


def process_owner_state(owner: Owner | None, liveness: LivenessCheck) -> OwnerState:
    """What this host can see of a process owner: a PID gone (or reused) is dead, as `killed`."""
    state = liveness(owner)
    if state == "dead" and owner is not None:
        return OwnerState.dead(Cause.KILLED, f"owner process is gone ({owner.describe()})")
    return ALIVE if state == "alive" else UNKNOWN


def classify_orphan(
    run: RunRow,
    now: datetime,
    liveness: LivenessCheck,
    heartbeat_timeout_s: float = HEARTBEAT_LEASE_S,
) -> Orphan | None:
    """The verdict on a run whose owner is judged by `liveness` (local processes; see `orphan_verdict`)."""
    return orphan_verdict(run, now, process_owner_state(run.owner, liveness), heartbeat_timeout_s)


@dataclass(frozen=True)
class SweepResult:
    terminated: list[RunRow] = field(default_factory=list)
    repaired: list[StrandedCases] = field(default_factory=list)  # case rows left running under closed runs


def sweep(
    store: RunStore,
    now: datetime,
    *,
    heartbeat_timeout_s: float = HEARTBEAT_LEASE_S,
    liveness: LivenessCheck | None = None,
    terminated_by: str = "sweeper",
    db_path: str | None = None,
    recovering: tuple[str, str] | None = None,
) -> SweepResult:
    """Terminate every orphaned running row, then repair case rows left running under closed runs.

    `recovering` is (run id, an operator's note) of a run being recovered by
    hand: if it is an orphan, it keeps its classified cause, the note is added
    to its error and the close is credited to `manual`.
    """
    host = socket.gethostname()
    check = liveness or (lambda owner: local_liveness(owner, host))
    terminated = []
    for run in store.running_runs():
        orphan = classify_orphan(run, now, check, heartbeat_timeout_s)
        if orphan is None:
            continue
        by = terminated_by
        if recovering is not None and run.id == recovering[0]:
            orphan, by = replace(orphan, reason=f"{orphan.reason}; {recovering[1]}"), "manual"
        closed = close_orphan(store, orphan, by, db_path)
        if closed is not None:
            terminated.append(closed)
    return SweepResult(terminated, repair_stranded_cases(store, terminated_by))


def repair_stranded_cases(store: RunStore, terminated_by: str) -> list[StrandedCases]:
    """Close case rows still `running` under a closed run, with the run's cause (invariant 10)."""
    repaired = store.close_stranded_cases(terminated_by)
    for stranded in repaired:
        log.get(run_id=stranded.run_id, suite=stranded.suite).warning(
            log.STRANDED_CASES_CLOSED, cases=stranded.count, run_status=stranded.run_status, cause=stranded.cause,
            terminated_by=terminated_by,
        )
    return repaired


def close_orphan(store: RunStore, orphan: Orphan, terminated_by: str, db_path: str | None = None) -> RunRow | None:
    """Close one orphan, preferring the runner's own spooled summary when it left one."""
    spooled = summary.read_spooled(db_path, orphan.run.id) if db_path else None
    closed = terminate_for_owner_death(store, orphan.run.id, orphan.cause, orphan.reason, terminated_by, spooled)
    if spooled is not None:
        summary.discard_spooled(db_path, orphan.run.id)  # type: ignore[arg-type]
    return closed


def apply_summary(store: RunStore, spooled: summary.RunSummary, terminated_by: str) -> RunRow | None:
    """Close a run as its runner meant to, after the runner's own final write failed.

    The summary's case results are written in the same transaction as the
    close (rows already terminal are left alone), so the run ends with the
    counts the runner reported; a case row the runner never closed is failed
    with it. Counts stay true to the rows.
    """
    note = f"closed by {terminated_by} from the runner's summary after its final write failed ({spooled.write_error})"
    if spooled.trimmed:
        note += f"; the summary was trimmed: {spooled.trimmed}"
    by = f"{terminated_by} (runner summary)"
    if spooled.status == RunStatus.COMPLETED.value:
        status, cause, error = RunStatus.COMPLETED, None, note
    else:
        status, cause = RunStatus.FAILED, spooled.cause or Cause.STATUS_WRITE_FAILED.value
        error = f"{spooled.error or 'run failed'}; {note}"
    closed = store.close_from_summary(spooled.run_id, status, cause, error, by, spooled.case_events())
    if closed is not None:
        log_terminated(closed, by)
    return closed


def terminate_for_owner_death(
    store: RunStore,
    run_id: str,
    cause: Cause,
    reason: str,
    terminated_by: str,
    runner_summary: summary.RunSummary | None = None,
) -> RunRow | None:
    """Close a run whose owner is known to be dead (a runner pod died, say).

    Prefers the runner's own summary (runbook case 2: its final write was
    lost); otherwise fails the run with `cause`. None when the row was
    already terminal: the runner (or someone) closed it first.
    """
    if runner_summary is not None and runner_summary.run_id == run_id:
        return apply_summary(store, runner_summary, terminated_by)
    closed = store.terminate_run(run_id, cause, reason, terminated_by)
    if closed is not None:
        log_terminated(closed, terminated_by)
    return closed


class RecoveryRefused(Exception):
    pass


def manual_note(reason: str | None) -> str:
    return f"Manual recovery: {reason}" if reason else "Manual recovery"


def recover_run(store: RunStore, run: RunRow, reason: str | None, force: bool = False) -> RunRow | None:
    """The runbook's manual recovery: fail a running row (and its running cases).

    Refuses a run whose owner is provably alive on this host unless `force`.
    Returns None if the run was already terminal.
    """
    if run.status != RunStatus.RUNNING.value:
        return None
    if not force and local_liveness(run.owner) == "alive":
        raise RecoveryRefused(
            f"run {run.id} is owned by a live process ({run.owner.describe() if run.owner else '?'}); "
            "stop that process, or pass --force to terminate the row anyway"
        )
    closed = store.terminate_run(run.id, Cause.MANUAL, manual_note(reason), "manual")
    if closed is not None:
        log_terminated(closed, "manual")
    return closed


def signal_replaced_owner(run: RunRow) -> bool:
    """Ask the live local owner of a replaced run to stop. Its own later writes are fenced."""
    owner = run.owner
    if owner is None or local_liveness(owner) != "alive" or owner.pid == os.getpid():
        return False
    try:
        os.kill(owner.pid, signal.SIGTERM)  # type: ignore[arg-type]
        return True
    except OSError:
        return False


def log_terminated(run: RunRow, terminated_by: str) -> None:
    log.get(run_id=run.id, suite=run.suite).warning(
        log.RUN_TERMINATED,
        status=run.status,
        cause=run.cause,
        error=run.error,
        terminated_by=terminated_by,
        owner=run.owner.describe() if run.owner else None,
        passed=run.passed,
        failed=run.failed,
        errored=run.errored,
    )
