"""Whether a running row is stuck, and why: the runbook's first symptom, as the page shows it.

A `running` row is STUCK when
- `recovery.classify_orphan` would terminate it (its owner is provably dead,
  it is past its hard deadline, or its heartbeat is older than the lease and
  its owner cannot be seen alive), or
- its heartbeat is older than the lease though its owner is alive (a hung
  process: a detector waits for its deadline, a person may not want to), or
- it has been running longer than its time budget, `started_at +
  timeout_seconds * case_count` (the runbook's symptom). The hard deadline
  adds a grace period to that budget; between the two the row is shown as
  stuck before a detector may terminate it.

Pure over one row and a clock, so the page and its tests agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .. import recovery
from ..models import RunStatus
from ..store.records import RunRow
from ..timing import HEARTBEAT_LEASE_S


@dataclass(frozen=True)
class Stuck:
    cause: str  # the cause a detector would record (killed, deadline_exceeded, heartbeat_lost)
    reason: str


def why_stuck(
    run: RunRow,
    now: datetime,
    liveness: recovery.LivenessCheck,
    heartbeat_timeout_s: float = HEARTBEAT_LEASE_S,
) -> Stuck | None:
    if run.status != RunStatus.RUNNING.value:
        return None
    orphan = recovery.classify_orphan(run, now, liveness, heartbeat_timeout_s)
    if orphan is not None:
        return Stuck(orphan.cause.value, orphan.reason)
    age_s = heartbeat_age_s(run, now)
    if age_s is not None and age_s > heartbeat_timeout_s:
        return Stuck("heartbeat_lost", f"no heartbeat for {age_s:.0f}s (lease {heartbeat_timeout_s:.0f}s), "
                                       "though its owner process is alive")
    start = run.started_at or run.created_at
    if start is not None and run.timeout_seconds is not None and run.case_count:
        budget_s = run.timeout_seconds * run.case_count
        elapsed_s = (now - start).total_seconds()
        if elapsed_s > budget_s:
            return Stuck(
                "deadline_exceeded",
                f"running for {elapsed_s:.0f}s, past its budget of {budget_s:.0f}s "
                f"(timeout_seconds {run.timeout_seconds:g} x {run.case_count} cases)",
            )
    return None


def heartbeat_age_s(run: RunRow, now: datetime) -> float | None:
    return (now - run.heartbeat_at).total_seconds() if run.heartbeat_at is not None else None


