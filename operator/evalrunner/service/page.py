"""The /evals page: every run, its state and cause, stuck runs impossible to miss, and a safe terminate.

Server-rendered HTML with one small stylesheet shipped in the package; no
JavaScript at all, so filters are GET forms and terminate is a POST form.
Every user-provided string goes through `markup.html` (autoescaping), and
every response carries a Content-Security-Policy that allows no script, as
a second wall.

Routes:
  GET  /                         redirect to /evals
  GET  /evals                    runs, newest first: ?status=&suite=&limit=&before=|after= (keyset cursors)
  GET  /evals/runs/{run_id}      one run: fields, stuck reason, attempts, cases
  POST /evals/runs/{run_id}/terminate   admin session + CSRF token + same origin
  GET  /evals/compare?a=&b=      two runs compared case by case (compare_page.py)
  GET  /evals/suites/{suite}     a suite's history: chart and runs, regressions marked (suite_page.py)
  GET  /evals/login, POST /evals/login, POST /evals/logout
  GET  /evals/static/...         the stylesheet

With a read token (read_access.py), reading needs a credential; the login
form then takes the read token (a read-only session) or the admin token.

The terminate action is `recovery.recover_run`, the code path of
`evalrunner recover`: the run and its running cases fail in one transaction
with cause `manual`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web

from .. import recovery
from ..models import RunStatus
from ..owner import local_liveness
from ..report import duration_s, run_tokens, tokens_text, verdict
from ..store.duckdb_store import DuckDBStore, utcnow
from ..store.records import CaseRow, CaseTally, RunRow
from ..timing import HEARTBEAT_LEASE_S
from ..usage import Usage
from .admin_session import (
    AdminSessions,
    Session,
    clear_cookie,
    cross_origin_problem,
    session_of,
    set_cookie,
)
from .context import CALLS, ON_CHANGE, STORE
from .read_access import ReadAccess, clear_read_cookie, set_read_cookie
from .markup import Safe, html, join, path_segment, query
from .stuck import Stuck, heartbeat_age_s, why_stuck

PAGE_SIZE = 50
MAX_PAGE_SIZE = 100  # the largest page stays well under the 100 ms bar at 100,000 runs (bench/page_paging.py)
COMPARE_CHOICES = 20  # runs offered by a run page's compare form
STATUSES = tuple(s.value for s in RunStatus)
STATIC_DIR = Path(__file__).with_name("static")
LOGIN_FAILURE_DELAY_S = 0.5  # slows guessing; the admin token should be long and random anyway
MAX_REASON_CHARS = 500

CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

NOTICES = {  # ?notice=… picks one of these fixed texts; the query never reaches the page as text
    "terminated": "Run terminated: it is now failed with cause manual, and so are its running cases.",
    "already-closed": "Nothing to do: the run was already closed.",
    "closed-meanwhile": "The run was closed by someone else meanwhile.",
    "logged-in": "Logged in as admin. Stuck runs now offer a terminate button.",
    "logged-in-read": "Logged in to read. Terminating a run needs the admin token.",
    "logged-out": "Logged out.",
}

DISABLED_TEXT = (
    "Terminating runs from this page is disabled: no admin token is configured. Start the server with "
    "the admin token in the environment (for `evalrunner serve`: EVALRUNNER_ADMIN_TOKEN, or name another "
    "variable with --admin-token-env; in the cluster: the controller's admin-token Secret), "
    "or run `evalrunner recover RUN_ID` on the database's host."
)


@dataclass
class PageSettings:
    sessions: AdminSessions
    liveness: recovery.LivenessCheck = field(default=lambda owner: local_liveness(owner))
    heartbeat_timeout_s: float = HEARTBEAT_LEASE_S
    reading: ReadAccess = field(default_factory=lambda: ReadAccess(None))
    # True: every session cookie is Secure, as behind a TLS-terminating proxy, where this server sees
    # plain HTTP. Otherwise Secure only when this server's own connection is TLS.
    secure_cookies: bool | None = None

    @property
    def login_enabled(self) -> bool:
        return self.sessions.enabled or self.reading.required


PAGE = web.AppKey("page", PageSettings)


def add_routes(app: web.Application, settings: PageSettings) -> None:
    app[PAGE] = settings
    app.router.add_get("/", to_runs_page)
    app.router.add_get("/evals", runs_page)
    app.router.add_get("/evals/", to_runs_page)
    app.router.add_get("/evals/login", login_page)
    app.router.add_post("/evals/login", login)
    app.router.add_post("/evals/logout", logout)
    app.router.add_get("/evals/runs/{run_id}", run_page)
    app.router.add_post("/evals/runs/{run_id}/terminate", terminate)
    # Imported here: those views build on this module's layout and helpers.
    from .compare_page import compare_page
    from .suite_page import suite_page

    app.router.add_get("/evals/compare", compare_page)
    app.router.add_get("/evals/suites/{suite}", suite_page)
    app.router.add_static("/evals/static", STATIC_DIR, append_version=False)


# ---------------------------------------------------------------- reading (on the store thread)


@dataclass(frozen=True)
class Filters:
    status: str | None = None
    suite: str | None = None
    limit: int = PAGE_SIZE
    before: tuple[datetime, str] | None = None
    after: tuple[datetime, str] | None = None


class BadQuery(ValueError):
    pass


def parse_filters(q: Any) -> Filters:
    status = (q.get("status") or "").strip() or None
    if status is not None and status not in STATUSES:
        raise BadQuery(f"status: must be one of {', '.join(STATUSES)}, not {status!r}")
    suite = (q.get("suite") or "").strip() or None
    try:
        limit = int(q.get("limit") or PAGE_SIZE)
    except ValueError:
        raise BadQuery(f"limit: must be a whole number, not {q.get('limit')!r}") from None
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise BadQuery(f"limit: must be between 1 and {MAX_PAGE_SIZE}, not {limit}")
    before = parse_cursor(q.get("before"), "before")
    after = parse_cursor(q.get("after"), "after")
    if before and after:
        raise BadQuery("before and after: give one cursor, not both")
    return Filters(status, suite, limit, before, after)


def cursor(run: RunRow) -> str:
    """A keyset cursor: the row's (created_at, id), which orders runs uniquely."""
    return f"{run.created_at.isoformat()}~{run.id}"


def parse_cursor(text: str | None, name: str) -> tuple[datetime, str] | None:
    if not text:
        return None
    stamp, sep, run_id = text.partition("~")
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        when = None
    if not sep or not run_id or when is None or when.tzinfo is None:
        raise BadQuery(f"{name}: not a page cursor (follow the Newer/Older links)")
    return when, run_id


@dataclass
class RunsView:
    filters: Filters
    runs: list[RunRow]
    tallies: dict[str, CaseTally]
    stuck: dict[str, Stuck]  # every stuck running run in the database, not only this page's
    stuck_runs: list[RunRow]
    total: int
    suites: list[str]
    has_newer: bool
    has_older: bool
    now: datetime


def read_runs_view(store: DuckDBStore, filters: Filters, settings: PageSettings, now: datetime) -> RunsView:
    f = filters
    rows = store.page_runs(f.status, f.suite, f.limit + 1, before=f.before, after=f.after)
    if f.after is not None:
        has_newer, has_older = len(rows) > f.limit, True
        rows = rows[-f.limit:]
    else:
        has_newer, has_older = f.before is not None, len(rows) > f.limit
        rows = rows[: f.limit]
    running = store.running_runs()
    stuck: dict[str, Stuck] = {}
    stuck_runs = []
    for run in running:
        found = why_stuck(run, now, settings.liveness, settings.heartbeat_timeout_s)
        if found is not None:
            stuck[run.id] = found
            stuck_runs.append(run)
    tallies = store.case_tallies([r.id for r in rows if r.status == RunStatus.RUNNING.value])
    return RunsView(f, rows, tallies, stuck, stuck_runs, store.count_runs(f.status, f.suite),
                    store.suite_names(), has_newer, has_older, now)


@dataclass
class RunView:
    run: RunRow
    cases: list[CaseRow]
    attempts: list[RunRow]
    stuck: Stuck | None
    liveness: str
    now: datetime
    previous: RunRow | None = None  # the suite's finished run before this one, to compare with
    comparable: list[RunRow] = field(default_factory=list)  # the suite's latest finished runs, for the form


def read_run_view(store: DuckDBStore, run_id: str, settings: PageSettings, now: datetime) -> RunView | None:
    run = store.get_run(run_id)
    if run is None:
        return None
    return RunView(
        run, store.cases(run.id), store.attempts(run.id),
        why_stuck(run, now, settings.liveness, settings.heartbeat_timeout_s),
        settings.liveness(run.owner) if run.status == RunStatus.RUNNING.value else "",
        now,
        previous=next(iter(store.final_runs(run.suite, limit=1, before=run)), None),
        comparable=[r for r in store.final_runs(run.suite, limit=COMPARE_CHOICES + 1)
                    if r.id != run.id][:COMPARE_CHOICES],
    )


# ---------------------------------------------------------------- handlers


async def to_runs_page(request: web.Request) -> web.Response:
    return _redirect("/evals")


async def runs_page(request: web.Request) -> web.Response:
    started = time.perf_counter()
    settings = request.app[PAGE]
    try:
        filters = parse_filters(request.query)
    except BadQuery as exc:
        return _page(request, "Bad request", html('<p class="error">{}</p>', str(exc)), status=400)
    view = await request.app[CALLS](read_runs_view, request.app[STORE], filters, settings, utcnow())
    db_done = time.perf_counter()
    body = render_runs(view)
    return _page(request, "Runs", body, timing=(started, db_done))


async def run_page(request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
    started = time.perf_counter()
    run_id = request.match_info["run_id"]
    settings = request.app[PAGE]
    view = await request.app[CALLS](read_run_view, request.app[STORE], run_id, settings, utcnow())
    db_done = time.perf_counter()
    if view is None:
        return _page(request, "No such run",
                     html('<p class="error">No run with id <code>{}</code>. <a href="/evals">All runs</a></p>', run_id),
                     status=404)
    session = session_of(request, settings.sessions)
    body = render_run(view, settings.sessions, session, _here(request), error)
    return _page(request, f"Run {view.run.id}", body, status=status, timing=(started, db_done))


async def login_page(request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
    settings = request.app[PAGE]
    next_url = _local_path(request.query.get("next")) or "/evals"
    if not settings.login_enabled:
        return _page(request, "Admin login", html('<h1>Admin login</h1><p class="disabled">{}</p>', DISABLED_TEXT))
    title = "Log in" if settings.reading.required else "Admin login"
    if session_of(request, settings.sessions) is not None:
        return _page(request, title, html(
            '<h1>{}</h1><p>You are logged in as admin. <a href="{}">Continue</a></p>', title, next_url))
    if not settings.sessions.enabled and settings.reading.read_session(request) is not None:
        return _page(request, title, html(
            '<h1>{}</h1><p>You are logged in to read. <a href="{}">Continue</a></p>', title, next_url))
    body = html(
        '<h1>{title}</h1>'
        '{error}'
        '<p>{why} '
        'It is sent once; the browser then keeps a session cookie that expires in {hours} hours.</p>'
        '<form method="post" action="/evals/login" class="login">'
        '<input type="hidden" name="next" value="{next}">'
        '<label>{label} <input type="password" name="token" id="token" autocomplete="current-password" '
        'required></label> <button type="submit" id="login">Log in</button></form>',
        title=title, why=_login_why(settings), label=_token_label(settings),
        error=html('<p class="error" role="alert">{}</p>', error) if error else Safe(""),
        hours=f"{settings.sessions.ttl_s / 3600:g}", next=next_url,
    )
    return _page(request, title, body, status=status)


def _login_why(settings: PageSettings) -> str:
    if not settings.reading.required:
        return "Terminating a run needs the admin token (the one the server was started with)."
    if not settings.sessions.enabled:
        return "Reading this page needs the read token (the one the server was started with)."
    return ("Reading this page needs the read token; the admin token lets you read and also terminate runs "
            "(each is the one the server was started with).")


def _token_label(settings: PageSettings) -> str:
    if not settings.reading.required:
        return "Admin token"
    return "Read or admin token" if settings.sessions.enabled else "Read token"


async def login(request: web.Request) -> web.Response:
    """The admin token gives an admin session; the read token (when there is one) a read-only session."""
    settings = request.app[PAGE]
    sessions, reading = settings.sessions, settings.reading
    if not settings.login_enabled:
        return _page(request, "Admin login", html('<p class="disabled">{}</p>', DISABLED_TEXT), status=403)
    problem = cross_origin_problem(request)
    if problem:
        return _refused(request, problem)
    form = await request.post()
    next_url = _local_path(_text(form.get("next"))) or "/evals"
    token = _text(form.get("token"))
    if sessions.token_matches(token):
        value, session = sessions.issue()
        response = _redirect(_with_notice(next_url, "logged-in"))
        set_cookie(request, response, value, max_age=int(sessions.ttl_s), secure_cookies=settings.secure_cookies)
        if reading.required:  # the admin cookie stops at /evals; this one lets the browser read /metrics too
            set_read_cookie(request, response, reading.sessions.issue()[0], int(reading.sessions.ttl_s),
                            settings.secure_cookies)
        return response
    if reading.read_token_matches(token):
        value, session = reading.sessions.issue()
        response = _redirect(_with_notice(next_url, "logged-in-read"))
        set_read_cookie(request, response, value, int(reading.sessions.ttl_s), settings.secure_cookies)
        return response
    await asyncio.sleep(LOGIN_FAILURE_DELAY_S)
    wrong = ("That is not the admin token." if not reading.required else
             "That is neither the read token nor the admin token." if sessions.enabled else
             "That is not the read token.")
    return await login_page(request, error=wrong, status=401)


async def logout(request: web.Request) -> web.Response:
    settings = request.app[PAGE]
    problem = cross_origin_problem(request)
    if problem:
        return _refused(request, problem)
    held = [(owner, session) for owner, session in ((settings.sessions, session_of(request, settings.sessions)),
                                                    (settings.reading.sessions, settings.reading.read_session(request)))
            if session is not None]
    form = await request.post()
    if held:
        # The page's logout form carries the CSRF token of the session it was drawn for.
        if not any(owner.csrf_ok(session, _text(form.get("csrf"))) for owner, session in held):
            return _refused(request, "the form's CSRF token is missing or wrong; reload the page and try again")
        for owner, session in held:
            owner.end(session)
    # With a read token, /evals would only send a logged-out reader to the login form.
    response = _redirect("/evals/login?notice=logged-out" if settings.reading.required else "/evals?notice=logged-out")
    clear_cookie(response)
    if settings.reading.required:
        clear_read_cookie(response)
    return response


async def terminate(request: web.Request) -> web.Response:
    """Fail a running run with cause `manual`, exactly as `evalrunner recover` does."""
    settings = request.app[PAGE]
    sessions = settings.sessions
    run_id = request.match_info["run_id"]
    if not sessions.enabled:
        return _page(request, "Terminate", html('<p class="disabled">{}</p>', DISABLED_TEXT), status=403)
    problem = cross_origin_problem(request)
    if problem:
        return _refused(request, problem)
    session = session_of(request, sessions)
    if session is None:
        return _page(request, "Log in first", html(
            '<p class="error">Terminating a run needs an admin session. <a href="{}">Log in</a></p>',
            query("/evals/login", next=_run_url(run_id))), status=401)
    form = await request.post()
    if not sessions.csrf_ok(session, _text(form.get("csrf"))):
        return _refused(request, "the form's CSRF token is missing or wrong; reload the page and try again")
    store, calls = request.app[STORE], request.app[CALLS]
    run = await calls(store.get_run, run_id)
    if run is None:
        return _page(request, "No such run", html('<p class="error">No run with id <code>{}</code>.</p>', run_id),
                     status=404)
    if run.status != RunStatus.RUNNING.value:
        return _redirect(_with_notice(_run_url(run_id), "already-closed"))
    reason = " ".join(_text(form.get("reason")).split())[:MAX_REASON_CHARS]
    reason = f"{reason} (from the /evals page)" if reason else "terminated from the /evals page"
    force = _text(form.get("force")) == "yes"
    try:
        closed = await calls(recovery.recover_run, store, run, reason, force)
    except recovery.RecoveryRefused as exc:
        return await run_page(request, error=str(exc), status=409)
    request.app[ON_CHANGE](run.scope)
    return _redirect(_with_notice(_run_url(run_id), "terminated" if closed is not None else "closed-meanwhile"))


# ---------------------------------------------------------------- rendering


def render_runs(view: RunsView) -> Safe:
    parts = [Safe("<h1>Runs</h1>")]
    if view.stuck_runs:
        items = join(
            html('<li><a href="{}">{}</a> <span class="suite">{}</span>: {}</li>',
                 _run_url(r.id), r.id, r.suite, view.stuck[r.id].reason)
            for r in view.stuck_runs
        )
        n = len(view.stuck_runs)
        parts.append(html(
            '<section class="stuck-banner" role="alert" id="stuck-banner"><h2>{} stuck run{}</h2>'
            '<p>Running past its time budget, with a lost heartbeat, or with a dead owner. A detector '
            'terminates it at its deadline; an admin can terminate it now from its page.</p><ul>{}</ul></section>',
            n, "" if n == 1 else "s", items))
    parts.append(render_filters(view))
    shown = len(view.runs)
    parts.append(html('<p class="summary" id="summary">{} run{} match{}; showing {}.</p>',
                      f"{view.total:,}", "" if view.total == 1 else "s", "es" if view.total == 1 else "",
                      shown))
    if view.runs:
        rows = join(render_run_row(r, view) for r in view.runs)
        parts.append(html(
            '<table class="runs" id="runs"><thead><tr><th>Run</th><th>Suite</th><th>Status</th><th>Cause</th>'
            '<th class="num">Attempt</th><th>Started</th><th class="num">Duration</th>'
            '<th class="num">Pass</th><th class="num">Fail</th><th class="num">Error</th>'
            '<th class="num">Tokens</th></tr></thead>'
            '<tbody>{}</tbody></table>', rows))
    else:
        parts.append(Safe('<p class="empty">No runs match.</p>'))
    parts.append(render_pager(view))
    return join(parts)


def render_filters(view: RunsView) -> Safe:
    f = view.filters
    options = join(
        html('<option value="{}"{}>{}</option>', value, Safe(" selected") if value == (f.status or "") else "", label)
        for value, label in [("", "any status"), *((s, s) for s in STATUSES)]
    )
    suites = join(html('<option value="{}">', s) for s in view.suites)
    return html(
        '<form method="get" action="/evals" class="filters" id="filters">'
        '<label>Status <select name="status" id="status">{options}</select></label> '
        '<label>Suite <input type="text" name="suite" id="suite" value="{suite}" list="suite-names" '
        'placeholder="any suite"></label><datalist id="suite-names">{suites}</datalist> '
        '<label>Per page <input type="number" name="limit" min="1" max="{max}" value="{limit}"></label> '
        '<button type="submit" id="apply">Filter</button> <a href="/evals">Clear</a></form>',
        options=options, suite=f.suite or "", suites=suites, max=MAX_PAGE_SIZE, limit=f.limit,
    )


def render_run_row(run: RunRow, view: RunsView) -> Safe:
    stuck = view.stuck.get(run.id)
    if run.status == RunStatus.RUNNING.value:
        tally = view.tallies.get(run.id, CaseTally())
        counts = (tally.passed, tally.failed, tally.errored)
        tokens = tally.total_tokens
    else:
        counts = (run.passed or 0, run.failed or 0, run.errored or 0)
        tokens = run.total_tokens
    classes = f"run status-{run.status}" + (" stuck" if stuck else "")
    return html(
        '<tr class="{classes}" data-run-id="{id}" data-status="{status}">'
        '<td class="id"><a href="{url}">{id}</a></td><td class="suite"><a href="{suite_url}">{suite}</a></td>'
        '<td class="status">{badge}{stuck}</td><td class="cause">{cause}</td><td class="num">{attempt}</td>'
        '<td class="time">{started}</td><td class="num">{duration}</td>'
        '<td class="num pass">{p}</td><td class="num fail">{fl}</td><td class="num errored">{e}</td>'
        '<td class="num tokens">{tokens}</td></tr>',
        classes=classes, id=run.id, status=run.status, url=_run_url(run.id), suite=run.suite,
        suite_url=_suite_url(run.suite),
        badge=status_badge(run.status), stuck=stuck_badge(stuck), cause=run.cause or "",
        attempt=run.attempt, started=fmt_time(run.started_at or run.created_at),
        duration=fmt_duration(duration_s(run, view.now)), p=counts[0], fl=counts[1], e=counts[2],
        tokens="" if tokens is None else f"{tokens:,}",
    )


def render_pager(view: RunsView) -> Safe:
    f = view.filters
    base = {"status": f.status, "suite": f.suite, "limit": f.limit if f.limit != PAGE_SIZE else None}
    links = []
    if view.has_newer and view.runs:
        links.append(html('<a href="{}" rel="prev" id="newest">Newest</a>', query("/evals", **base)))
        links.append(html('<a href="{}" rel="prev" id="newer">&larr; Newer</a>',
                          query("/evals", **base, after=cursor(view.runs[0]))))
    if view.has_older and view.runs:
        links.append(html('<a href="{}" rel="next" id="older">Older &rarr;</a>',
                          query("/evals", **base, before=cursor(view.runs[-1]))))
    return html('<nav class="pager">{}</nav>', join(links, " "))


def render_run(view: RunView, sessions: AdminSessions, session: Session | None, here: str,
               error: str | None) -> Safe:
    run = view.run
    parts = [html('<p class="crumbs"><a href="/evals">Runs</a> / <a href="{}">{}</a></p>',
                  query("/evals", suite=run.suite), run.suite),
             html('<h1>Run <code id="run-id">{}</code> {}</h1>', run.id, status_badge(run.status))]
    if error:
        parts.append(html('<p class="error" role="alert" id="error">{}</p>', error))
    if view.stuck is not None:
        parts.append(html(
            '<section class="stuck-banner" role="alert" id="stuck"><h2>STUCK</h2><p class="why">{}</p></section>',
            view.stuck.reason))
    if run.status == RunStatus.RUNNING.value:
        parts.append(render_terminate(view, sessions, session, here))
    parts.append(render_fields(view))
    parts.append(render_attempts(view))
    parts.append(render_compare_links(view))
    parts.append(render_cases(view))
    return join(parts)


def render_fields(view: RunView) -> Safe:
    run, now = view.run, view.now
    hb_age = heartbeat_age_s(run, now)
    fields: list[tuple[str, Any]] = [
        ("Suite", run.suite),
        ("Status", status_badge(run.status)),
        ("Cause", run.cause),
        ("Error", html('<span class="error-text">{}</span>', run.error) if run.error else None),
        ("Attempt", html('{}{}', run.attempt, html(' (resumes <a href="{}">{}</a>)', _run_url(run.parent_run_id),
                                                     run.parent_run_id) if run.parent_run_id else "")),
        ("Started", fmt_time(run.started_at or run.created_at)),
        ("Completed", fmt_time(run.completed_at)),
        ("Duration", fmt_duration(duration_s(run, now))),
        ("Cases", run.case_count),
        ("Timeout per case", f"{run.timeout_seconds:g}s" if run.timeout_seconds is not None else None),
        ("Deadline", fmt_time(run.deadline_at)),
        ("Last heartbeat", html("{} ({} ago)", fmt_time(run.heartbeat_at), fmt_duration(hb_age))
         if hb_age is not None else None),
        ("Owner", html("{}{}", run.owner.describe(), f" ({view.liveness})" if view.liveness else "")
         if run.owner else None),
        ("Passed / failed / errored", f"{run.passed or 0} / {run.failed or 0} / {run.errored or 0}"
         if run.status != RunStatus.RUNNING.value else None),
        ("Tokens", tokens_text(run_tokens(run, view.cases))),
        ("Terminated by", run.terminated_by),
        ("Lock policy", run.lock_policy),
        ("Source", run.source),
        ("EvalRun", str(run.scope) if run.scope else None),
    ]
    items = join(html("<dt>{}</dt><dd>{}</dd>", name, value) for name, value in fields if value not in (None, ""))
    return html('<dl class="fields" id="fields">{}</dl>', items)


def render_terminate(view: RunView, sessions: AdminSessions, session: Session | None, here: str) -> Safe:
    run = view.run
    if not sessions.enabled:
        return html('<section class="terminate"><p class="disabled" id="terminate-disabled">{}</p></section>',
                    DISABLED_TEXT)
    if session is None:
        return html(
            '<section class="terminate"><p><a href="{}" id="login-to-terminate">Log in as admin</a> to terminate '
            'this run (it fails with cause manual, as <code>evalrunner recover</code> does).</p></section>',
            query("/evals/login", next=here))
    alive = view.liveness == "alive"
    force = html(
        '<label class="force"><input type="checkbox" name="force" value="yes"> its owner process is alive: '
        'terminate the row anyway</label>') if alive else Safe("")
    return html(
        '<section class="terminate"><h2>Terminate</h2>'
        '<form method="post" action="{action}" id="terminate-form">'
        '<input type="hidden" name="csrf" value="{csrf}">'
        '<label>Reason <input type="text" name="reason" id="reason" maxlength="{maxlen}" '
        'placeholder="recorded in the run\'s error"></label> {force}'
        '<button type="submit" class="danger" id="terminate">Terminate run {id}</button></form>'
        '<p class="hint">Fails the run and its running cases with cause <code>manual</code>, '
        'the same code path as <code>evalrunner recover</code>.</p></section>',
        action=f"{_run_url(run.id)}/terminate", csrf=session.csrf_token, maxlen=MAX_REASON_CHARS, force=force,
        id=run.id,
    )


def render_attempts(view: RunView) -> Safe:
    rows = join(
        html('<tr class="{cls}"><td class="num">{n}</td><td><a href="{url}">{id}</a></td><td>{badge}</td>'
             '<td>{cause}</td><td class="time">{started}</td><td class="num">{dur}</td></tr>',
             cls="current" if a.id == view.run.id else "", n=a.attempt, url=_run_url(a.id), id=a.id,
             badge=status_badge(a.status), cause=a.cause or "", started=fmt_time(a.started_at or a.created_at),
             dur=fmt_duration(duration_s(a, view.now)))
        for a in view.attempts
    )
    return html(
        '<h2>Attempts ({n})</h2><table class="attempts" id="attempts"><thead><tr><th class="num">#</th><th>Run</th>'
        '<th>Status</th><th>Cause</th><th>Started</th><th class="num">Duration</th></tr></thead>'
        '<tbody>{rows}</tbody></table>', n=len(view.attempts), rows=rows)


def render_compare_links(view: RunView) -> Safe:
    """Compare this run with the suite's previous finished run, or with one picked in a small form."""
    run = view.run
    history = html('<a href="{}" id="suite-history">History of suite {}</a>', _suite_url(run.suite), run.suite)
    if run.status == RunStatus.RUNNING.value:
        return html('<section class="compare" id="compare"><h2>Compare</h2>'
                    '<p class="note">A run can be compared once it has finished. {}</p></section>', history)
    previous = (html('<a href="{}" id="compare-previous">Compare with the previous run of this suite</a> '
                     '(<code>{}</code>, {})', _compare_url(view.previous.id, run.id), view.previous.id,
                     fmt_time(view.previous.started_at or view.previous.created_at))
                if view.previous else Safe('No earlier finished run of this suite.'))
    choices = join(html('<option value="{}">{} · {} passed, {} failed, {} errored</option>', r.id,
                        fmt_time(r.started_at or r.created_at), r.passed or 0, r.failed or 0, r.errored or 0)
                   for r in view.comparable)
    return html(
        '<section class="compare" id="compare"><h2>Compare</h2><p>{previous} · {history}</p>'
        '<form method="get" action="/evals/compare" class="filters" id="compare-form">'
        '<input type="hidden" name="b" value="{id}">'
        '<label>With run <input type="text" name="a" id="compare-with" list="compare-runs" required '
        'placeholder="run id or prefix"></label><datalist id="compare-runs">{choices}</datalist> '
        '<button type="submit" id="compare-submit">Compare</button></form></section>',
        previous=previous, history=history, id=run.id, choices=choices,
    )


def render_cases(view: RunView) -> Safe:
    if not view.cases:
        return Safe('<h2>Cases</h2><p class="empty">No case rows yet.</p>')
    with_tokens = any(c.total_tokens is not None for c in view.cases)  # a column only where a model reported usage
    rows = join(render_case_row(c, with_tokens) for c in view.cases)
    return html(
        '<h2>Cases ({})</h2><table class="cases" id="cases"><thead><tr><th>Case</th><th>Status</th><th>Result</th>'
        '<th class="num">Score</th><th class="num">Time</th>{}<th>Started</th><th>Output</th><th>Error</th>'
        '</tr></thead><tbody>{}</tbody></table>', len(view.cases),
        Safe('<th class="num">Tokens</th>') if with_tokens else "", rows)


def render_case_row(case: CaseRow, with_tokens: bool = False) -> Safe:
    v = verdict(case)
    error = case.error or ""
    if case.cause:
        error = f"{case.cause}: {error}" if error else case.cause
    note = html(' <span class="note">carried over from {}</span>', case.carried_from) if case.carried_from else ""
    return html(
        '<tr class="case verdict-{v}" data-case="{name}"><td class="name">{name}{note}</td>'
        '<td class="case-status">{status}</td><td>{badge}</td><td class="num">{score}</td><td class="num">{time}</td>'
        '{tokens}<td class="time">{started}</td><td class="output">{output}</td><td class="error-text">{error}</td></tr>',
        v=v, name=case.name, note=note, status=case.status, badge=html('<span class="badge verdict-{}">{}</span>', v, v),
        score="" if case.score is None else f"{case.score:.3g}",
        time="" if case.duration_ms is None else fmt_duration(case.duration_ms / 1000),
        started=fmt_time(case.started_at), output=render_output(case.output), error=error,
        tokens=html('<td class="num tokens" title="{}">{}</td>', _case_tokens_title(case),
                    "" if case.total_tokens is None else f"{case.total_tokens:,}") if with_tokens else "",
    )


def _case_tokens_title(case: CaseRow) -> str:
    return tokens_text(Usage(case.prompt_tokens, case.completion_tokens, case.total_tokens)) or "no usage reported"


def render_output(text: str | None, preview_chars: int = 80) -> Safe:
    if not text:
        return Safe("")
    flat = " ".join(text.split())
    if len(flat) <= preview_chars and "\n" not in text:
        return html("<code>{}</code>", text)
    return html("<details><summary>{}</summary><pre>{}</pre></details>", flat[:preview_chars] + "…", text)


def status_badge(status: str) -> Safe:
    return html('<span class="badge status-{}">{}</span>', status, status)


def stuck_badge(stuck: Stuck | None) -> Safe:
    if stuck is None:
        return Safe("")
    return html(' <span class="badge stuck" title="{}">STUCK</span><div class="why">{}</div>',
                stuck.reason, stuck.reason)


def fmt_time(when: datetime | None) -> str:
    if when is None:
        return ""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 0:
        return "0s"
    if seconds < 10:
        return f"{seconds:.1f}s" if seconds >= 0.1 else f"{seconds * 1000:.0f}ms"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


# ---------------------------------------------------------------- plumbing


def _page(request: web.Request, title: str, body: Safe, status: int = 200,
          timing: tuple[float, float] | None = None) -> web.Response:
    settings = request.app[PAGE]
    session = session_of(request, settings.sessions)
    notice = NOTICES.get(request.query.get("notice", ""))
    reader = settings.reading.read_session(request) if session is None else None
    if session is not None:
        who = html('<form method="post" action="/evals/logout" class="logout"><span class="admin">admin</span> '
                   '<input type="hidden" name="csrf" value="{}"><button type="submit" id="logout">Log out</button>'
                   '</form>', session.csrf_token)
    elif reader is not None:
        admin_link = (html('<a href="{}" id="login-link">Log in as admin</a> ', query("/evals/login", next=_here(request)))
                      if settings.sessions.enabled and not request.path.startswith("/evals/login") else Safe(""))
        who = html('<form method="post" action="/evals/logout" class="logout">{}'
                   '<span class="readonly" title="logged in with the read token">read-only</span> '
                   '<input type="hidden" name="csrf" value="{}"><button type="submit" id="logout">Log out</button>'
                   '</form>', admin_link, reader.csrf_token)
    elif settings.sessions.enabled and not request.path.startswith("/evals/login"):
        who = html('<a href="{}" id="login-link">Log in as admin</a>', query("/evals/login", next=_here(request)))
    elif not settings.sessions.enabled:
        who = Safe('<span class="readonly" title="no admin token configured">read-only</span>')
    else:
        who = Safe("")
    document = html(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<title>{title} · evalrunner</title><link rel="stylesheet" href="/evals/static/page.css"></head>'
        '<body><header class="top"><a class="brand" href="/evals">evalrunner</a>'
        '<nav><a href="/evals">Runs</a> <a href="/metrics">Metrics</a></nav><div class="who">{who}</div></header>'
        '<main>{notice}{body}</main></body></html>',
        title=title, who=who, body=body,
        notice=html('<p class="notice" id="notice" role="status">{}</p>', notice) if notice else Safe(""),
    )
    headers = dict(SECURITY_HEADERS)
    if timing is not None:
        started, db_done = timing
        done = time.perf_counter()
        headers["Server-Timing"] = (f"db;dur={(db_done - started) * 1000:.2f}, "
                                    f"render;dur={(done - db_done) * 1000:.2f}, total;dur={(done - started) * 1000:.2f}")
    return web.Response(text=document, status=status, content_type="text/html", charset="utf-8", headers=headers)


def _refused(request: web.Request, why: str) -> web.Response:
    return _page(request, "Refused", html('<h1>Refused</h1><p class="error" role="alert">Refused: {}.</p>', why),
                 status=403)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **SECURITY_HEADERS})


def _run_url(run_id: str) -> str:
    return f"/evals/runs/{path_segment(run_id)}"


def _suite_url(suite: str) -> str:
    return f"/evals/suites/{path_segment(suite)}"


def _compare_url(a: str | None, b: str) -> str:
    return query("/evals/compare", a=a, b=b)


def _with_notice(url: str, notice: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}notice={notice}"


def _local_path(url: str | None) -> str | None:
    """`url` if it is a path on this page (no scheme, no host): no open redirects."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme or parts.netloc or not url.startswith("/evals") or url.startswith("//") or "\\" in url:
        return None
    return url


def _here(request: web.Request) -> str:
    """This page's path and query, less the one-off notice (the place to come back to after logging in)."""
    kept = [(k, v) for k, v in request.query.items() if k != "notice"]
    path = request.rel_url.raw_path  # still percent-encoded: safe to put in a URL again
    return f"{path}?{urlencode(kept)}" if kept else path


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
