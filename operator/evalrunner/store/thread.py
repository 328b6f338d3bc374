"""One thread for a store's blocking calls, awaited from asyncio.

DuckDB cursors belong to one thread, and a blocking call must never stall an
event loop: the runner (for its recorder) and the store service (for its
handlers) each send every store call through one of these.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class StoreThread:
    def __init__(self, store: Any = None, name: str = "evalrunner-store"):
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    __call__ = call

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
