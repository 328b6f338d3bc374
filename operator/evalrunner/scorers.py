"""Judge a case's output against its `expected` value.

`build_scorer(spec)` returns `score(output, expected, case) -> Score`, or an
awaitable of it for the judge (which calls a model: `judge.py`). A wrong
output is a failed `Score`, never an exception; `ScorerError` means the
scorer cannot judge (an invalid regex, a custom scorer returning nonsense, a
judge reply without a score). Text scorers compare strings; a non-string
output or expected is compared as its JSON text.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import models
from .models import JsonValue
from .targets import is_async_callable, resolve_callable

DETAIL_CHARS = 200
# Slack for float rounding, so `1.01` is within `tolerance: 0.01` of `1.0`.
FLOAT_SLACK = 1e-9
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


class ScorerError(Exception):
    """The scorer cannot judge: the suite or a custom scorer is at fault, not the output."""


@dataclass(frozen=True)
class Score:
    passed: bool
    score: float
    detail: str | None = None


PASSED = Score(passed=True, score=1.0)

ScoreFn = Callable[[JsonValue, JsonValue, models.Case], "Score | Awaitable[Score]"]


def build_scorer(spec: models.Scorer, search_path: Iterable[str] = ()) -> ScoreFn:
    """`search_path`: directories importable by a custom scorer (the suite file's directory)."""
    if spec.name == "exact":
        return lambda output, expected, case: _exact(spec, output, expected)
    if spec.name == "contains":
        return lambda output, expected, case: _contains(spec, output, expected)
    if spec.name == "regex":
        return lambda output, expected, case: _regex(spec, output, expected)
    if spec.name == "json_equal":
        return lambda output, expected, case: _json_equal(output, expected)
    if spec.name == "numeric":
        return lambda output, expected, case: _numeric(spec, output, expected)
    if spec.name == "custom":
        return _custom(spec, search_path)
    if spec.name == "judge":
        from .judge import Judge  # imports aiohttp, as an http target does

        return Judge(spec)
    raise ScorerError(f"unknown scorer {spec.name!r}")


async def aclose_all(score_fns: Iterable[ScoreFn]) -> None:
    """Release what scorers hold (a judge's HTTP session); the others hold nothing."""
    for fn in set(score_fns):
        aclose = getattr(fn, "aclose", None)
        if aclose is not None:
            await aclose()


def check_patterns(suite: models.Suite) -> list[tuple[str, str]]:
    """(field path, message) for every regex case whose pattern would not compile,
    so a suite is refused at load time rather than failing case by case."""
    problems = []
    for index, case in enumerate(suite.cases):
        spec = suite.scorer_for(case)
        if spec.name != "regex":
            continue
        path = f"cases[{index} (id={case.id})].expected"
        try:
            _compile(spec, case.expected)
        except ScorerError as exc:
            problems.append((path, str(exc)))
    return problems


def _text(value: JsonValue) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _short(text: str) -> str:
    return repr(text if len(text) <= DETAIL_CHARS else text[:DETAIL_CHARS] + "...")


def _verdict(passed: bool, detail: str | None = None) -> Score:
    return Score(passed=passed, score=1.0 if passed else 0.0, detail=None if passed else detail)


# ---------------------------------------------------------------- text


def _exact(spec: models.Scorer, output: JsonValue, expected: JsonValue) -> Score:
    got, want = _text(output), _text(expected)
    if spec.strip:
        got, want = got.strip(), want.strip()
    if not spec.case_sensitive:
        got, want = got.casefold(), want.casefold()
    if got == want:  # the common case: no detail to format
        return PASSED
    return _verdict(False, f"expected {_short(want)}, got {_short(got)}")


def _contains(spec: models.Scorer, output: JsonValue, expected: JsonValue) -> Score:
    got, want = _text(output), _text(expected)
    if not spec.case_sensitive:
        got, want = got.casefold(), want.casefold()
    if want in got:
        return PASSED
    return _verdict(False, f"{_short(want)} not found in {_short(got)}")


def _compile(spec: models.Scorer, pattern: JsonValue) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise ScorerError(f"the regex scorer needs `expected` to be a pattern string, got {_text(pattern)}")
    try:
        return re.compile(pattern, 0 if spec.case_sensitive else re.IGNORECASE)
    except re.error as exc:
        raise ScorerError(f"invalid regular expression {pattern!r}: {exc}") from None


def _regex(spec: models.Scorer, output: JsonValue, expected: JsonValue) -> Score:
    pattern = _compile(spec, expected)
    got = _text(output)
    return _verdict(pattern.search(got) is not None, f"/{pattern.pattern}/ does not match {_short(got)}")


# ---------------------------------------------------------------- json


def _json_equal(output: JsonValue, expected: JsonValue) -> Score:
    if isinstance(expected, str):
        try:
            expected = json.loads(expected)
        except json.JSONDecodeError as exc:
            raise ScorerError(f"json_equal: `expected` is a string that is not JSON: {exc}") from None
    if isinstance(output, str):
        try:
            output = json.loads(output)
        except json.JSONDecodeError as exc:
            return _verdict(False, f"output is not JSON ({exc}): {_short(output)}")
    difference = _first_difference(output, expected, "$")
    return _verdict(difference is None, difference)


def _first_difference(got: Any, want: Any, path: str) -> str | None:
    """Where `got` first departs from `want`; dict key order does not matter."""
    if isinstance(want, dict) and isinstance(got, dict):
        for key in want:
            if key not in got:
                return f"{path}.{key}: missing"
        for key in got:
            if key not in want:
                return f"{path}.{key}: unexpected key"
        for key in want:
            found = _first_difference(got[key], want[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(want, list) and isinstance(got, list):
        for index, (g, w) in enumerate(zip(got, want)):
            found = _first_difference(g, w, f"{path}[{index}]")
            if found:
                return found
        if len(got) != len(want):
            return f"{path}: expected {len(want)} items, got {len(got)}"
        return None
    # JSON `true` is not `1`, though Python says True == 1.
    same = type(got) is type(want) or (_is_number(got) and _is_number(want))
    if same and got == want:
        return None
    return f"{path}: expected {_short(_text(want))}, got {_short(_text(got))}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------- numeric


def _as_number(value: JsonValue) -> float | None:
    if _is_number(value):
        return float(value)  # type: ignore[arg-type]
    match = NUMBER.search(_text(value))
    return float(match.group()) if match else None


def _numeric(spec: models.Scorer, output: JsonValue, expected: JsonValue) -> Score:
    want = _as_number(expected)
    if want is None or not math.isfinite(want):
        raise ScorerError(f"the numeric scorer needs a number in `expected`, got {_text(expected)}")
    got = _as_number(output)
    if got is None:
        return _verdict(False, f"no number in output {_short(_text(output))}")
    difference = abs(got - want)
    allowed = max(spec.tolerance, spec.relative_tolerance * abs(want))
    passed = difference <= allowed + FLOAT_SLACK * max(1.0, abs(want))
    return Score(passed, 1.0 if passed else 0.0, f"expected {want:g}, got {got:g} (difference {difference:g}, allowed {allowed:g})")


# ---------------------------------------------------------------- custom


def _custom(spec: models.Scorer, search_path: Iterable[str]) -> ScoreFn:
    """Call `module:function(output, expected, case)`. Its result may be:
    a bool; a float in [0, 1] (passed when >= 0.5); (bool, float) or
    (bool, float, detail); or a `Score`."""
    assert spec.callable is not None  # guaranteed by models.Scorer
    name = spec.callable
    try:
        function = resolve_callable(name, search_path)
    except LookupError as exc:
        raise ScorerError(f"custom scorer: {exc}") from exc.__cause__
    if is_async_callable(function):
        raise ScorerError(f"custom scorer {name!r} is async; it must be a plain function")

    def score(output: JsonValue, expected: JsonValue, case: models.Case) -> Score:
        try:
            result = function(output, expected, case)
        except Exception as exc:
            raise ScorerError(f"custom scorer {name!r} raised {type(exc).__name__}: {exc}") from exc
        return _to_score(name, result)

    return score


def _to_score(name: str, result: Any) -> Score:
    if isinstance(result, Score):
        return result
    if isinstance(result, bool):
        return _verdict(result, None)
    if _is_number(result):
        value = _unit_interval(name, result)
        return Score(value >= 0.5, value)
    if (
        isinstance(result, tuple)
        and len(result) in (2, 3)
        and isinstance(result[0], bool)
        and _is_number(result[1])
        and (len(result) == 2 or result[2] is None or isinstance(result[2], str))
    ):
        return Score(result[0], _unit_interval(name, result[1]), result[2] if len(result) == 3 else None)
    raise ScorerError(
        f"custom scorer {name!r} returned {type(result).__name__} {result!r:.100}; "
        "expected bool, a float in [0, 1], (bool, float) or Score"
    )


def _unit_interval(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ScorerError(f"custom scorer {name!r} returned score {value}; scores lie in [0, 1]")
    return float(value)
