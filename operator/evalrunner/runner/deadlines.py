"""Case timeouts with one timer for every case in flight.

`asyncio.timeout()` schedules a timer per use, and a cancelled timer stays in
the event loop's heap until its time would have come. With thousands of
cases a second under a timeout of seconds, each new timer is pushed into a
heap of tens of thousands through Python-level comparisons: that alone cost
more than a no-op case. Here one periodic check cancels the task of each case
that ran past its deadline, and the case's block raises `TimeoutError`, as
`asyncio.timeout()` does. A case ends at most one tick after its deadline.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

DEFAULT_TICK_S = 0.01


class Deadlines:
    def __init__(self, tick_s: float = DEFAULT_TICK_S):
        self.tick_s = tick_s
        self._watched: set[Watch] = set()
        self._checker: asyncio.Task[None] | None = None

    def watch(self, timeout_s: float) -> Watch:
        """`async with deadlines.watch(5):` raises TimeoutError if its block runs longer than 5 s."""
        return Watch(self, timeout_s)

    def _add(self, watch: Watch) -> None:
        self._watched.add(watch)
        if self._checker is None or self._checker.done():
            self._checker = asyncio.get_running_loop().create_task(self._check(), name="case-deadlines")

    def _discard(self, watch: Watch) -> None:
        self._watched.discard(watch)

    async def _check(self) -> None:
        loop = asyncio.get_running_loop()
        while self._watched:
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            for watch in [w for w in self._watched if w.deadline <= now and not w.expired]:
                watch.expire()

    async def aclose(self) -> None:
        if self._checker is not None and not self._checker.done():
            self._checker.cancel()
            await asyncio.gather(self._checker, return_exceptions=True)


class Watch:
    """One block under a deadline; the cancellation it causes becomes TimeoutError (as asyncio.timeout's)."""

    def __init__(self, deadlines: Deadlines, timeout_s: float):
        self._deadlines = deadlines
        self._timeout_s = timeout_s
        self.deadline = 0.0
        self.expired = False
        self._task: asyncio.Task | None = None
        self._cancelling = 0

    async def __aenter__(self) -> Watch:
        self._task = asyncio.current_task()
        assert self._task is not None, "a deadline needs a task to cancel"
        self._cancelling = self._task.cancelling()
        self.deadline = asyncio.get_running_loop().time() + self._timeout_s
        self._deadlines._add(self)
        return self

    def expire(self) -> None:
        self.expired = True
        assert self._task is not None
        self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._deadlines._discard(self)
        assert self._task is not None
        # Our cancellation, and no one else's since: it is a timeout (the task's other cancellations stand).
        if self.expired and exc_type is asyncio.CancelledError and self._task.uncancel() <= self._cancelling:
            raise TimeoutError from exc
