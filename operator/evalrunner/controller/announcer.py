"""`RunTerminated` Events posted off the hot path, by one thread of their own.

Closing a dead pod's row is what must happen within a second; the Event that
tells `kubectl describe` about it costs two API calls (read the EvalRun, post
the Event). Posted inline, a burst of deaths would queue each close behind
the previous deaths' Events. So the closers hand the Event here and move on.
The queue is bounded: past `MAX_PENDING` an Event is dropped with a log line
(the row, which is the record, is closed either way).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from .. import log
from ..store.records import RunRow
from .deaths import announce_termination

MAX_PENDING = 10_000


class Announcer:
    def __init__(self, kube: Any, max_pending: int = MAX_PENDING):
        self.kube = kube
        self._pending: queue.Queue[tuple[RunRow, str | None] | None] = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="announcer", daemon=True)
        self.log = log.get(component="controller")

    def start(self) -> Announcer:
        self._thread.start()
        return self

    def __call__(self, closed: RunRow, reason: str | None) -> None:
        try:
            self._pending.put_nowait((closed, reason))
        except queue.Full:
            self.log.warning("controller.event_not_posted", run_id=closed.id, reason="RunTerminated",
                             error=f"{self._pending.maxsize} Events already waiting")

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self._pending.put((None), timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._pending.get()) is not None:
            announce_termination(self.kube, *item)  # logs its own failures
