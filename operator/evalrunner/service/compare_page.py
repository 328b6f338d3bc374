"""The compare view, /evals/compare?a=RUN&b=RUN: what `evalrunner compare A B` prints, as a page.

`a` is the run before, `b` the run after; either may be a unique prefix of a
run id, as on the command line. Without `a`, the previous finished run of
b's suite is taken (the run page links here so). A running run is refused
(409), as `evalrunner compare` refuses it: its results are still partial.
`all=1` lists the unchanged cases too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from aiohttp import web

from .. import compare
from ..compare import CaseChange, Comparison, Side
from ..store.duckdb_store import DuckDBStore
from ..store.records import RunRow
from .context import CALLS, STORE
from .markup import Safe, html, join, query
from .page import _compare_url, _page, _run_url, _suite_url, fmt_time, status_badge


class Problem(Exception):
    """Why the page cannot show a comparison, with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class CompareView:
    a: RunRow
    b: RunRow
    comparison: Comparison
    list_unchanged: bool


def find_run(store: DuckDBStore, text: str, label: str) -> RunRow:
    """A run by id or unique prefix (as `evalrunner show` finds it)."""
    run = store.get_run(text)
    if run is not None:
        return run
    matches = store.find_runs_by_prefix(text)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise Problem(404, f"{label}: no run with id {text!r}")
    raise Problem(400, f"{label}: run id prefix {text!r} is ambiguous: {', '.join(m.id for m in matches)}")


def read_compare_view(store: DuckDBStore, a_text: str, b_text: str, list_unchanged: bool) -> CompareView:
    b = find_run(store, b_text, "b")
    if a_text:
        a = find_run(store, a_text, "a")
    else:
        previous = store.final_runs(b.suite, limit=1, before=b)
        if not previous:
            raise Problem(404, f"no finished run of suite {b.suite} before run {b.id} to compare it with")
        a = previous[0]
    why = compare.refusal(a, b)
    if why:
        raise Problem(409, why)
    return CompareView(a, b, compare.read_comparison(store, a, b), list_unchanged)


async def compare_page(request: web.Request) -> web.Response:
    started = time.perf_counter()
    a_text = (request.query.get("a") or "").strip()
    b_text = (request.query.get("b") or "").strip()
    list_unchanged = request.query.get("all") == "1"
    if not b_text:
        status = 400 if a_text else 200  # no parameters at all: just the form
        problem = html('<p class="error" role="alert">b: missing; give the later run (an id or a unique prefix)</p>') if a_text else ""
        return _page(request, "Compare runs", html('<h1>Compare runs</h1>{}{}', problem, render_form(a_text, "")),
                     status=status)
    try:
        view = await request.app[CALLS](read_compare_view, request.app[STORE], a_text, b_text, list_unchanged)
    except Problem as exc:
        body = html('<h1>Compare runs</h1><p class="error" role="alert" id="compare-error">{}</p>{}',
                    str(exc), render_form(a_text, b_text))
        return _page(request, "Compare runs", body, status=exc.status)
    db_done = time.perf_counter()
    return _page(request, f"Compare {view.a.id} with {view.b.id}", render_compare(view), timing=(started, db_done))


# ---------------------------------------------------------------- rendering


def render_compare(view: CompareView) -> Safe:
    c = view.comparison
    parts = [
        html('<p class="crumbs"><a href="/evals">Runs</a> / <a href="{}">{}</a></p>', _suite_url(view.b.suite),
             view.b.suite),
        Safe('<h1>Compare runs</h1>'),
        render_form(view.a.id, view.b.id),
        render_sides(view),
        join(html('<p class="warning" role="note">{}</p>', w) for w in c.warnings),
        html('<p class="summary compare-summary" id="compare-summary"><strong>{}</strong>; {}</p>',
             compare.counts_line(c), compare.rates_line(c, "→")),
    ]
    titles = {compare.REGRESSION: "Regressions", compare.FIX: "Fixes", compare.NEW: "New cases",
              compare.REMOVED: "Removed cases"}
    for kind, title in titles.items():
        parts.append(render_changes(kind, title, c.of(kind)))
    parts.append(render_changes("score-changes", "Score changes", c.score_changes))
    unchanged = c.of(compare.UNCHANGED)
    if view.list_unchanged:
        parts.append(render_changes(compare.UNCHANGED, "Unchanged", unchanged))
    elif unchanged:
        parts.append(html('<p class="note" id="unchanged">{} unchanged case(s). <a href="{}">List them</a></p>',
                          len(unchanged), query("/evals/compare", a=view.a.id, b=view.b.id, all="1")))
    return join(parts)


def render_form(a: str, b: str) -> Safe:
    swap = html(' <a href="{}" id="swap">Swap</a>', _compare_url(b, a)) if a and b else ""
    return html(
        '<form method="get" action="/evals/compare" class="filters" id="compare-form">'
        '<label>Before (A) <input type="text" name="a" id="compare-a" value="{a}" '
        'placeholder="run id or prefix; empty: the previous run"></label> '
        '<label>After (B) <input type="text" name="b" id="compare-b" value="{b}" placeholder="run id or prefix" '
        'required></label> <button type="submit" id="compare-submit">Compare</button>{swap}</form>',
        a=a, b=b, swap=swap,
    )


def render_sides(view: CompareView) -> Safe:
    c, a, b = view.comparison, view.a, view.b

    def rate(side: Side) -> str:
        return f"{compare.fmt_rate(side.pass_rate)} ({side.passed}/{side.cases})"

    none = _delta_cell(None)
    rows: Sequence[tuple[str, object, object, Safe]] = [
        ("Run", html('<a href="{}">{}</a>', _run_url(a.id), a.id), html('<a href="{}">{}</a>', _run_url(b.id), b.id),
         none),
        ("Suite", html('<a href="{}">{}</a>', _suite_url(a.suite), a.suite),
         html('<a href="{}">{}</a>', _suite_url(b.suite), b.suite), none),
        ("Status", html("{}{}", status_badge(a.status), f" ({a.cause})" if a.cause else ""),
         html("{}{}", status_badge(b.status), f" ({b.cause})" if b.cause else ""), none),
        ("Attempt", a.attempt, b.attempt, none),
        ("Started", fmt_time(a.started_at or a.created_at), fmt_time(b.started_at or b.created_at), none),
        ("Pass rate", rate(c.a), rate(c.b), _delta_cell(c.pass_rate_delta, compare.fmt_points)),
        ("Mean score", compare.fmt_score(c.a.mean_score), compare.fmt_score(c.b.mean_score),
         _delta_cell(c.mean_score_delta, compare.fmt_signed)),
    ]
    body = join(html('<tr><th>{}</th><td>{}</td><td>{}</td>{}</tr>', *row) for row in rows)
    return html('<table class="fields compare-sides" id="compare-sides"><thead><tr><th></th><th>A (before)</th>'
                '<th>B (after)</th><th class="num">Change</th></tr></thead><tbody>{}</tbody></table>', body)


def render_changes(kind: str, title: str, changes: Sequence[CaseChange]) -> Safe:
    if not changes:
        return Safe("")
    rows = join(
        html('<tr class="change {kind}" data-case="{name}"><td class="name">{name}{note}</td><td>{before}</td>'
             '<td>{after}</td><td class="num">{sa}</td><td class="num">{sb}</td>{delta}'
             '<td class="error-text">{detail}</td></tr>',
             kind=kind, name=ch.name, note=Safe(' <span class="note">carried over</span>') if ch.carried else "",
             before=verdict_badge(ch.before), after=verdict_badge(ch.after),
             sa=compare.fmt_score(ch.score_before) if ch.score_before is not None else "",
             sb=compare.fmt_score(ch.score_after) if ch.score_after is not None else "",
             delta=_delta_cell(ch.score_delta, compare.fmt_signed),
             detail=ch.detail or "")
        for ch in changes
    )
    return html(
        '<h2>{title} ({n})</h2><table class="cases changes" id="{kind}"><thead><tr><th>Case</th><th>A</th><th>B</th>'
        '<th class="num">Score A</th><th class="num">Score B</th><th class="num">Δ</th><th>Detail</th></tr></thead>'
        '<tbody>{rows}</tbody></table>', title=title, n=len(changes), kind=kind, rows=rows)


def verdict_badge(verdict: str | None) -> Safe:
    if verdict is None:
        return Safe('<span class="note">absent</span>')
    return html('<span class="badge verdict-{}">{}</span>', verdict.replace(" ", "-"), verdict)


def _delta_cell(delta: float | None, fmt: Callable[[float], str] | None = None) -> Safe:
    """A change as a table cell, marked up or down (a rise in pass rate or score is good news)."""
    if delta is None or fmt is None:
        return Safe('<td class="num delta"></td>')
    direction = "" if abs(delta) <= compare.SCORE_EPSILON else " up" if delta > 0 else " down"
    return html('<td class="num delta{}">{}</td>', direction, fmt(delta))
