"""The one thread that writes a store's DuckDB file, whoever asks.

A process has many threads that write: the runner's recorder, the store
service's handlers, the controller's kopf workers and its loops. DuckDB
would let each of them run a transaction on its own cursor, and then a check
made in one transaction ("the run is still running") would not see a close
committed by another meanwhile. So every write transaction of a store runs
here, one after another, in the order they were asked for: two writes of one
process never interleave, and a check inside a write sees every earlier write.

Reads stay on the caller's thread (each with its own cursor); DuckDB gives
them a consistent snapshot.

The writer shares the GIL with an event loop (the service's, the runner's).
DuckDB's Python client takes the GIL back between a statement's executor
tasks (to check for Ctrl-C), and each time it waits up to the interpreter's
switch interval behind the loop. At Python's default of 5 ms that made a
write of 6,000 case rows 2.2x slower beside a busy loop; at 0.5 ms, 1.35x
(bench/store_ingest.py measures the whole service). So a process that has a
writer switches threads at least that often.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")

SWITCH_INTERVAL_S = 0.0005


class Writer:
    def __init__(self, name: str = "evalrunner-writer"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._thread_id: int | None = None
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))

    def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the writer thread and return its result (or raise its exception).

        Called from the writer thread itself (a write that nests another), it runs inline.
        """
        if threading.get_ident() == self._thread_id:
            return fn()
        return self._pool.submit(self._on_writer, fn).result()

    def _on_writer(self, fn: Callable[[], T]) -> T:
        self._thread_id = threading.get_ident()
        return fn()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
