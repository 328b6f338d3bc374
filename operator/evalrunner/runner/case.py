"""Run one case: call the target under the case timeout, then score the output."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ..models import Case, Cause, RunStatus
from ..scorers import Score


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

    @property
    def verdict(self) -> str:
        if self.status is RunStatus.FAILED:
            return "error"
        return "pass" if self.passed else "fail"


Invoke = Callable[[Any], Awaitable[Any]]
ScoreFn = Callable[[Any, Any, Case], Score]


async def execute_case(case: Case, invoke: Invoke, score: ScoreFn, timeout_s: float) -> CaseOutcome:
    """Never raises for target or scorer errors: they become a `failed` outcome.

    Cancellation (shutdown, fencing) propagates, so the caller decides how the
    case row ends.
    """
    started = time.perf_counter()

    def elapsed() -> float:
        return (time.perf_counter() - started) * 1000

    try:
        async with asyncio.timeout(timeout_s):
            output = await invoke(case.input)
    except TimeoutError:
        return CaseOutcome(
            RunStatus.FAILED, error=f"timed out after {timeout_s:g}s", cause=Cause.CASE_TIMEOUT, duration_ms=elapsed()
        )
    except Exception as exc:
        return CaseOutcome(RunStatus.FAILED, error=_describe(exc), cause=Cause.CASE_RAISED, duration_ms=elapsed())
    try:
        result = score(output, case.expected, case)
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
