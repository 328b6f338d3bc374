"""The runner API, version 1: start, report cases, heartbeat, finish.

Handlers are thin: authenticate, parse, call the store on its thread, answer.
Every call is idempotent so runners can retry after a lost response.

Every request is authenticated and every run's scope checked; what the token
table and the run rows said is cached (`auth.TokenCheck`, `auth.RunScopes`),
so most requests reach the store only for their write. Case batches and
heartbeats go through the ingest queue (`ingest.Ingest`): a full queue is
answered 503 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from aiohttp import web

from .. import admission
from ..store import wire
from ..store.duckdb_store import RunIdTaken
from ..owner import Owner
from ..store.records import RunRequest, RunRow
from ..scope import Scope
from .auth import Caller, TokenRefused, bearer_token, is_service_account_token
from ..store.thread import StoreThread
from .context import CALLS, INGEST, ON_CHANGE, POD_TOKENS, RUN_SCOPES, STORE, TOKENS, http_error, json_error
from .ingest import Busy


def add_routes(app: web.Application) -> None:
    p = wire.API_PREFIX
    app.router.add_post(f"{p}/runs", start_run)
    app.router.add_get(f"{p}/runs", list_runs)
    app.router.add_get(f"{p}/runs/{{run_id}}", get_run)
    app.router.add_get(f"{p}/runs/{{run_id}}/cases", list_cases)
    app.router.add_get(f"{p}/runs/{{run_id}}/completed-cases", completed_cases)
    app.router.add_post(f"{p}/runs/{{run_id}}/cases", save_cases)
    app.router.add_post(f"{p}/runs/{{run_id}}/heartbeat", heartbeat)
    app.router.add_post(f"{p}/runs/{{run_id}}/finish", finish_run)


def _ctx(request: web.Request) -> tuple[Any, StoreThread]:
    return request.app[STORE], request.app[CALLS]


async def _caller(request: web.Request) -> Caller:
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        raise http_error(web.HTTPUnauthorized, "missing bearer token (Authorization: Bearer <token>)")
    tokens, pod_tokens = request.app[TOKENS], request.app[POD_TOKENS]
    caller = tokens.cached(token)
    if caller is None and pod_tokens is not None and is_service_account_token(token):
        try:  # a TokenReview, maybe: never on the event loop, never on the store's thread
            caller = await asyncio.to_thread(pod_tokens, token)
        except TokenRefused as exc:
            raise http_error(web.HTTPUnauthorized, f"token refused: {exc}") from None
    elif caller is None:
        caller = await request.app[CALLS](tokens.look_up, token)
    if caller is None:
        raise http_error(web.HTTPUnauthorized, "unknown bearer token (Authorization: Bearer <token>)")
    return caller


async def _body(request: web.Request) -> Any:
    try:
        text = await request.text()
    except (web.RequestPayloadError, ValueError) as exc:  # e.g. a Content-Encoding the bytes do not have
        raise http_error(web.HTTPBadRequest, f"body: could not be read: {' '.join(str(exc).split())}") from None
    try:
        return wire.loads(text)
    except wire.WireError as exc:
        raise http_error(web.HTTPBadRequest, str(exc)) from None


def _refused(exc: wire.WireError) -> web.Response:
    """A request the wire parser refused, as its 4xx: the message names the field."""
    status = 403 if isinstance(exc, wire.WireForbidden) else 413 if isinstance(exc, wire.WireTooLarge) else 400
    return json_error(status, str(exc))


async def _run_scope(request: web.Request, run_id: str) -> Scope | None:
    """The scope of a run that exists (cached: it never changes); 404 for a run that does not."""
    scopes = request.app[RUN_SCOPES]
    known, scope = scopes.get(run_id)
    if not known:
        store, calls = _ctx(request)
        run = await calls(store.get_run, run_id)
        if run is None:
            raise http_error(web.HTTPNotFound, f"no run {run_id}")
        scopes.remember(run_id, run.scope)
        scope = run.scope
    return scope


async def _readable_run_id(request: web.Request, caller: Caller) -> str:
    """The run id of the path, once the caller may read that run (a run of its own EvalRun)."""
    run_id = request.match_info["run_id"]
    if not caller.may_read(await _run_scope(request, run_id)):
        raise http_error(web.HTTPForbidden, f"this token may not access run {run_id} (it belongs to another EvalRun)")
    return run_id


async def _owned_run_id(request: web.Request, caller: Caller) -> str:
    """The run id of the path, once the caller may write that run: a runner pod, its own run only."""
    run_id = request.match_info["run_id"]
    if not caller.may_write(run_id, await _run_scope(request, run_id)):
        whose = "another pod's run" if caller.grant is not None else "another EvalRun"
        raise http_error(web.HTTPForbidden, f"this token may not write run {run_id} (it belongs to {whose})")
    return run_id


async def _owned_run(request: web.Request, caller: Caller, write: bool = True) -> RunRow:
    run_id = await (_owned_run_id if write else _readable_run_id)(request, caller)
    store, calls = _ctx(request)
    run = await calls(store.get_run, run_id)
    if run is None:  # deleted by retention since its scope was cached
        raise http_error(web.HTTPNotFound, f"no run {run_id}")
    return run


def _busy(exc: Busy) -> web.Response:
    response = json_error(503, str(exc), kind="busy", retry_after_s=round(exc.retry_after_s, 3))
    response.headers.update(exc.headers)
    return response


async def start_run(request: web.Request) -> web.Response:
    caller = await _caller(request)
    try:
        req = wire.run_request_from_json(await _body(request))
    except wire.WireError as exc:
        raise http_error(web.HTTPBadRequest, f"POST /runs: {exc}") from None
    if not caller.is_admin:
        try:
            req = runner_start(req, caller)
        except StartRefused as exc:
            raise http_error(web.HTTPForbidden, str(exc)) from None
    store, calls = _ctx(request)
    if req.parent_run_id and not caller.is_admin:  # a resume copies the parent's results: they must be its own
        parent = await calls(store.get_run, req.parent_run_id)
        if parent is not None and not caller.may_read(parent.scope):
            raise http_error(web.HTTPForbidden, f"this token may not resume run {req.parent_run_id}")
    try:
        adm = await calls(store.start_run, req)
    except admission.RunRefused as exc:
        raise http_error(web.HTTPConflict, str(exc), kind="refused", suite=exc.suite,
                     live_run_ids=list(exc.live_run_ids), owners=[]) from None
    except RunIdTaken as exc:
        raise http_error(web.HTTPConflict, str(exc), kind="run_id_taken") from None
    request.app[RUN_SCOPES].remember(adm.run.id, adm.run.scope)
    request.app[ON_CHANGE](adm.run.scope)
    for replaced in adm.replaced:
        request.app[ON_CHANGE](replaced.scope)
    return web.json_response(wire.admission_to_json(adm), status=201)


class StartRefused(Exception):
    """A start a token may not make."""


def runner_start(req: RunRequest, caller: Caller) -> RunRequest:
    """What a non-admin caller's start becomes: its own scope, its own run id, never a lock decision.

    A runner pod opens exactly the run the controller assigned to it, resuming
    exactly the run the controller named, as itself. The suite's lock policy
    was applied by the controller before it made the Job (`admitted`): the
    policy the pod names is recorded, never decided again here, so no pod can
    Replace anyone's run. A token of the store's table (tests, benchmarks; the
    product issues none) opens runs of its scope under ids it picks.
    """
    if req.scope not in (None, caller.scope):
        raise StartRefused("this token may not open runs for another EvalRun")
    grant = caller.grant
    if grant is None:
        return dataclasses.replace(req, scope=caller.scope, admitted=True)
    if req.run_id not in (None, grant.run_id):
        raise StartRefused(f"run_id: this pod may open only its own run {grant.run_id}, not {req.run_id}")
    if req.parent_run_id != grant.parent_run_id:
        raise StartRefused(f"parent_run_id: this pod resumes {grant.parent_run_id or 'no run'}, "
                           f"not {req.parent_run_id or 'no run'}")
    owner = Owner(kind="pod", namespace=grant.namespace, pod=grant.pod, pod_uid=grant.pod_uid)
    return dataclasses.replace(req, run_id=grant.run_id, scope=caller.scope, owner=owner, admitted=True)


async def get_run(request: web.Request) -> web.Response:
    run = await _owned_run(request, await _caller(request), write=False)
    return web.json_response(wire.run_row_to_json(run))


async def list_runs(request: web.Request) -> web.Response:
    """Newest first; an EvalRun token sees its own runs, the admin token all of them."""
    caller = await _caller(request)
    store, calls = _ctx(request)
    try:
        query = wire.runs_query_from_params(request.query)
    except wire.WireError as exc:
        return _refused(exc)
    runs = await calls(store.list_runs, query.status, query.suite,
                       query.limit if caller.is_admin else wire.MAX_LIST_LIMIT)
    visible = [r for r in runs if caller.may_read(r.scope)][:query.limit]
    return web.json_response({"runs": [wire.run_row_to_json(r) for r in visible]})


async def list_cases(request: web.Request) -> web.Response:
    run_id = await _readable_run_id(request, await _caller(request))
    store, calls = _ctx(request)
    cases = await calls(store.cases, run_id)
    return web.json_response({"cases": [
        {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in vars(c).items()} for c in cases
    ]})


async def completed_cases(request: web.Request) -> web.Response:
    run_id = await _readable_run_id(request, await _caller(request))
    store, calls = _ctx(request)
    return web.json_response({"names": await calls(store.completed_case_names, run_id)})


async def save_cases(request: web.Request) -> web.Response:
    caller = await _caller(request)
    run_id = await _owned_run_id(request, caller)
    ingest = request.app[INGEST]
    try:
        ingest.check_room()  # a full queue is refused before the body is read and parsed
    except Busy as exc:
        return _busy(exc)
    try:
        events = wire.case_batch_from_json(await _body(request), run_id)
    except wire.WireError as exc:
        return _refused(exc)
    try:
        saved = ingest.save_cases(events)
    except Busy as exc:
        return _busy(exc)
    # Shielded: a client that hangs up does not unqueue its batch; the answer is just not read.
    report = await asyncio.shield(asyncio.wrap_future(saved))
    return web.json_response(wire.save_report_to_json(report))


async def heartbeat(request: web.Request) -> web.Response:
    run_id = await _owned_run_id(request, await _caller(request))
    alive = await asyncio.shield(asyncio.wrap_future(request.app[INGEST].heartbeat(run_id)))
    return web.json_response({"alive": alive})


async def finish_run(request: web.Request) -> web.Response:
    run = await _owned_run(request, await _caller(request))
    try:
        req = wire.finish_request_from_json(await _body(request), run.id)
    except wire.WireError as exc:
        return _refused(exc)
    store, calls = _ctx(request)
    closed = await calls(store.finish_run, run.id, req.status, req.cause, req.error, req.unsaved_cases,
                         case_events=req.case_events)
    if closed is not None:
        request.app[ON_CHANGE](closed.scope)
        return web.json_response({"applied": True, "run": wire.run_row_to_json(closed)})
    current = await calls(store.get_run, run.id)
    if current is None:  # deleted by retention meanwhile
        raise http_error(web.HTTPNotFound, f"no run {run.id}")
    # A retry of a finish that already landed is a success, not a fence.
    replay = current.terminated_by == "runner" and current.status == req.status.value and current.cause == req.cause
    return web.json_response({"applied": replay, "run": wire.run_row_to_json(current)})
