"""Synchronous target calls on threads the process does not wait for.

A sync function cannot be interrupted. When its case times out, the case is
decided (`case_timeout`) and the run goes on, but the thread keeps running
the call. On asyncio's default executor, and on any ThreadPoolExecutor,
the interpreter joins such threads at exit, so a run whose cases were all
decided would sit until the slowest abandoned call returned (`mixed.yaml`:
4 s for 1 s of cases). These workers are daemon threads: the process ends
when its work is done, and an abandoned call ends with it.

Workers are reused; a new one starts only when none is idle, so a stuck
call never delays the next case.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable

Work = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, asyncio.Future]


class DaemonPool:
    def __init__(self, name: str = "sync-target"):
        self.name = name
        self._work: queue.SimpleQueue[Work] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._started = 0

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._idle == 0:
                self._started += 1
                threading.Thread(target=self._worker, name=f"{self.name}-{self._started}", daemon=True).start()
            else:
                self._idle -= 1
        self._work.put((fn, args, loop, future))
        return await future

    def _worker(self) -> None:
        while True:
            fn, args, loop, future = self._work.get()
            try:
                outcome, value = True, fn(*args)
            except BaseException as exc:  # handed to the awaiting case, as an awaited call would raise it
                outcome, value = False, exc
            try:
                loop.call_soon_threadsafe(_settle, future, outcome, value)
            except RuntimeError:
                pass  # the loop is closed: nobody waits for this call any more
            with self._lock:
                self._idle += 1


def _settle(future: asyncio.Future, ok: bool, value: Any) -> None:
    if future.done():  # the case timed out and stopped waiting
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


SYNC_CALLS = DaemonPool()
