"""Two runs compared case by case, and that comparison as a table, JSON or Markdown.

Cases are matched by name. A case *passes* when it was evaluated and passed
(`completed` and `passed`); failing, erroring, still running or not run at
all are the other verdicts, and none of them passes. Between run A (before)
and run B (after), a case is:

- a *regression*: it passes in A and not in B;
- a *fix*: it does not pass in A and passes in B;
- *new* / *removed*: it has a row in B only / in A only;
- *unchanged*: it passes in both, or in neither (counted, listed on request).

A run terminated before all its cases ran (status `failed`, fewer case rows
than its case count) did not remove the cases it has no row for: they are
*not run* there, which does not pass, so a case that passed in A and was not
run in B is a regression. A resumed attempt's rows include the cases it
carried over from its parent (`carried_from`), so a run's rows are its
effective results and are compared as they are.

`compare_runs` and `classify` are pure; `read_comparison` does the reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Iterable, Mapping, Sequence

from .models import RunStatus
from .report import dumps, table
from .store.records import CaseRow, RunRow

PASS, FAIL, ERROR, RUNNING, NOT_RUN = "pass", "fail", "error", "running", "not run"
REGRESSION, FIX, NEW, REMOVED, UNCHANGED = "regression", "fix", "new", "removed", "unchanged"
FORMATS = ("table", "json", "markdown")

# Scores are floats written by scorers; a difference below this is noise, not a change.
SCORE_EPSILON = 1e-9
# Rows per Markdown table: a pull-request comment is read, and GitHub caps its length (65,536 characters).
MARKDOWN_ROWS = 50


def verdict_of(status: str, passed: bool | None) -> str:
    """A case row's verdict; the same words as `report.verdict`."""
    if status == "completed":
        return PASS if passed else FAIL
    return ERROR if status == "failed" else RUNNING


def classify(before: str | None, after: str | None) -> str:
    """The one rule: what happened to a case between two runs (None: no row, and none expected)."""
    if before is None:
        return NEW
    if after is None:
        return REMOVED
    if before == PASS and after != PASS:
        return REGRESSION
    if before != PASS and after == PASS:
        return FIX
    return UNCHANGED


def incomplete(run: RunRow, case_rows: int) -> bool:
    """Terminated before every case had a row: the missing ones were not run, not removed."""
    return run.status == RunStatus.FAILED.value and case_rows < (run.case_count or 0)


def pass_rate(passed: int, total: int) -> float | None:
    return passed / total if total else None


def refusal(a: RunRow, b: RunRow) -> str | None:
    """Why these two runs cannot be compared yet, or None.

    A running run's results are partial (cases not yet run would read as
    removed), so a CI gate must not pass on them.
    """
    for run in (a, b):
        if run.status == RunStatus.RUNNING.value:
            return f"run {run.id} is still running; compare it once it has finished"
    return None


@dataclass(frozen=True)
class Side:
    """One of the two runs, summarised over its effective case rows."""

    id: str
    suite: str
    status: str
    cause: str | None
    attempt: int
    cases: int  # case rows, plus cases a terminated run never ran
    passed: int
    not_run: int
    mean_score: float | None  # over the cases that have a score
    resumed_by: str | None  # a later attempt holds this invocation's final results

    @property
    def pass_rate(self) -> float | None:
        return pass_rate(self.passed, self.cases)


@dataclass(frozen=True)
class CaseChange:
    name: str
    kind: str  # REGRESSION, FIX, NEW, REMOVED or UNCHANGED
    before: str | None  # verdict in A; None when absent
    after: str | None
    score_before: float | None = None
    score_after: float | None = None
    detail: str | None = None  # why it does not pass in B (error, cause or scorer detail)
    carried: bool = False  # B's row was carried over from an earlier attempt

    @property
    def score_delta(self) -> float | None:
        if self.score_before is None or self.score_after is None:
            return None
        return self.score_after - self.score_before


@dataclass(frozen=True)
class Comparison:
    a: Side
    b: Side
    changes: tuple[CaseChange, ...]  # every case of either run, by name
    warnings: tuple[str, ...] = ()

    def of(self, kind: str) -> list[CaseChange]:
        return [c for c in self.changes if c.kind == kind]

    @property
    def regressions(self) -> list[CaseChange]:
        return self.of(REGRESSION)

    @property
    def score_changes(self) -> list[CaseChange]:
        """Cases whose verdict kept its side of pass/no pass but whose score moved; biggest drop first."""
        moved = [c for c in self.of(UNCHANGED) if c.score_delta is not None and abs(c.score_delta) > SCORE_EPSILON]
        return sorted(moved, key=lambda c: (c.score_delta, c.name))

    @property
    def pass_rate_delta(self) -> float | None:
        return _delta(self.a.pass_rate, self.b.pass_rate)

    @property
    def mean_score_delta(self) -> float | None:
        return _delta(self.a.mean_score, self.b.mean_score)


def compare_runs(
    a: RunRow, a_cases: Sequence[CaseRow], b: RunRow, b_cases: Sequence[CaseRow],
    resumed_by: Mapping[str, str] | None = None,
) -> Comparison:
    """Compare run A (before) with run B (after). `resumed_by`: run id -> the attempt that resumed it."""
    resumed_by = resumed_by or {}
    before = {c.name: c for c in a_cases}
    after = {c.name: c for c in b_cases}
    absent_a = NOT_RUN if incomplete(a, len(a_cases)) else None
    absent_b = NOT_RUN if incomplete(b, len(b_cases)) else None
    changes = []
    for name in sorted(before.keys() | after.keys()):
        ca, cb = before.get(name), after.get(name)
        va = verdict_of(ca.status, ca.passed) if ca else absent_a
        vb = verdict_of(cb.status, cb.passed) if cb else absent_b
        changes.append(CaseChange(
            name, classify(va, vb), va, vb,
            ca.score if ca else None, cb.score if cb else None,
            _why_not_passing(cb, vb), bool(cb and cb.carried_from),
        ))
    sides = (_side(a, a_cases, resumed_by), _side(b, b_cases, resumed_by))
    return Comparison(sides[0], sides[1], tuple(changes), tuple(_warnings(*sides)))


def read_comparison(store: Any, a: RunRow, b: RunRow) -> Comparison:
    """Read both runs' case rows and attempt chains from a store, and compare them."""
    resumed_by = {}
    for run in (a, b):
        chain = store.attempts(run.id)
        if chain and chain[-1].id != run.id:
            resumed_by[run.id] = chain[-1].id
    return compare_runs(a, store.cases(a.id), b, store.cases(b.id), resumed_by)


def _side(run: RunRow, cases: Sequence[CaseRow], resumed_by: Mapping[str, str]) -> Side:
    not_run = (run.case_count or 0) - len(cases) if incomplete(run, len(cases)) else 0
    scores = [c.score for c in cases if c.score is not None]
    return Side(
        run.id, run.suite, run.status, run.cause, run.attempt, len(cases) + not_run,
        sum(1 for c in cases if verdict_of(c.status, c.passed) == PASS), not_run,
        fmean(scores) if scores else None, resumed_by.get(run.id),
    )


def _warnings(a: Side, b: Side) -> Iterable[str]:
    if a.suite != b.suite:
        yield (f"the runs are of different suites ({a.suite} and {b.suite}); "
               "cases are matched by name all the same")
    for label, side in (("A", a), ("B", b)):
        if side.not_run:
            yield (f"run {label} ({side.id}) was terminated ({side.cause or 'failed'}) before "
                   f"{side.not_run} of its {side.cases} cases ran; they count as not run")
        if side.resumed_by:
            yield (f"run {label} ({side.id}) was resumed by a later attempt, {side.resumed_by}, "
                   "which holds that invocation's final results")


def _why_not_passing(case: CaseRow | None, verdict: str | None) -> str | None:
    if verdict == NOT_RUN:
        return "its run was terminated before it ran"
    if case is None or verdict == PASS:
        return None
    if case.status == "failed":
        return f"{case.cause}: {case.error}" if case.cause and case.error else case.error or case.cause
    return case.detail


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


# ---------------------------------------------------------------- renderings


def render(comparison: Comparison, fmt: str, list_unchanged: bool = False) -> str:
    """One of FORMATS: `table` (text), `json` or `markdown`."""
    if fmt not in FORMATS:
        raise ValueError(f"format: one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "json":
        return dumps(to_dict(comparison, list_unchanged))
    if fmt == "markdown":
        return to_markdown(comparison, list_unchanged)
    return to_text(comparison, list_unchanged)


def counts_line(c: Comparison) -> str:
    n = {kind: len(c.of(kind)) for kind in (REGRESSION, FIX, NEW, REMOVED, UNCHANGED)}
    return (f"{plural(n[REGRESSION], 'regression')}, {plural(n[FIX], 'fix', 'fixes')}, {n[NEW]} new, "
            f"{n[REMOVED]} removed, {n[UNCHANGED]} unchanged")


def rates_line(c: Comparison, arrow: str = "->") -> str:
    rate = (f"pass rate {fmt_rate(c.a.pass_rate)} {arrow} {fmt_rate(c.b.pass_rate)}"
            + (f" ({fmt_points(c.pass_rate_delta)})" if c.pass_rate_delta is not None else ""))
    score = (f"mean score {fmt_score(c.a.mean_score)} {arrow} {fmt_score(c.b.mean_score)}"
             + (f" ({fmt_signed(c.mean_score_delta)})" if c.mean_score_delta is not None else ""))
    return f"{rate}; {score}"


def to_dict(c: Comparison, list_unchanged: bool = False) -> dict[str, Any]:
    def side(s: Side) -> dict[str, Any]:
        return {**s.__dict__, "pass_rate": s.pass_rate}

    def change(ch: CaseChange) -> dict[str, Any]:
        return {**ch.__dict__, "score_delta": ch.score_delta}

    data: dict[str, Any] = {
        "a": side(c.a), "b": side(c.b), "warnings": list(c.warnings),
        "summary": {
            "regressions": len(c.of(REGRESSION)), "fixes": len(c.of(FIX)), "new": len(c.of(NEW)),
            "removed": len(c.of(REMOVED)), "unchanged": len(c.of(UNCHANGED)),
            "pass_rate_delta": c.pass_rate_delta, "mean_score_delta": c.mean_score_delta,
        },
        "regressions": [change(ch) for ch in c.of(REGRESSION)],
        "fixes": [change(ch) for ch in c.of(FIX)],
        "new": [change(ch) for ch in c.of(NEW)],
        "removed": [change(ch) for ch in c.of(REMOVED)],
        "score_changes": [change(ch) for ch in c.score_changes],
    }
    if list_unchanged:
        data["unchanged"] = [change(ch) for ch in c.of(UNCHANGED)]
    return data


def to_text(c: Comparison, list_unchanged: bool = False) -> str:
    lines = [f"A {_side_text(c.a)}", f"B {_side_text(c.b)}"]
    lines += [f"warning: {w}" for w in c.warnings]
    for title, rows in _sections(c, list_unchanged):
        lines += ["", f"{title} ({len(rows)})", table(
            ["case", "before", "after", "score A", "score B", "delta", "detail"],
            [(ch.name + (" (carried over)" if ch.carried else ""), ch.before or "-", ch.after or "-",
              ch.score_before, ch.score_after, None if ch.score_delta is None else fmt_signed(ch.score_delta),
              ch.detail) for ch in rows])]
    lines += ["", counts_line(c), rates_line(c)]
    return "\n".join(lines)


def to_markdown(c: Comparison, list_unchanged: bool = False) -> str:
    """For a pull-request comment: a heading, a summary line, then regressions and fixes in one table."""
    regressions = len(c.regressions)
    heading = (f"### ❌ {plural(regressions, 'regression')} in {_md(c.b.suite)}" if regressions
               else f"### ✅ No regressions in {_md(c.b.suite)}")
    lines = [heading, "", f"**{counts_line(c)}**; {rates_line(c, '→')}", "",
             f"Run {_md(c.a.id)} (before) → run {_md(c.b.id)} (after).", ""]
    lines += [f"> **Warning:** {_md_text(w)}" for w in c.warnings] + ([""] if c.warnings else [])
    changed = c.of(REGRESSION) + c.of(FIX)
    if changed:
        lines += _md_table(changed, with_kind=True) + [""]
    extra = [(title, rows) for title, rows in _sections(c, list_unchanged) if title not in ("regressions", "fixes")]
    for title, rows in extra:
        # Collapsed, so the comment stays short; GitHub renders <details> in comments.
        lines += [f"<details><summary>{title} ({len(rows)})</summary>", "", *_md_table(rows), "", "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"


def _sections(c: Comparison, list_unchanged: bool) -> list[tuple[str, list[CaseChange]]]:
    sections = [("regressions", c.of(REGRESSION)), ("fixes", c.of(FIX)), ("new", c.of(NEW)),
                ("removed", c.of(REMOVED)), ("score changes", c.score_changes)]
    if list_unchanged:
        sections.append(("unchanged", c.of(UNCHANGED)))
    return [(title, rows) for title, rows in sections if rows]


def _side_text(s: Side) -> str:
    return (f"{s.id}  suite {s.suite}  attempt {s.attempt}  {s.status}" + (f" ({s.cause})" if s.cause else "")
            + f"  passed {s.passed}/{s.cases}")


def _md_table(rows: Sequence[CaseChange], with_kind: bool = False) -> list[str]:
    head = (["change", "case"] if with_kind else ["case"]) + ["before", "after", "score", "detail"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ch in rows[:MARKDOWN_ROWS]:
        score = "" if ch.score_before is None and ch.score_after is None else (
            f"{fmt_score(ch.score_before)} → {fmt_score(ch.score_after)}"
            + (f" ({fmt_signed(ch.score_delta)})" if ch.score_delta is not None else ""))
        cells = ([ch.kind] if with_kind else []) + [
            _md(ch.name) + (" (carried over)" if ch.carried else ""), ch.before or "–", ch.after or "–", score,
            _md_text(_clip(ch.detail or "", 120)),
        ]
        out.append("| " + " | ".join(cells) + " |")
    if len(rows) > MARKDOWN_ROWS:
        out += ["", f"…and {len(rows) - MARKDOWN_ROWS} more; `--format json` lists them all."]
    return out


# A name made of these shows as code; anything else is escaped text (a case name from an imported
# database could carry Markdown, HTML or a pipe that would break the table).
_CODE_SAFE = re.compile(r"^[\w.:/+-]+$")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&$@])")  # what inline Markdown, HTML or a mention would act on


def _md(name: str) -> str:
    return f"`{name}`" if _CODE_SAFE.match(name) else _md_text(name)


def _md_text(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"


def fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def fmt_points(delta: float) -> str:
    return f"{delta * 100:+.1f} pp"


def fmt_score(score: float | None) -> str:
    return "-" if score is None else f"{score:.3f}"


def fmt_signed(value: float) -> str:
    return f"{value:+.3f}"
