"""aiohttp application: the runner API, the /evals page, /metrics, health, and shared plumbing.

The DuckDB store is synchronous and must be written by one thread at a time,
so every store call goes through one worker thread (`StoreThread`); handlers
stay thin and the event loop never blocks on the file.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from aiohttp import web

from .. import log, recovery
from ..store.duckdb_store import DuckDBStore, utcnow
from . import api, metrics, page
from .admin_session import AdminSessions
from .auth import TokenCheck
from ..store.thread import StoreThread
from ..timing import HEARTBEAT_LEASE_S
from .context import CALLS, HEALTH, ON_CHANGE, STARTED, STORE, TOKENS, json_error

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


@web.middleware
async def errors_as_json(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as exc:
        return json_error(
            413,
            f"request body too large for {request.method} {request.path}: {exc.text}. "
            f"The limit is {request.app._client_max_size} bytes; send fewer case results per request.",
        )
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return json_error(exc.status, exc.reason)
        raise


def build_app(
    store: DuckDBStore,
    admin_token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    sweep_interval_s: float | None = None,
    liveness: recovery.LivenessCheck | None = None,
    health: Callable[[], tuple[bool, dict]] | None = None,
    on_change: Callable[[str | None], None] | None = None,
    heartbeat_timeout_s: float = HEARTBEAT_LEASE_S,
) -> web.Application:
    """The service app. With `sweep_interval_s`, orphans are swept in the background too.

    The same app serves the /evals page and /metrics, so `evalrunner serve`
    and the controller both show them. `admin_token` also enables the page's
    terminate action (through a login); without it the page is read-only.
    `heartbeat_timeout_s` is the lease the page and /metrics judge stuck runs by.
    """
    app = web.Application(client_max_size=max_body_bytes, middlewares=[errors_as_json])
    calls = StoreThread(name="store-service")
    app[STORE] = store
    app[CALLS] = calls
    app[TOKENS] = TokenCheck(store.scope_for_token, admin_token)
    app[STARTED] = time.time()
    app[HEALTH] = health
    app[ON_CHANGE] = on_change or (lambda scope: None)
    app.router.add_get("/healthz", healthz)
    api.add_routes(app)
    page_liveness = liveness or (lambda owner: recovery.local_liveness(owner))
    page.add_routes(app, page.PageSettings(AdminSessions(admin_token), page_liveness, heartbeat_timeout_s))
    app_metrics = metrics.Metrics(page_liveness, heartbeat_timeout_s)
    store.transaction_observer = app_metrics.writes.observe
    metrics.add_routes(app, app_metrics)

    async def stop_calls(_app: web.Application) -> None:
        calls.shutdown()

    app.on_cleanup.append(stop_calls)
    if sweep_interval_s:
        app.cleanup_ctx.append(_sweeper(store, calls, sweep_interval_s, liveness))
    return app


def _sweeper(store: DuckDBStore, calls: StoreThread, interval_s: float, liveness: recovery.LivenessCheck | None):
    async def sweep_forever() -> None:
        while True:
            try:
                await calls(lambda: recovery.sweep(store, utcnow(), liveness=liveness, db_path=store.path))
            except Exception as exc:  # a failed sweep is retried next interval; say so, don't die
                log.get().error("service.sweep_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(interval_s)

    async def ctx(_app: web.Application):
        task = asyncio.create_task(sweep_forever())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return ctx


async def healthz(request: web.Request) -> web.Response:
    store = request.app[STORE]
    calls = request.app[CALLS]
    try:
        version = await calls(store.schema_version)
    except Exception as exc:  # the point of a health check is to say so, not to crash
        return json_error(503, f"store unavailable: {exc}")
    body = {"ok": True, "schema_version": version, "uptime_s": time.time() - request.app[STARTED]}
    if request.app[HEALTH] is not None:  # the controller: are watches and sweeps still alive?
        ok, details = request.app[HEALTH]()
        body.update(ok=ok, **details)
        if not ok:
            return web.json_response(body, status=503)
    return web.json_response(body)
