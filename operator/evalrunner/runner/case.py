"""Run one case: call the target, then score the output, both under the case timeout."""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable

from .. import case_context
from ..models import Case, Cause, RunStatus
from ..scorers import Score
from .deadlines import Deadlines
from ..usage import NONE, Usage


@dataclass(frozen=True)
class CaseOutcome:
    """`completed` means evaluated (pass or fail); `failed` means it could not be evaluated."""

    status: RunStatus
    passed: bool | None = None
    score: float | None = None
    output: Any = None
    detail: str | None = None
    error: str | None = None
    cause: Cause | None = None
    duration_ms: float = 0.0
    usage: Usage = NONE  # tokens of the case's model calls: the target's and a judge's

    @property
    def verdict(self) -> str:
        if self.status is RunStatus.FAILED:
            return "error"
        return "pass" if self.passed else "fail"


Invoke = Callable[[Any], Awaitable[Any]]
ScoreFn = Callable[[Any, Any, Case], "Score | Awaitable[Score]"]


async def execute_case(case: Case, invoke: Invoke, score: ScoreFn, timeout_s: float,
                       deadlines: Deadlines | None = None) -> CaseOutcome:
    """Never raises for target or scorer errors: they become a `failed` outcome.

    Cancellation (shutdown, fencing) propagates, so the caller decides how the
    case row ends. A run passes its `Deadlines` (one timer for all its cases);
    without, the case gets a timer of its own.
    """
    with case_context.CaseContext(timeout_s) as context:
        outcome = await _evaluate(case, invoke, score, timeout_s, deadlines)
    return outcome if context.usage is NONE else replace(outcome, usage=context.usage)


async def _evaluate(case: Case, invoke: Invoke, score: ScoreFn, timeout_s: float,
                    deadlines: Deadlines | None) -> CaseOutcome:
    started = time.perf_counter()
    deadline = asyncio.get_running_loop().time() + timeout_s

    def elapsed() -> float:
        return (time.perf_counter() - started) * 1000

    try:
        async with deadlines.watch(timeout_s) if deadlines is not None else asyncio.timeout(timeout_s):
            output = await invoke(case.input)
    except TimeoutError:
        return CaseOutcome(
            RunStatus.FAILED, error=f"timed out after {timeout_s:g}s", cause=Cause.CASE_TIMEOUT, duration_ms=elapsed()
        )
    except Exception as exc:
        return CaseOutcome(RunStatus.FAILED, error=_describe(exc), cause=Cause.CASE_RAISED, duration_ms=elapsed())
    try:
        result = score(output, case.expected, case)
        if inspect.isawaitable(result):  # a judge calls a model: within what is left of the timeout
            async with asyncio.timeout_at(deadline):
                result = await result
    except TimeoutError:
        return CaseOutcome(
            RunStatus.FAILED, output=output, error=f"timed out after {timeout_s:g}s (while scoring)",
            cause=Cause.CASE_TIMEOUT, duration_ms=elapsed(),
        )
    except Exception as exc:
        return CaseOutcome(
            RunStatus.FAILED, output=output, error=f"scorer raised {_describe(exc)}", cause=Cause.CASE_RAISED,
            duration_ms=elapsed(),
        )
    return CaseOutcome(
        RunStatus.COMPLETED, passed=result.passed, score=result.score, output=output, detail=result.detail,
        duration_ms=elapsed(),
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
