"""Which EvalRuns need reconciling: a set that events fill and the refresh loop drains.

An EvalRun is marked by anything that may change what it should do next or
what its status says: its own events, a runner pod's death, a Job's change, a
run that its runner opened or closed through the store service. The refresh
loop reconciles each marked EvalRun once, however many events marked it, so a
burst of pod events never queues the fast row closes behind slow rebuilds.

An EvalRun whose reconcile failed is retried after a delay that doubles with
each failure in a row (`retry_later`), up to `BACKOFF_MAX_S`: an API server
that refuses every call is not asked again five times a second per EvalRun.
A new event still marks it at once (it may be the fix), and a success
resets its delay.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..scope import Scope

EvalRunKey = tuple[str, str]  # (namespace, name)
BACKOFF_START_S, BACKOFF_MAX_S = 0.5, 60.0


def backoff_delay(failures: int) -> float:
    """The wait before the retry that follows `failures` failures in a row."""
    return min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** max(0, failures - 1))


class ReconcileQueue:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._marked: set[EvalRunKey] = set()
        self._retry_at: dict[EvalRunKey, float] = {}  # failed ones: when their retry is due
        self._failures: dict[EvalRunKey, int] = {}

    def mark(self, namespace: str, name: str) -> None:
        with self._lock:
            self._marked.add((namespace, name))

    def mark_scope(self, scope: Scope | None) -> None:
        if scope is not None:
            self.mark(*scope.evalrun)

    def retry_later(self, key: EvalRunKey) -> float:
        """Its reconcile failed: due again after its backoff. Returns the delay."""
        with self._lock:
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = backoff_delay(failures)
            self._retry_at[key] = self._clock() + delay
        return delay

    def succeeded(self, key: EvalRunKey) -> None:
        with self._lock:
            self._failures.pop(key, None)
            self._retry_at.pop(key, None)

    def drain(self) -> set[EvalRunKey]:
        """Everything marked, and the failed ones whose retry is due."""
        now = self._clock()
        with self._lock:
            marked, self._marked = self._marked, set()
            due = {key for key, at in self._retry_at.items() if at <= now}
            for key in due | marked:
                self._retry_at.pop(key, None)
        return marked | due

    def failures(self, key: EvalRunKey) -> int:
        with self._lock:
            return self._failures.get(key, 0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._marked) + len(self._retry_at)
