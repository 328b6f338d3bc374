"""Which EvalRuns need reconciling: a set that events fill and the refresh loop drains.

An EvalRun is marked by anything that may change what it should do next or
what its status says: its own events, a runner pod's death, a Job's change, a
run that its runner opened or closed through the store service. The refresh
loop reconciles each marked EvalRun once, however many events marked it, so a
burst of pod events never queues the fast row closes behind slow rebuilds.
"""

from __future__ import annotations

import threading

from ..scope import Scope

EvalRunKey = tuple[str, str]  # (namespace, name)


class ReconcileQueue:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._marked: set[EvalRunKey] = set()

    def mark(self, namespace: str, name: str) -> None:
        with self._lock:
            self._marked.add((namespace, name))

    def mark_scope(self, scope: Scope | None) -> None:
        if scope is not None:
            self.mark(*scope.evalrun)

    def drain(self) -> set[EvalRunKey]:
        with self._lock:
            marked, self._marked = self._marked, set()
        return marked

    def __len__(self) -> int:
        with self._lock:
            return len(self._marked)
