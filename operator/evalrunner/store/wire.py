"""JSON forms of the store records, shared by the store service and its HTTP client."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, fields
from datetime import datetime, timezone
from typing import Any, Mapping, NamedTuple, Sequence

import orjson

from ..models import NAME_PATTERN, Cause, LockPolicy, RunStatus
from ..owner import Owner
from ..scope import Scope
from ..timing import DEADLINE_GRACE_S
from .records import (
    MAX_OUTPUT_CHARS, MAX_TEXT_CHARS, Admission, CaseEvent, CaseRow, FinishRequest, RunRequest, RunRow, SaveReport, case_row_id,
)

API_PREFIX = "/api/v1"

# What the runner API accepts; `service/openapi.py` states the same bounds in the published spec.
# Suite and case names as suite files allow them; a case name has no '/', so a case row id
# `{run_id}/{name}` names one run's row.
NAME_RE = re.compile(NAME_PATTERN)
# A run id has no '/' either (the controller's are `{uid}-{suite}-a{n}`, local ones a timestamp).
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$"
RUN_ID_RE = re.compile(RUN_ID_PATTERN)
SCOPE_PATTERN = r"^[A-Za-z0-9._-]{1,253}/[A-Za-z0-9._-]{1,253}/[A-Za-z0-9._-]{1,253}$"  # namespace/name/uid
SCOPE_RE = re.compile(SCOPE_PATTERN)
MAX_TIMEOUT_S = 86_400.0  # per case, as a suite file allows
MAX_DEADLINE_GRACE_S = 7 * 86_400.0
MAX_LABEL_CHARS = 253  # owner fields, a scope's parts, a suite filter: Kubernetes names are no longer
MAX_SOURCE_CHARS = 4096  # a suite file's path
MAX_OUTPUT_WIRE_CHARS = MAX_OUTPUT_CHARS + 256  # runners clip outputs (records.clip_output) and say so in a suffix
MAX_EVENTS_PER_BATCH = 10_000
MAX_LIST_LIMIT = 500
RUN_STATUSES = tuple(s.value for s in RunStatus)
CAUSES = tuple(c.value for c in Cause)


class WireError(ValueError):
    """A request body that does not describe a valid record; the message names the field."""


class WireForbidden(WireError):
    """A well-formed request that reaches for rows of another run (403, not 400)."""


class WireTooLarge(WireError):
    """More items in one request than the API takes at once (413): send them in smaller requests."""


def loads(text: str) -> Any:
    """Strict JSON: NaN and Infinity are not JSON, and a nesting too deep to parse is a refusal, not a crash.

    orjson parses first: batches of case events are most of what the
    service reads, and it parses them several times faster than the
    standard library. It refuses what is not strict JSON, and more (a lone
    surrogate, nesting past 1,024 levels, a number past a double's range);
    whatever it refuses is parsed again by the standard library, which
    decides, so a body means what it meant before and a refusal keeps its
    wording. The one difference: an integer past 64 bits comes back as a
    float; every field that takes one refuses it either way.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise WireError("body: JSON nested too deeply") from None
    except ValueError as exc:
        raise WireError(f"body: not valid JSON: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _object(data: Any, field: str, allowed: frozenset[str] | set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise WireError(f"{field}: must be a JSON object")
    unknown = data.keys() - allowed
    if unknown:
        raise WireError(f"{field}: unknown field(s): {', '.join(sorted(unknown))}")
    return data


def _text(value: Any, field: str, max_chars: int, nullable: bool = True) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise WireError(f"{field}: must be a string{' or null' if nullable else ''}, not {_kind(value)}")
    if len(value) > max_chars:
        raise WireError(f"{field}: {len(value)} characters; the limit is {max_chars}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800"): not text the store can hold
            raise WireError(f"{field}: not valid Unicode text (a lone surrogate)") from None
    return value


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        shown = repr(value[:80]) if isinstance(value, str) else _kind(value)
        raise WireError(f"{field}: must match {NAME_PATTERN} (1 to 63 letters, digits, '.', '_', '-'), not {shown}")
    return value


def _names(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise WireError(f"{field}: must be a list of names, not {_kind(value)}")
    names = tuple(_name(v, f"{field}[{i}]") for i, v in enumerate(value))
    if len(set(names)) != len(names):
        seen: set[str] = set()
        twice = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
        raise WireError(f"{field}: duplicate name(s): {', '.join(twice[:5])}")
    return names


def _run_id(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not RUN_ID_RE.match(value):
        shown = repr(value[:80]) if isinstance(value, str) else _kind(value)
        raise WireError(f"{field}: must match {RUN_ID_PATTERN}, not {shown}")
    return value


def _number(value: Any, field: str, low: float, high: float, low_open: bool = False) -> float:
    """A finite JSON number in [low, high] (or (low, high]); never a string or a bool."""
    # Bounds before isfinite: an integer beyond a float's range (10**400) compares exactly, but
    # would overflow math.isfinite. NaN fails every comparison.
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (low < value if low_open else low <= value) or value > high or not math.isfinite(value):
        bound = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
        raise WireError(f"{field}: must be a number {bound}, not {value!r}"[:300])
    return float(value)


def _choice(value: Any, field: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise WireError(f"{field}: must be one of {', '.join(choices)}, not {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    return repr(value[:80]) if isinstance(value, str) else _kind(value)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_ts(value: Any, field: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise WireError(f"{field}: not an ISO 8601 timestamp: {value!r}") from None


_EARLIEST, _LATEST = datetime(1970, 1, 2, tzinfo=timezone.utc), datetime(9000, 1, 1, tzinfo=timezone.utc)


def _storable(ts: datetime) -> bool:
    """Within the years the store holds and reads back (a naive time counts as UTC)."""
    return _EARLIEST <= (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)) < _LATEST


def _request_ts(value: Any, field: str, nullable: bool) -> datetime | None:
    """A timestamp in a request: ISO 8601 text within years 1970..9000 (stored and read back as such)."""
    ts = _parse_ts(_text(value, field, 64, nullable), field)
    if ts is not None and not _storable(ts):
        raise WireError(f"{field}: must be between 1970 and 9000, not {value!r}")
    return ts


def _scope_text(scope: Scope | None) -> str | None:
    return str(scope) if scope is not None else None


def _parse_scope(value: Any, field: str) -> Scope | None:
    if value is None:
        return None
    scope = Scope.parse(value) if isinstance(value, str) and SCOPE_RE.match(value) else None
    if scope is None:
        raise WireError(f"{field}: must be namespace/name/uid, not {_shown(value)}")
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


_OWNER_FIELDS = frozenset(f.name for f in fields(Owner))
_OWNER_KINDS = ("process", "pod")


def owner_request_from_json(data: Any) -> Owner:
    """The owner of a run a request opens: every field checked (a row's owner is only ever read back)."""
    data = _object(data, "owner", _OWNER_FIELDS)
    pid = data.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < 2**31):
        raise WireError(f"owner.pid: must be a process id (an integer from 0), not {_shown(pid)}")
    started = data.get("process_started_at")
    return Owner(
        kind=_choice(data.get("kind"), "owner.kind", _OWNER_KINDS),  # type: ignore[arg-type]
        host=_text(data.get("host"), "owner.host", MAX_LABEL_CHARS),
        pid=pid,
        process_started_at=None if started is None else _number(started, "owner.process_started_at", 0, 2**40),
        namespace=_text(data.get("namespace"), "owner.namespace", MAX_LABEL_CHARS),
        pod=_text(data.get("pod"), "owner.pod", MAX_LABEL_CHARS),
        pod_uid=_text(data.get("pod_uid"), "owner.pod_uid", MAX_LABEL_CHARS),
    )


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


_RUN_REQUEST_FIELDS = frozenset(f.name for f in fields(RunRequest))


def run_request_from_json(data: Any) -> RunRequest:
    """A POST /runs body, every field checked: what the store would choke on, or store wrongly, is a WireError."""
    data = _object(data, "body", _RUN_REQUEST_FIELDS)
    for required in ("suite", "case_names", "timeout_seconds", "owner"):
        if required not in data:
            raise WireError(f"{required}: required field is missing")
    case_names = _names(data["case_names"], "case_names")
    carried = _names(data.get("carried_case_names", []), "carried_case_names")
    both = sorted(set(case_names) & set(carried))
    if both:
        raise WireError(f"carried_case_names: also in case_names (a case is run or carried, not both): "
                        f"{', '.join(both[:5])}")
    admitted = data.get("admitted", False)
    if not isinstance(admitted, bool):
        raise WireError(f"admitted: must be true or false, not {_shown(admitted)}")
    return RunRequest(
        suite=_name(data["suite"], "suite"),
        case_names=case_names,
        timeout_seconds=_number(data["timeout_seconds"], "timeout_seconds", 0, MAX_TIMEOUT_S, low_open=True),
        owner=owner_request_from_json(data["owner"]),
        lock_policy=LockPolicy(_choice(data.get("lock_policy", LockPolicy.FORBID.value), "lock_policy",
                                       [p.value for p in LockPolicy])),
        deadline_grace_seconds=_number(data.get("deadline_grace_seconds", DEADLINE_GRACE_S), "deadline_grace_seconds",
                                       0, MAX_DEADLINE_GRACE_S),
        parent_run_id=_run_id(data.get("parent_run_id"), "parent_run_id"),
        carried_case_names=carried,
        source=_text(data.get("source"), "source", MAX_SOURCE_CHARS),
        run_id=_run_id(data.get("run_id"), "run_id"),
        scope=_parse_scope(data.get("scope"), "scope"),
        admitted=admitted,
    )


class RunsQuery(NamedTuple):
    status: str | None
    suite: str | None
    limit: int


def runs_query_from_params(params: Mapping[str, str]) -> RunsQuery:
    """The query of GET /runs: `limit` 1..500 (default 50), `status`, `suite`."""
    text = params.get("limit", "50")
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_LIST_LIMIT:
        raise WireError(f"limit: must be an integer from 1 to {MAX_LIST_LIMIT}, not {text[:40]!r}")
    status = params.get("status")
    if status is not None:
        _choice(status, "status", RUN_STATUSES)
    return RunsQuery(status, _text(params.get("suite"), "suite", MAX_LABEL_CHARS), int(text))


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


def case_event_from_json(data: Any, index: int, run_id: str | None = None, where: str = "events") -> CaseEvent:
    """One case event, every field checked. With `run_id` (the run of the request's path), an event
    for another run's row is a WireForbidden."""
    return _plain_case_event(data, run_id) or _checked_case_event(data, index, run_id, where)


_NUMBER_TYPES = (int, float)
_RUN_STATUS_SET, _CAUSE_SET = frozenset(RUN_STATUSES), frozenset(CAUSES)


def _plain_text(value: Any, max_chars: int) -> bool:
    return value is None or (type(value) is str and len(value) <= max_chars and value.isascii())


def _plain_number(value: Any, low: float, high: float) -> bool:
    return value is None or (type(value) in _NUMBER_TYPES and low <= value <= high)  # NaN fails both bounds


def _plain_count(value: Any) -> bool:
    return value is None or (type(value) is int and 0 <= value < 2**31)


def _plain_case_event(data: Any, run_id: str | None) -> CaseEvent | None:
    """The common case fast: an event that plainly passes every check of `_checked_case_event`, else None.

    Events arrive by the hundred thousand, and the checked parse spends most
    of its time naming fields for errors that almost never happen. This
    path only answers "plainly valid" (ASCII text, exact types) and never
    explains: anything else, valid or not, goes to the checked parse, which
    decides and words the error. It must never accept what that parse
    refuses (tests/unit/test_wire_fast_path.py holds it to that).
    """
    if type(data) is not dict or not data.keys() <= _CASE_EVENT_FIELD_SET:
        return None
    get = data.get
    row_id, event_run_id, name, status = get("row_id"), get("run_id"), get("name"), get("status")
    if type(row_id) is not str or type(event_run_id) is not str or type(name) is not str \
            or len(event_run_id) > 2 * MAX_LABEL_CHARS or len(row_id) > 2 * MAX_LABEL_CHARS or not row_id.isascii() \
            or (run_id is not None and event_run_id != run_id) or row_id != case_row_id(event_run_id, name) \
            or not NAME_RE.match(name) or type(status) is not str or status not in _RUN_STATUS_SET:
        return None
    passed, cause, score, duration = get("passed"), get("cause"), get("score"), get("duration_ms")
    error, output, detail = get("error"), get("output"), get("detail")
    prompt, completion, total = get("prompt_tokens"), get("completion_tokens"), get("total_tokens")
    if not (_plain_text(error, MAX_TEXT_CHARS) and _plain_text(output, MAX_OUTPUT_WIRE_CHARS)
            and _plain_text(detail, MAX_TEXT_CHARS) and (passed is None or type(passed) is bool)
            and (cause is None or (type(cause) is str and cause in _CAUSE_SET)) and _plain_number(score, -1e308, 1e308)
            and _plain_number(duration, 0, 1e15) and _plain_count(prompt) and _plain_count(completion)
            and _plain_count(total)):
        return None
    started, completed = _plain_ts(get("started_at")), get("completed_at")
    if started is None:
        return None
    if completed is not None:
        completed = _plain_ts(completed)
        if completed is None:
            return None
    return CaseEvent(row_id, event_run_id, name, status, started, completed, error, cause, passed,
                     None if score is None else float(score), output, detail,
                     None if duration is None else float(duration), prompt, completion, total)


def _plain_ts(value: Any) -> datetime | None:
    """A request timestamp that plainly passes `_request_ts`, else None."""
    if type(value) is not str or len(value) > 64 or not value.isascii():
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts if _storable(ts) else None


def _checked_case_event(data: Any, index: int, run_id: str | None, where: str) -> CaseEvent:
    where = f"{where}[{index}]"
    data = _object(data, where, _CASE_EVENT_FIELD_SET)
    for required in ("row_id", "run_id", "name", "status", "started_at"):
        if required not in data:
            raise WireError(f"{where}.{required}: required field is missing")
    row_id = _text(data["row_id"], f"{where}.row_id", 2 * MAX_LABEL_CHARS, nullable=False)
    event_run_id = _text(data["run_id"], f"{where}.run_id", 2 * MAX_LABEL_CHARS, nullable=False)
    if run_id is not None and (event_run_id != run_id or not row_id.startswith(case_row_id(run_id, ""))):
        raise WireForbidden(f"{where}.row_id: {row_id[:120]!r} (run_id {event_run_id[:120]!r}) is not a row of "
                            f"run {run_id}")
    name = _name(data["name"], f"{where}.name")
    if row_id != case_row_id(event_run_id, name):
        raise WireError(f"{where}.row_id: must be {case_row_id(event_run_id, name)!r} ({{run_id}}/{{name}}), "
                        f"not {row_id[:120]!r}")
    for key in ("passed",):
        if data.get(key) is not None and not isinstance(data[key], bool):
            raise WireError(f"{where}.{key}: must be true, false or null, not {_shown(data[key])}")
    for key in TOKEN_FIELDS:  # absent from older runners: None
        count = data.get(key)
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or not 0 <= count < 2**31):
            raise WireError(f"{where}.{key}: must be a token count (an integer from 0), not {count!r}")
    score, duration = data.get("score"), data.get("duration_ms")
    cause = data.get("cause")
    return CaseEvent(
        row_id=row_id,
        run_id=event_run_id,
        name=name,
        status=_choice(data["status"], f"{where}.status", RUN_STATUSES),
        started_at=_request_ts(data["started_at"], f"{where}.started_at", nullable=False),  # type: ignore[arg-type]
        completed_at=_request_ts(data.get("completed_at"), f"{where}.completed_at", nullable=True),
        error=_text(data.get("error"), f"{where}.error", MAX_TEXT_CHARS),
        cause=None if cause is None else _choice(cause, f"{where}.cause", CAUSES),
        passed=data.get("passed"),
        score=None if score is None else _number(score, f"{where}.score", -1e308, 1e308),
        output=_text(data.get("output"), f"{where}.output", MAX_OUTPUT_WIRE_CHARS),
        detail=_text(data.get("detail"), f"{where}.detail", MAX_TEXT_CHARS),
        duration_ms=None if duration is None else _number(duration, f"{where}.duration_ms", 0, 1e15),
        prompt_tokens=data.get("prompt_tokens"),
        completion_tokens=data.get("completion_tokens"),
        total_tokens=data.get("total_tokens"),
    )


def case_events_to_json(events: Sequence[CaseEvent]) -> list[dict[str, Any]]:
    return [case_event_to_json(ev) for ev in events]


def case_events_from_json(data: Any, field: str, run_id: str | None = None) -> list[CaseEvent]:
    """A list of case events, as in a batch's `events` or a finish's `case_events` (absent means none)."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise WireError(f"{field}: must be a list of case events, not {_kind(data)}")
    if len(data) > MAX_EVENTS_PER_BATCH:
        raise WireTooLarge(f"{field}: {len(data)} case events in one request; the limit is {MAX_EVENTS_PER_BATCH}")
    return [case_event_from_json(item, i, run_id, field) for i, item in enumerate(data)]


def case_batch_from_json(data: Any, run_id: str) -> list[CaseEvent]:
    """A POST /runs/{run_id}/cases body: `{"events": [...]}`, each event a row of that run."""
    data = _object(data, "body", {"events"})
    if "events" not in data:
        raise WireError("events: required field is missing")
    return case_events_from_json(data["events"], "events", run_id)


_FINISH_FIELDS = frozenset({"status", "cause", "error", "unsaved_cases", "case_events"})


def finish_request_from_json(data: Any, run_id: str) -> FinishRequest:
    """A POST /runs/{run_id}/finish body; its case rows (events and unsaved ones) must be that run's."""
    data = _object(data, "body", _FINISH_FIELDS)
    status = _choice(data.get("status"), "status", (RunStatus.COMPLETED.value, RunStatus.FAILED.value))
    cause = data.get("cause")
    return FinishRequest(
        status=RunStatus(status),
        cause=None if cause is None else _choice(cause, "cause", CAUSES),
        error=_text(data.get("error"), "error", MAX_TEXT_CHARS),
        unsaved_cases=_unsaved_cases(data.get("unsaved_cases"), run_id),
        case_events=case_events_from_json(data.get("case_events"), "case_events", run_id),
    )


def _unsaved_cases(data: Any, run_id: str) -> dict[str, str]:
    """row id -> why its save failed; every row id is one of this run's (`{run_id}/{name}`)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WireError(f"unsaved_cases: must be an object of case row id -> error text, not {_kind(data)}")
    own = case_row_id(run_id, "")
    for row_id, error in data.items():
        if not row_id.startswith(own):
            raise WireForbidden(f"unsaved_cases: {row_id[:120]!r} is not a row of run {run_id}")
        _name(row_id[len(own):], f"unsaved_cases[{row_id[:120]!r}]")
        _text(error, f"unsaved_cases[{row_id[:120]!r}]", MAX_TEXT_CHARS, nullable=False)
    return dict(data)


def save_report_to_json(report: SaveReport) -> dict[str, Any]:
    return {"failures": report.failures, "fenced": report.fenced}


def save_report_from_json(data: dict[str, Any]) -> SaveReport:
    return SaveReport(failures=dict(data.get("failures", {})), fenced=bool(data.get("fenced")))
