"""A suite's history: each finished invocation's pass rate and duration, and what regressed between neighbours.

A point is one invocation's final attempt (a run that a later attempt resumed
is represented by that attempt, whose rows include the cases it carried
over). What changed between two neighbouring points is judged by
`compare.classify`, the rule `evalrunner compare` uses, over the cases whose
presence or pass verdict differs (`CaseDifference`, read by the store
without loading every case row). Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import compare
from .report import duration_s
from .store.records import CaseDifference, RunRow


@dataclass(frozen=True)
class HistoryPoint:
    run: RunRow
    previous_id: str | None  # the point before it, which its changes are against
    regressions: tuple[str, ...] = ()  # case names, sorted
    fixes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        run = self.run
        return max((run.passed or 0) + (run.failed or 0) + (run.errored or 0), run.case_count or 0)

    @property
    def pass_rate(self) -> float | None:
        return compare.pass_rate(self.run.passed or 0, self.total)

    @property
    def duration_s(self) -> float | None:
        return duration_s(self.run)


def neighbour_pairs(runs: Sequence[RunRow]) -> list[tuple[str, str]]:
    """(older, newer) run ids of neighbouring runs, given runs oldest first."""
    return [(older.id, newer.id) for older, newer in zip(runs, runs[1:])]


def history_points(runs: Sequence[RunRow], differences: Sequence[CaseDifference]) -> list[HistoryPoint]:
    """Points oldest first, given runs oldest first and the case differences of `neighbour_pairs(runs)`."""
    by_id = {r.id: r for r in runs}
    changed: dict[tuple[str, str], dict[str, list[str]]] = {}
    for d in differences:
        older, newer = by_id.get(d.before_run_id), by_id.get(d.after_run_id)
        if older is None or newer is None:
            continue
        kind = compare.classify(_verdict(older, d.before_status, d.before_passed),
                                _verdict(newer, d.after_status, d.after_passed))
        changed.setdefault((older.id, newer.id), {}).setdefault(kind, []).append(d.name)
    points = []
    for i, run in enumerate(runs):
        previous = runs[i - 1].id if i else None
        kinds = changed.get((previous, run.id), {}) if previous else {}
        points.append(HistoryPoint(run, previous, tuple(sorted(kinds.get(compare.REGRESSION, ()))),
                                   tuple(sorted(kinds.get(compare.FIX, ())))))
    return points


def _verdict(run: RunRow, status: str | None, passed: bool | None) -> str | None:
    if status is not None:
        return compare.verdict_of(status, passed)
    rows = (run.passed or 0) + (run.failed or 0) + (run.errored or 0)  # a closed run's totals count its rows
    return compare.NOT_RUN if compare.incomplete(run, rows) else None
