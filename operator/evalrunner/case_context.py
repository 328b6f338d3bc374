"""What a target or scorer knows of the case it is working for, without being handed it.

`execute_case` enters a `CaseContext` around each case (one asyncio task per
case, so each has its own). Model calls read it: a retry whose wait would end
past the case's deadline is not started, and the tokens every call used (the
target's and a judge scorer's) add up to the case's usage. Outside a case (a
target called on its own) there is no deadline and usage is not recorded.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token

from .usage import NONE, Usage


class CaseContext:
    """`with CaseContext(timeout_s) as context:` makes it current for the block. A plain class
    rather than a generator-based context manager: it runs once per case."""

    def __init__(self, timeout_s: float):
        self.deadline = time.monotonic() + timeout_s
        self.usage: Usage = NONE
        self._token: Token[CaseContext | None] | None = None

    def __enter__(self) -> CaseContext:
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _current.reset(self._token)


_current: ContextVar[CaseContext | None] = ContextVar("evalrunner_case", default=None)


def seconds_left(now: float) -> float | None:
    """Until the current case's deadline (`now` on time.monotonic's scale); None outside a case."""
    context = _current.get()
    return None if context is None else context.deadline - now


def add_usage(usage: Usage) -> None:
    context = _current.get()
    if context is not None:
        context.usage += usage
