"""What every handler of the service shares: the store, its worker thread, the write queue, the caches."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..store.duckdb_store import DuckDBStore
from ..store.thread import StoreThread
from .auth import RunScopes, TokenCheck
from .ingest import Ingest

STORE = web.AppKey("store", DuckDBStore)
CALLS = web.AppKey("calls", StoreThread)  # every store call goes through it
TOKENS = web.AppKey("tokens", TokenCheck)
RUN_SCOPES = web.AppKey("run_scopes", RunScopes)
INGEST = web.AppKey("ingest", Ingest)  # case batches and heartbeats: bounded, coalesced, heartbeats first
STARTED = web.AppKey("started", float)
HEALTH = web.AppKey("health", object)
ON_CHANGE = web.AppKey("on_change", object)  # called with a run's scope when it starts or finishes
POD_TOKENS = web.AppKey("pod_tokens", object)  # auth.PodTokenCheck, or None where no cluster reviews tokens


def dumps(data: Any) -> str:
    return json.dumps(data, default=str)


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def http_error(error_class: type[web.HTTPException], message: str, **extra: Any) -> web.HTTPException:
    return error_class(text=dumps({"error": message, **extra}), content_type="application/json")
