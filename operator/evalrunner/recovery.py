"""Find runs whose owner is gone and terminate them: the runbook, as code.

`classify_orphan` is a pure decision over one row; `sweep` applies it to all
running rows; `recover_run` is the runbook's manual recovery. All of them
close rows through `store.terminate_run`, the same transaction the runner
uses for its own failure write, and log `eval.run_terminated`.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from . import log, summary
from .models import Cause, RunStatus
from .owner import Liveness, Owner, local_liveness
from .store.protocol import RunStore
from .store.records import RunRow

DEFAULT_HEARTBEAT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Orphan:
    run: RunRow
    cause: Cause
    reason: str


LivenessCheck = Callable[[Owner | None], Liveness]


def classify_orphan(
    run: RunRow,
    now: datetime,
    liveness: LivenessCheck,
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
) -> Orphan | None:
    """Why `run` must be terminated, or None while its owner may still finish it.

    A provably dead owner wins (most precise cause); then the hard deadline
    (`started_at + timeout_seconds * cases + grace`); then the heartbeat lease.
    """
    if run.status != RunStatus.RUNNING.value:
        return None
    state = liveness(run.owner)
    if state == "dead" and run.owner is not None:
        return Orphan(run, Cause.KILLED, f"owner process is gone ({run.owner.describe()})")
    if run.deadline_at is not None and now > run.deadline_at:
        return Orphan(run, Cause.DEADLINE_EXCEEDED, f"still running past its deadline {run.deadline_at.isoformat()}")
    if run.heartbeat_at is not None and now - run.heartbeat_at > timedelta(seconds=heartbeat_timeout_s):
        age = (now - run.heartbeat_at).total_seconds()
        return Orphan(run, Cause.HEARTBEAT_LOST, f"no heartbeat for {age:.0f}s (lease {heartbeat_timeout_s:.0f}s)")
    return None


def sweep(
    store: RunStore,
    now: datetime,
    *,
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
    liveness: LivenessCheck | None = None,
    terminated_by: str = "sweeper",
    db_path: str | None = None,
) -> list[RunRow]:
    """Terminate every orphaned running row; returns the rows this call terminated."""
    host = socket.gethostname()
    check = liveness or (lambda owner: local_liveness(owner, host))
    terminated = []
    for run in store.running_runs():
        orphan = classify_orphan(run, now, check, heartbeat_timeout_s)
        if orphan is None:
            continue
        closed = close_orphan(store, orphan, terminated_by, db_path)
        if closed is not None:
            terminated.append(closed)
    return terminated


def close_orphan(store: RunStore, orphan: Orphan, terminated_by: str, db_path: str | None = None) -> RunRow | None:
    """Close one orphan, preferring the runner's own spooled summary when it left one."""
    spooled = summary.read_spooled(db_path, orphan.run.id) if db_path else None
    closed = terminate_for_owner_death(store, orphan.run.id, orphan.cause, orphan.reason, terminated_by, spooled)
    if spooled is not None:
        summary.discard_spooled(db_path, orphan.run.id)  # type: ignore[arg-type]
    return closed


def apply_summary(store: RunStore, spooled: summary.RunSummary, terminated_by: str) -> RunRow | None:
    """Close a run as its runner meant to, after the runner's own final write failed.

    A case row the runner never closed is failed in the same transaction,
    so counts stay true to the rows.
    """
    note = f"closed by {terminated_by} from the runner's summary after its final write failed ({spooled.write_error})"
    by = f"{terminated_by} (runner summary)"
    if spooled.status == RunStatus.COMPLETED.value:
        closed = store.finish_run(spooled.run_id, RunStatus.COMPLETED, None, note, terminated_by=by)
        if closed is not None:
            log_terminated(closed, by)
        return closed
    error = f"{spooled.error or 'run failed'}; {note}"
    closed = store.terminate_run(spooled.run_id, spooled.cause or Cause.STATUS_WRITE_FAILED.value, error, by)
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
    error = f"Manual recovery: {reason}" if reason else "Manual recovery"
    closed = store.terminate_run(run.id, Cause.MANUAL, error, "manual")
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
