"""A suite's page, /evals/suites/{suite}: its recent history as a chart and a table.

Each point is a finished invocation of the suite (its final attempt; see
`history`), at most `?limit=` of them (50 by default). A point where a case
that passed in the previous point stopped passing carries a marker, whose
tooltip names the cases and whose link opens the comparison of the two runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web

from .. import compare, history
from ..compare import plural
from ..history import HistoryPoint
from ..store.duckdb_store import DuckDBStore
from .context import CALLS, STORE
from .history_chart import ChartItem, Marker, render_chart
from .markup import Safe, html, join, query
from .page import _compare_url, _page, _run_url, fmt_duration, fmt_time, status_badge

HISTORY_RUNS = 50
MAX_HISTORY_RUNS = 200
NAMES_IN_TOOLTIP = 5


@dataclass
class SuiteView:
    suite: str
    points: list[HistoryPoint]  # oldest first
    runs: int  # every run of the suite, attempts and running ones included
    running: int


def read_suite_view(store: DuckDBStore, suite: str, limit: int) -> SuiteView:
    # One run more than shown, so that the oldest point shown is compared with its predecessor too.
    runs = store.final_runs(suite, limit + 1)[::-1]
    points = history.history_points(runs, store.case_differences(history.neighbour_pairs(runs)))
    return SuiteView(suite, points[-limit:], store.count_runs(suite=suite),
                     store.count_runs(status="running", suite=suite))


async def suite_page(request: web.Request) -> web.Response:
    started = time.perf_counter()
    suite = request.match_info["suite"]
    try:
        limit = int(request.query.get("limit") or HISTORY_RUNS)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_HISTORY_RUNS:
        return _page(request, "Bad request", html('<p class="error">limit: a whole number from 1 to {}, not {}</p>',
                                                  MAX_HISTORY_RUNS, repr(request.query.get("limit"))), status=400)
    view = await request.app[CALLS](read_suite_view, request.app[STORE], suite, limit)
    db_done = time.perf_counter()
    if not view.runs:
        return _page(request, "No such suite", html(
            '<p class="error">No run of suite <code>{}</code>. <a href="/evals">All runs</a></p>', suite), status=404)
    return _page(request, f"Suite {suite}", render_suite(view), timing=(started, db_done))


def render_suite(view: SuiteView) -> Safe:
    parts = [html('<p class="crumbs"><a href="/evals">Runs</a> / {}</p>', view.suite),
             html('<h1>Suite <code id="suite-name">{}</code></h1>', view.suite)]
    latest = view.points[-1] if view.points else None
    summary = html(
        '{shown} shown ({runs} in all{running}){latest}. <a href="{all}">All runs of this suite</a>',
        shown=plural(len(view.points), "finished run"), runs=plural(view.runs, "run"),
        running=f", {view.running} running" if view.running else "",
        latest=(f"; latest: {compare.fmt_rate(latest.pass_rate)} passed in {fmt_duration(latest.duration_s)}"
                if latest else ""),
        all=query("/evals", suite=view.suite),
    )
    parts.append(html('<p class="summary" id="suite-summary">{}</p>', summary))
    if not view.points:
        parts.append(Safe('<p class="empty">No finished run of this suite yet.</p>'))
        return join(parts)
    parts.append(render_history_chart(view))
    parts.append(render_history_table(view))
    return join(parts)


def render_history_chart(view: SuiteView) -> Safe:
    items = [
        ChartItem(p.pass_rate, p.duration_s, _point_title(p), _run_url(p.run.id),
                  Marker(_marker_title(p), _compare_url(p.previous_id, p.run.id))
                  if p.regressions and p.previous_id else None)
        for p in view.points
    ]
    first, last = view.points[0].run, view.points[-1].run
    chart = render_chart(
        items, f"Pass rate and duration of the last {len(items)} finished runs of suite {view.suite}",
        fmt_time(first.started_at or first.created_at), fmt_time(last.started_at or last.created_at),
        duration_text=fmt_duration,
    )
    legend = Safe(
        '<figcaption class="legend"><span class="key rate"></span> pass rate '
        '<span class="key duration"></span> duration '
        '<span class="key regression"></span> a regression appeared (hover for the cases, click to compare). '
        'Oldest on the left; each point links to its run.</figcaption>')
    return html('<figure class="history" id="history">{}{}</figure>', chart, legend)


def render_history_table(view: SuiteView) -> Safe:
    rows = join(
        html('<tr class="history-run{cls}" data-run-id="{id}"><td class="id"><a href="{url}">{id}</a></td>'
             '<td class="time">{started}</td><td>{badge}</td><td class="num">{rate}</td><td class="num">{passed}</td>'
             '<td class="num">{duration}</td><td class="changes">{changes}</td></tr>',
             cls=" regressed" if p.regressions else "", id=p.run.id, url=_run_url(p.run.id),
             started=fmt_time(p.run.started_at or p.run.created_at), badge=status_badge(p.run.status),
             rate=compare.fmt_rate(p.pass_rate), passed=f"{p.run.passed or 0}/{p.total}",
             duration=fmt_duration(p.duration_s), changes=_changes_cell(p))
        for p in reversed(view.points)
    )
    return html(
        '<h2>Runs, newest first</h2><table class="runs history-runs" id="history-runs"><thead><tr><th>Run</th>'
        '<th>Started</th><th>Status</th><th class="num">Pass rate</th><th class="num">Passed</th>'
        '<th class="num">Duration</th><th>Against the previous run</th></tr></thead><tbody>{}</tbody></table>', rows)


def _changes_cell(p: HistoryPoint) -> Safe:
    if p.previous_id is None:
        return Safe("")
    words = []
    if p.regressions:
        words.append(html('<span class="regressions">{}</span>', plural(len(p.regressions), "regression")))
    if p.fixes:
        words.append(plural(len(p.fixes), "fix", "fixes"))
    return html('<a href="{}">{}</a>', _compare_url(p.previous_id, p.run.id),
                join(words, ", ") if words else "compare")


def _point_title(p: HistoryPoint) -> str:
    run = p.run
    return (f"{run.id} · {fmt_time(run.started_at or run.created_at)} · {run.status} · "
            f"{compare.fmt_rate(p.pass_rate)} passed ({run.passed or 0}/{p.total}) · "
            f"{fmt_duration(p.duration_s) or 'no duration'}")


def _marker_title(p: HistoryPoint) -> str:
    names = ", ".join(p.regressions[:NAMES_IN_TOOLTIP])
    more = len(p.regressions) - NAMES_IN_TOOLTIP
    return (f"{plural(len(p.regressions), 'regression')} since {p.previous_id}: {names}"
            + (f" and {more} more" if more > 0 else "") + ". Click to compare the two runs.")

