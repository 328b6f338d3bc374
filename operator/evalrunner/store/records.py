"""Plain records that cross the store boundary (in process or over HTTP)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..models import LockPolicy, RunStatus
from ..owner import Owner
from ..scope import Scope
from ..timing import DEADLINE_GRACE_S

MAX_OUTPUT_CHARS = 64 * 1024
MAX_TEXT_CHARS = 1024 * 1024  # a case's error or detail: the store API refuses longer ones


@dataclass(frozen=True)
class RunRequest:
    """Everything needed to open a run row."""

    suite: str
    case_names: tuple[str, ...]  # cases this attempt will run (carried-over ones excluded)
    timeout_seconds: float
    owner: Owner
    lock_policy: LockPolicy = LockPolicy.FORBID
    deadline_grace_seconds: float = DEADLINE_GRACE_S
    parent_run_id: str | None = None
    carried_case_names: tuple[str, ...] = ()
    source: str | None = None
    run_id: str | None = None  # chosen by the caller when it must be known in advance
    scope: Scope | None = None  # the EvalRun whose token may write this run; None for a local run
    # The controller already applied the suite's lock policy to this attempt (cluster runs): the
    # store records `lock_policy` and does not decide again.
    admitted: bool = False


@dataclass(frozen=True)
class RunRow:
    id: str
    suite: str
    status: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    error: str | None
    cause: str | None
    owner: Owner | None
    heartbeat_at: datetime | None
    deadline_at: datetime | None
    attempt: int
    parent_run_id: str | None
    timeout_seconds: float | None
    case_count: int | None
    passed: int | None
    failed: int | None
    errored: int | None
    lock_policy: str | None
    terminated_by: str | None
    source: str | None
    scope: Scope | None = None
    # Tokens spent by the cases this attempt ran (carried-over cases excluded), summed when the run
    # closes; None while it runs, and when no case reported usage.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


@dataclass(frozen=True)
class CaseRow:
    id: str
    run_id: str
    name: str
    status: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    error: str | None
    cause: str | None
    passed: bool | None
    score: float | None
    output: str | None
    detail: str | None
    duration_ms: float | None
    carried_from: str | None
    prompt_tokens: int | None = None  # the case's model calls (target and judge); None: none reported
    completion_tokens: int | None = None
    total_tokens: int | None = None


@dataclass
class CaseEvent:
    """The latest known state of one case row, queued for the next group commit."""

    row_id: str
    run_id: str
    name: str
    status: str
    started_at: datetime
    completed_at: datetime | None = None
    error: str | None = None
    cause: str | None = None
    passed: bool | None = None
    score: float | None = None
    output: str | None = None
    detail: str | None = None
    duration_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


@dataclass(frozen=True)
class Admission:
    """The outcome of opening a run: the new row and any live runs it replaced."""

    run: RunRow
    replaced: tuple[RunRow, ...] = ()


@dataclass(frozen=True)
class FinishRequest:
    """A runner's own close of its run, as the store service receives it."""

    status: RunStatus
    cause: str | None = None
    error: str | None = None
    unsaved_cases: dict[str, str] = field(default_factory=dict)  # case row id -> why its save failed
    case_events: list[CaseEvent] = field(default_factory=list)  # latest states of rows whose saves failed


@dataclass
class SaveReport:
    failures: dict[str, str] = field(default_factory=dict)  # case row id -> error text
    fenced: bool = False  # the run row is no longer running: stop writing


@dataclass(frozen=True)
class StrandedCases:
    """Case rows left `running` under a run that is no longer running, per run."""

    run_id: str
    suite: str
    run_status: str
    cause: str  # what the repair gives them: the run's cause
    count: int


@dataclass(frozen=True)
class CaseTally:
    """A run's case verdicts counted from its case rows (a running run has no totals yet)."""

    passed: int = 0
    failed: int = 0
    errored: int = 0
    running: int = 0
    total_tokens: int | None = None  # of the cases this attempt ran


@dataclass(frozen=True)
class HistogramCounts:
    """One histogram series: cumulative (upper bound, count) pairs, then count and sum of all values."""

    buckets: tuple[tuple[float, int], ...]
    count: int
    sum: float


@dataclass(frozen=True)
class HeartbeatAge:
    run_id: str
    suite: str
    age_s: float | None


@dataclass(frozen=True)
class MetricsSnapshot:
    """What /metrics reads from the database (the process-local write metrics are kept elsewhere)."""

    runs_by_status: dict[str, int]
    terminations: dict[tuple[str, str], int]  # (cause, terminated_by) -> failed runs
    detection_delay: dict[str, HistogramCounts]  # detector -> seconds from last heartbeat to termination
    case_duration: dict[str, HistogramCounts]  # case status -> seconds
    heartbeat_ages: list[HeartbeatAge]
    tokens: dict[tuple[str, str], int] = field(default_factory=dict)  # (suite, prompt|completion) -> closed runs' sum


def case_row_id(run_id: str, case_name: str) -> str:
    return f"{run_id}/{case_name}"


def clip_output(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else _json(value)
    if len(text) > MAX_OUTPUT_CHARS:
        return text[:MAX_OUTPUT_CHARS] + f"… [truncated, {len(text)} chars]"
    return text


def clip_text(text: str | None) -> str | None:
    """An error or detail text within what the store accepts, saying how long it was (a huge exception
    message must fail nothing but its own text)."""
    if text is None or len(text) <= MAX_TEXT_CHARS:
        return text
    suffix = f"… [truncated, {len(text)} chars]"
    return text[: MAX_TEXT_CHARS - len(suffix)] + suffix


def _json(value: Any) -> str:
    import json

    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


@dataclass(frozen=True)
class CaseDifference:
    """A case whose presence or pass verdict differs between two runs (status None: no row in that run)."""

    before_run_id: str
    after_run_id: str
    name: str
    before_status: str | None
    before_passed: bool | None
    after_status: str | None
    after_passed: bool | None
