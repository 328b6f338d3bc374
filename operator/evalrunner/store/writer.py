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
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class Writer:
    def __init__(self, name: str = "evalrunner-writer"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._thread_id: int | None = None

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
