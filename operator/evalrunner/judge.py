"""The judge scorer: a model grades the output against a rubric.

The rubric's `{input}`, `{output}` and `{expected}` are replaced by the
case's (values that are not text, as JSON), and the result is sent like a
case input to an http target with the scorer's `http` settings: the same
formats, retries and rate limits (the judge's own, shared by the cases it
grades in a run), within what is left of the case's timeout. Its tokens add
up to the case's usage, with the target's: both were spent on the case.

The score is read from the reply, the first of these that is there:

1. JSON with a numeric `score`: the reply itself, or an object inside it
   (a fenced ```json block, say);
2. a `SCORE: <number>` line (any case; the last one, so a reasoning that
   quotes the format first does not count);
3. the whole reply being a number.

It is divided by `max_score` and must then lie in [0, 1]; the case passes at
`threshold` or above. A reply with no score, a score off the scale or a call
that fails is the scorer failing to judge (`ScorerError`): the case is
`failed` with cause `case_raised`, as with any scorer that cannot judge.
"""

from __future__ import annotations

import json
import re
from typing import Any

from . import models
from .http_target import HttpInvoke
from .models import JsonValue
from .scorers import DETAIL_CHARS, NUMBER, Score, ScorerError
from .targets import TargetError, as_text

DEFAULT_RUBRIC = """\
You are grading an answer against a reference answer.

Input:
{input}

Reference answer:
{expected}

Answer to grade:
{output}

Is the answer correct and complete with respect to the reference? Give a one-sentence reason, \
then end with a line of the form SCORE: <a number from 0 to 1>, where 1 means fully correct."""

PLACEHOLDER = re.compile(r"\{(input|output|expected)\}")
SCORE_LINE = re.compile(rf"\bscore\s*[:=]\s*\**\s*({NUMBER.pattern})", re.IGNORECASE)


class Judge:
    """`await judge(output, expected, case)` -> Score; one per scorer spec and run, closed with `aclose`."""

    def __init__(self, spec: models.Scorer):
        assert spec.http is not None  # guaranteed by models.Scorer
        self.spec = spec
        self.rubric = spec.rubric or DEFAULT_RUBRIC
        self.invoke = HttpInvoke(spec.http)

    async def __call__(self, output: JsonValue, expected: JsonValue, case: models.Case) -> Score:
        prompt = fill(self.rubric, input=case.input, output=output, expected=expected)
        try:
            reply = await self.invoke(prompt)
        except TargetError as exc:
            raise ScorerError(f"judge call failed: {exc}") from exc
        raw = parse_score(reply)
        if raw is None:
            raise ScorerError(f"judge reply has no score (SCORE: <number>, a number or JSON {{\"score\": ...}}): "
                              f"{_short(reply)}")
        value = raw / self.spec.max_score
        if not 0.0 <= value <= 1.0:  # also rejects NaN
            raise ScorerError(f"judge score {raw:g} is off the scale 0 to {self.spec.max_score:g}: {_short(reply)}")
        verdict = "at or above" if value >= self.spec.threshold else "below"
        return Score(value >= self.spec.threshold, value,
                     f"judge: {value:.3g}, {verdict} the threshold {self.spec.threshold:g}: {_short(reply)}")

    async def aclose(self) -> None:
        await self.invoke.aclose()


def fill(rubric: str, **values: JsonValue) -> str:
    """One pass, so a placeholder inside a case's own text is left as it is."""
    return PLACEHOLDER.sub(lambda m: as_text(values[m.group(1)]), rubric)


def parse_score(reply: Any) -> float | None:
    if _is_number(reply):
        return float(reply)
    if isinstance(reply, dict):
        return _score_field(reply)
    text = as_text(reply)
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            found, _ = json.JSONDecoder().raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(found, dict) and (score := _score_field(found)) is not None:
            return score
    lines = SCORE_LINE.findall(text)
    if lines:
        return float(lines[-1])
    bare = text.strip()
    return float(bare) if NUMBER.fullmatch(bare) else None


def _score_field(data: dict[str, Any]) -> float | None:
    value = data.get("score")
    if _is_number(value):
        return float(value)
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        return float(value)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(reply: Any) -> str:
    text = " ".join(as_text(reply).split())
    return text if len(text) <= DETAIL_CHARS else text[:DETAIL_CHARS] + "..."
