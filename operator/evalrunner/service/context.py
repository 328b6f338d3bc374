"""What every handler of the service shares: the store, its worker thread, the token check."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from aiohttp import web

from ..store.duckdb_store import DuckDBStore
from .auth import TokenCheck

T = TypeVar("T")


class StoreCalls:
    """Runs store calls on one thread: DuckDB cursors are per thread, and the loop must not block."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-service")

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


STORE = web.AppKey("store", DuckDBStore)
CALLS = web.AppKey("calls", StoreCalls)
TOKENS = web.AppKey("tokens", TokenCheck)
STARTED = web.AppKey("started", float)
HEALTH = web.AppKey("health", object)
ON_CHANGE = web.AppKey("on_change", object)  # called with a run's scope when it starts or finishes


def dumps(data: Any) -> str:
    return json.dumps(data, default=str)


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def http_error(error_class: type[web.HTTPException], message: str, **extra: Any) -> web.HTTPException:
    return error_class(text=dumps({"error": message, **extra}), content_type="application/json")
