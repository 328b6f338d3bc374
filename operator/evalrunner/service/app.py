"""aiohttp application: the runner API, the /evals page, /metrics, health, and shared plumbing.

The DuckDB store is synchronous and must be written by one thread at a time,
so every store call goes through one worker thread (`StoreThread`); handlers
stay thin and the event loop never blocks on the file. Case batches and
heartbeats, the bulk of the runner API, go through the ingest queue instead
(`ingest.py`: bounded, coalesced, heartbeats first).

With `retain_days`, closed runs that ended longer ago than that are deleted
with their cases (at start, then every `RETENTION_INTERVAL_S`), in bounded
batches on the writer; each pass that deletes anything logs
`store.retention_deleted`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from datetime import timedelta
from typing import Awaitable, Callable

from aiohttp import web

from .. import log, recovery
from ..store.duckdb_store import DuckDBStore, utcnow
from . import api, local_cli, metrics, openapi, page, read_access
from .admin_session import AdminSessions
from .auth import PodTokenCheck, RunScopes, TokenCheck
from ..store.thread import StoreThread
from ..timing import HEARTBEAT_LEASE_S
from .context import CALLS, HEALTH, INGEST, ON_CHANGE, POD_TOKENS, RUN_SCOPES, STARTED, STORE, TOKENS, json_error
from .ingest import MAX_PENDING_EVENTS, Ingest

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
RETENTION_INTERVAL_S = 3600.0
RETENTION_DELETED = "store.retention_deleted"
READY_TIMEOUT_S = 5.0  # a store call slower than this is "not ready": runners' writes would time out too


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
    read_token: str | None = None,
    secure_cookies: bool | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    sweep_interval_s: float | None = None,
    liveness: recovery.LivenessCheck | None = None,
    health: Callable[[], tuple[bool, dict]] | None = None,
    on_change: Callable[[str | None], None] | None = None,
    heartbeat_timeout_s: float = HEARTBEAT_LEASE_S,
    max_pending_events: int = MAX_PENDING_EVENTS,
    retain_days: float = 0,
    local_token: str | None = None,
    pod_tokens: PodTokenCheck | None = None,
) -> web.Application:
    """The service app. With `sweep_interval_s`, orphans are swept in the background too.

    The same app serves the /evals page and /metrics, so `evalrunner serve`
    and the controller both show them. `admin_token` also enables the page's
    terminate action (through a login); without it the page is read-only.
    `read_token` makes reading the page and /metrics need a credential (read_access.py);
    `secure_cookies` makes every session cookie Secure (behind a TLS-terminating proxy).
    `heartbeat_timeout_s` is the lease the page and /metrics judge stuck runs by.
    `local_token` (the one in `<db>.server.json`) lets this host's user run CLI commands through it.
    `pod_tokens` (the controller's) turns a runner pod's service-account token into its one run.
    `max_pending_events` bounds the case events waiting for the writer (past it: 503).
    `retain_days` > 0 deletes closed runs that ended longer ago (0 keeps everything).
    """
    app = web.Application(client_max_size=max_body_bytes, middlewares=[errors_as_json])
    calls = StoreThread(name="store-service")
    app[STORE] = store
    app[CALLS] = calls
    app[TOKENS] = TokenCheck(store.scope_for_token, admin_token, local_token,
                             revocations=lambda: store.tokens_revoked)
    app[RUN_SCOPES] = RunScopes()
    app[POD_TOKENS] = pod_tokens
    ingest = Ingest(store, max_pending_events=max_pending_events)
    app[INGEST] = ingest
    app[STARTED] = time.time()
    app[HEALTH] = health
    app[ON_CHANGE] = on_change or (lambda scope: None)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    api.add_routes(app)
    openapi.add_routes(app)  # the runner API's OpenAPI document, no token needed
    if local_token:  # the CLI of this host's user, working through the server (local_cli.py)
        local_cli.add_routes(app, local_token)
    page_liveness = liveness or (lambda owner: recovery.local_liveness(owner))
    admin_sessions = AdminSessions(admin_token)
    reading = read_access.ReadAccess(read_token, admin_token, admin_sessions)
    app.middlewares.append(read_access.middleware(reading))
    page.add_routes(app, page.PageSettings(admin_sessions, page_liveness, heartbeat_timeout_s, reading, secure_cookies))
    app_metrics = metrics.Metrics(page_liveness, heartbeat_timeout_s)
    store.transaction_observer = app_metrics.writes.observe
    store.track_case_durations(metrics.CASE_DURATION_BUCKETS)  # one scan now, none per scrape
    metrics.add_routes(app, app_metrics)

    async def stop_calls(_app: web.Application) -> None:
        await asyncio.to_thread(ingest.stop)  # what is queued is written first
        if ingest.stats.writes:
            log.get().info("service.ingest_stats", **dataclasses.asdict(ingest.stats))
        calls.shutdown()

    app.on_cleanup.append(stop_calls)
    if sweep_interval_s:
        app.cleanup_ctx.append(_sweeper(store, calls, sweep_interval_s, liveness))
    if retain_days and retain_days > 0:
        app.cleanup_ctx.append(_retention(store, retain_days, RETENTION_INTERVAL_S))
    return app


def delete_expired(store: DuckDBStore, retain_days: float) -> None:
    """One retention pass (on the caller's thread; its transactions run on the writer) and its log line."""
    cutoff = utcnow() - timedelta(days=retain_days)
    size_before = _file_size(store.path)
    started = time.perf_counter()
    deleted = store.delete_expired_runs(cutoff)
    if deleted.runs:
        log.get().info(
            RETENTION_DELETED, runs=deleted.runs, cases=deleted.cases, batches=deleted.batches, run_ids=deleted.run_ids,
            retain_days=retain_days, completed_before=cutoff.isoformat(), seconds=round(time.perf_counter() - started, 3),
            checkpointed=deleted.checkpointed, checkpoint_error=deleted.checkpoint_error,
            file_bytes_before=size_before, file_bytes_after=_file_size(store.path),
        )


def _file_size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _retention(store: DuckDBStore, retain_days: float, interval_s: float):
    # Not on the store thread: the pass takes the writer in short turns, and the API's reads must not
    # wait for all of it.
    return _every(interval_s, lambda: asyncio.to_thread(delete_expired, store, retain_days), "store.retention_failed")


def _sweeper(store: DuckDBStore, calls: StoreThread, interval_s: float, liveness: recovery.LivenessCheck | None):
    return _every(interval_s, lambda: calls(lambda: recovery.sweep(store, utcnow(), liveness=liveness,
                                                                 db_path=store.path)),
                  "service.sweep_failed")


def _every(interval_s: float, step: Callable[[], Awaitable[object]], failed_event: str):
    """A background task for the app's lifetime: `step` now, then every `interval_s`."""
    async def forever() -> None:
        while True:
            try:
                await step()
            except Exception as exc:  # tried again next interval; say so, don't die
                log.get().error(failed_event, error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(interval_s)

    async def ctx(_app: web.Application):
        task = asyncio.create_task(forever())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return ctx


async def _store_answers(request: web.Request) -> tuple[bool, dict]:
    try:
        version = await asyncio.wait_for(request.app[CALLS](request.app[STORE].schema_version), READY_TIMEOUT_S)
    except Exception as exc:  # the point of a health check is to say so, not to crash
        return False, {"store": f"unavailable: {type(exc).__name__}: {exc}"}
    return True, {"schema_version": version}


def _loops_alive(request: web.Request) -> tuple[bool, dict]:
    if request.app[HEALTH] is None:  # `serve`: nothing but the event loop, which is answering
        return True, {}
    return request.app[HEALTH]()


def _answer(request: web.Request, ok: bool, details: dict) -> web.Response:
    body = {"ok": ok, **details, "uptime_s": time.time() - request.app[STARTED]}
    return web.json_response(body, status=200 if ok else 503)


async def livez(request: web.Request) -> web.Response:
    """Liveness: the process's loops still turn (the controller's scan and refresh). Never the store or API."""
    return _answer(request, *_loops_alive(request))


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the store answers, so runners can report here. Not the Kubernetes API's health."""
    return _answer(request, *await _store_answers(request))


async def healthz(request: web.Request) -> web.Response:
    """Both at once, for a human or a simple check: 503 if either fails."""
    ready, store = await _store_answers(request)
    alive, loops = _loops_alive(request)
    return _answer(request, ready and alive, {**store, **loops})
