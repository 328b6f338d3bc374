"""The fast path of case-event parsing never accepts what the checked parse refuses, and agrees with it.

`wire._plain_case_event` answers only "plainly valid"; anything else goes to
`wire._checked_case_event`, which decides and words the error. Hypothesis
mutates a valid event one or more fields at a time (wrong types, bounds,
NaN and infinities, bools for numbers, non-ASCII and lone surrogates,
another run's row, unknown keys, timestamps out of range) and checks, for
every input: when the fast path returns an event, the checked parse returns
the same event; when the checked parse refuses, the fast path returned
None. The public entry point behaves as the checked parse does.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from evalrunner.store import CaseEvent, wire
from evalrunner.store.records import MAX_TEXT_CHARS

RUN = "uid-1234-suite-a1"
VALID: dict[str, Any] = wire.case_event_to_json(CaseEvent(
    f"{RUN}/c000001", RUN, "c000001", "completed", datetime(2026, 12, 3, 14, 0, tzinfo=timezone.utc),
    datetime(2026, 12, 3, 14, 0, 1, tzinfo=timezone.utc), error=None, cause=None, passed=True, score=0.5,
    output="ok", detail="d", duration_ms=1.5, prompt_tokens=3, completion_tokens=4, total_tokens=7))

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1e308, 1e308, 1e15, 1e16, 2**31 - 1, 2**31]),
    st.text(max_size=20), st.sampled_from(["", "é", "\ud800", "a/b", "x" * 64, "x" * 600, "x" * (MAX_TEXT_CHARS + 1),
                                           "running", "completed", "failed", "timeout", "oom", "c000001",
                                           f"{RUN}/c000001", "other-run/c000001", "other-run",
                                           "2026-12-03T14:00:00", "2026-12-03T14:00:00+00:00", "1969-12-31T00:00:00",
                                           "9000-01-01T00:00:00+00:00", "2026-13-40", "2026-12-03T14:00:00.123456Z"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def events(draw) -> Any:
    if draw(st.integers(0, 20)) == 0:
        return draw(ODD_VALUES)  # not an object at all
    event = dict(VALID)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*wire.CASE_EVENT_FIELDS, "unknown"]))
        if draw(st.integers(0, 8)) == 0:
            event.pop(key, None)
        else:
            event[key] = draw(ODD_VALUES)
    if draw(st.integers(0, 10)) == 0:  # a run id of its own, its row id made to match
        event["run_id"] = draw(ODD_VALUES)
        if isinstance(event["run_id"], str) and isinstance(event.get("name"), str):
            event["row_id"] = f"{event['run_id']}/{event['name']}"
    return event


def checked(data: Any, run_id: str | None) -> CaseEvent | str:
    try:
        return wire._checked_case_event(data, 0, run_id, "events")
    except wire.WireError as exc:
        return f"{type(exc).__name__}: {exc}"


def same(a: CaseEvent, b: CaseEvent) -> bool:
    def normal(v):
        return "nan" if isinstance(v, float) and math.isnan(v) else v
    return [normal(getattr(a, f)) for f in wire.CASE_EVENT_FIELDS] == [normal(getattr(b, f)) for f in wire.CASE_EVENT_FIELDS]


# Rare draws, always tried: a run id that is not ASCII (one not even valid Unicode) with its row id to match.
@example({**VALID, "run_id": "\ud800", "row_id": "\ud800/c000001"}, None)
@example({**VALID, "run_id": "é", "row_id": "é/c000001"}, None)
@example({**VALID, "score": 10**400}, RUN)
@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(events(), st.sampled_from([RUN, None, "other-run"]))
def test_the_fast_path_never_accepts_what_the_checked_parse_refuses(data, run_id):
    fast = wire._plain_case_event(data, run_id)
    slow = checked(data, run_id)
    if fast is not None:
        assert isinstance(slow, CaseEvent), f"fast path accepted {data!r}; checked parse said {slow}"
        assert same(fast, slow)
    public: CaseEvent | str
    try:
        public = wire.case_event_from_json(data, 0, run_id)
    except wire.WireError as exc:
        public = f"{type(exc).__name__}: {exc}"
    assert public == slow if isinstance(slow, str) else same(public, slow)


def test_a_plain_event_takes_the_fast_path():
    event = wire._plain_case_event(dict(VALID), RUN)
    assert event is not None and same(event, wire._checked_case_event(dict(VALID), 0, RUN, "events"))


@pytest.mark.parametrize("change", [
    {"score": float("nan")}, {"score": True}, {"duration_ms": -1}, {"prompt_tokens": 2**31}, {"passed": 1},
    {"status": "stuck"}, {"cause": "<script>"}, {"row_id": "other/c000001"}, {"name": "a/b"},
    {"started_at": "1969-12-31T00:00:00+00:00"}, {"output": "\ud800"}, {"extra": 1},
])
def test_a_bad_event_is_refused_with_the_checked_parse_s_message(change):
    with pytest.raises(wire.WireError) as refused:
        wire.case_event_from_json({**VALID, **change}, 7, RUN)
    assert "events[7]" in str(refused.value)
