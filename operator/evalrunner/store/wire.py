"""JSON forms of the store records, shared by the store service and its HTTP client."""

from __future__ import annotations

from dataclasses import asdict, fields
from datetime import datetime
from typing import Any, Sequence

from ..models import LockPolicy
from ..owner import Owner
from ..scope import Scope
from ..timing import DEADLINE_GRACE_S
from .records import Admission, CaseEvent, CaseRow, RunRequest, RunRow, SaveReport

API_PREFIX = "/api/v1"


class WireError(ValueError):
    """A request body that does not describe a valid record; the message names the field."""


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_ts(value: Any, field: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise WireError(f"{field}: not an ISO 8601 timestamp: {value!r}") from None


def _scope_text(scope: Scope | None) -> str | None:
    return str(scope) if scope is not None else None


def _parse_scope(value: Any, field: str) -> Scope | None:
    if value is None:
        return None
    scope = Scope.parse(value) if isinstance(value, str) else None
    if scope is None:
        raise WireError(f"{field}: must be namespace/name/uid, not {value!r}")
    return scope


def owner_to_json(owner: Owner | None) -> dict[str, Any] | None:
    return {k: v for k, v in asdict(owner).items() if v is not None} if owner else None


def owner_from_json(data: Any) -> Owner | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise WireError("owner: must be an object")
    try:
        return Owner(**data)
    except TypeError as exc:
        raise WireError(f"owner: {exc}") from None


def run_request_to_json(req: RunRequest) -> dict[str, Any]:
    data = asdict(req)
    data["owner"] = owner_to_json(req.owner)
    data["scope"] = _scope_text(req.scope)
    if not req.admitted:
        del data["admitted"]  # only the service sets it (for EvalRun tokens); older services do not know it
    data["lock_policy"] = req.lock_policy.value
    data["case_names"] = list(req.case_names)
    data["carried_case_names"] = list(req.carried_case_names)
    return data


def run_request_from_json(data: Any) -> RunRequest:
    if not isinstance(data, dict):
        raise WireError("body: must be a JSON object")
    known = {f.name for f in fields(RunRequest)}
    unknown = set(data) - known
    if unknown:
        raise WireError(f"unknown field(s): {', '.join(sorted(unknown))}")
    for required in ("suite", "case_names", "timeout_seconds", "owner"):
        if required not in data:
            raise WireError(f"{required}: required field is missing")
    try:
        return RunRequest(
            suite=str(data["suite"]),
            case_names=tuple(str(n) for n in data["case_names"]),
            timeout_seconds=float(data["timeout_seconds"]),
            owner=owner_from_json(data["owner"]),  # type: ignore[arg-type]
            lock_policy=LockPolicy(data.get("lock_policy", LockPolicy.FORBID.value)),
            deadline_grace_seconds=float(data.get("deadline_grace_seconds", DEADLINE_GRACE_S)),
            parent_run_id=data.get("parent_run_id"),
            carried_case_names=tuple(str(n) for n in data.get("carried_case_names", ())),
            source=data.get("source"),
            run_id=data.get("run_id"),
            scope=_parse_scope(data.get("scope"), "scope"),
            admitted=bool(data.get("admitted", False)),
        )
    except (TypeError, ValueError) as exc:
        raise WireError(f"invalid run request: {exc}") from None


def run_row_to_json(row: RunRow) -> dict[str, Any]:
    data = {f.name: getattr(row, f.name) for f in fields(RunRow)}
    for key, value in data.items():
        if isinstance(value, datetime):
            data[key] = value.isoformat()
    data["owner"] = owner_to_json(row.owner)
    data["scope"] = _scope_text(row.scope)
    return data


def run_row_from_json(data: dict[str, Any]) -> RunRow:
    values = dict(data)
    for key in ("created_at", "started_at", "completed_at", "heartbeat_at", "deadline_at"):
        values[key] = _parse_ts(values.get(key), key)
    values["owner"] = owner_from_json(values.get("owner"))
    values["scope"] = _parse_scope(values.get("scope"), "scope")
    return RunRow(**{f.name: values.get(f.name) for f in fields(RunRow)})


def case_row_from_json(data: dict[str, Any]) -> CaseRow:
    """A case row as `GET /runs/{id}/cases` lists it (its fields, timestamps in ISO form)."""
    values = dict(data)
    for key in ("created_at", "started_at", "completed_at"):
        values[key] = _parse_ts(values.get(key), key)
    return CaseRow(**{f.name: values.get(f.name) for f in fields(CaseRow)})


def admission_to_json(adm: Admission) -> dict[str, Any]:
    return {"run": run_row_to_json(adm.run), "replaced": [run_row_to_json(r) for r in adm.replaced]}


def admission_from_json(data: dict[str, Any]) -> Admission:
    return Admission(run_row_from_json(data["run"]), tuple(run_row_from_json(r) for r in data.get("replaced", ())))


# Sent only when known: a store service older than token usage refuses fields it does not know.
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
# Case events cross the wire by the hundred thousand: their field names are looked up once.
CASE_EVENT_FIELDS = tuple(f.name for f in fields(CaseEvent))
_CASE_EVENT_FIELD_SET = frozenset(CASE_EVENT_FIELDS)


def case_event_to_json(ev: CaseEvent) -> dict[str, Any]:
    data = {name: getattr(ev, name) for name in CASE_EVENT_FIELDS}  # flat values: no need for asdict's copies
    data["started_at"] = _ts(ev.started_at)
    data["completed_at"] = _ts(ev.completed_at)
    for key in TOKEN_FIELDS:
        if data[key] is None:
            del data[key]
    return data


def case_event_from_json(data: Any, index: int) -> CaseEvent:
    where = f"events[{index}]"
    if not isinstance(data, dict):
        raise WireError(f"{where}: must be an object")
    unknown = data.keys() - _CASE_EVENT_FIELD_SET
    if unknown:
        raise WireError(f"{where}: unknown field(s): {', '.join(sorted(unknown))}")
    for required in ("row_id", "run_id", "name", "status", "started_at"):
        if required not in data:
            raise WireError(f"{where}.{required}: required field is missing")
    if data["status"] not in ("running", "completed", "failed"):
        raise WireError(f"{where}.status: must be running, completed or failed, not {data['status']!r}")
    values = dict(data)
    values["started_at"] = _parse_ts(data["started_at"], f"{where}.started_at")
    values["completed_at"] = _parse_ts(data.get("completed_at"), f"{where}.completed_at")
    for key in TOKEN_FIELDS:  # absent from older runners: None
        count = data.get(key)
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or not 0 <= count < 2**31):
            raise WireError(f"{where}.{key}: must be a token count (an integer from 0), not {count!r}")
    return CaseEvent(**values)


def case_events_to_json(events: Sequence[CaseEvent]) -> list[dict[str, Any]]:
    return [case_event_to_json(ev) for ev in events]


def case_events_from_json(data: Any, field: str) -> list[CaseEvent]:
    """A list of case events, as in a finish request's `case_events` (absent means none)."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise WireError(f"{field}: must be a list of case events")
    try:
        return [case_event_from_json(item, i) for i, item in enumerate(data)]
    except WireError as exc:
        raise WireError(f"{field}: {exc}") from None


def save_report_to_json(report: SaveReport) -> dict[str, Any]:
    return {"failures": report.failures, "fenced": report.fenced}


def save_report_from_json(data: dict[str, Any]) -> SaveReport:
    return SaveReport(failures=dict(data.get("failures", {})), fenced=bool(data.get("fenced")))
