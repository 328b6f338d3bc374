"""A suite's history: the points and their regressions (pure and over a real store), and the chart's geometry."""

from __future__ import annotations

import random
import re
from datetime import timedelta

import pytest

from evalrunner import compare, history
from evalrunner.faults import Faults
from evalrunner.models import RunStatus
from evalrunner.service import history_chart
from evalrunner.service.history_chart import ChartItem, Marker, layout, nice_ceiling, render_chart
from evalrunner.store import DuckDBStore
from evalrunner.store.records import CaseDifference

from compare_support import T0, record, run_row


@pytest.fixture
def store(tmp_path):
    s = DuckDBStore.open(tmp_path / "history.duckdb", faults=Faults(""))
    yield s
    s.close()


# ---------------------------------------------------------------- points (pure)


def test_points_carry_the_regressions_and_fixes_since_the_previous_point():
    runs = [run_row("r1", passed=3, failed=0, errored=0, case_count=3),
            run_row("r2", passed=2, failed=1, errored=0, case_count=3, minute=1, duration_s=20),
            run_row("r3", status="failed", cause="killed", passed=1, failed=0, errored=0, case_count=3, minute=2)]
    differences = [
        CaseDifference("r1", "r2", "b", "completed", True, "completed", False),  # pass -> fail
        CaseDifference("r2", "r3", "b", "completed", False, None, None),  # r3 was killed before running it
        CaseDifference("r2", "r3", "c", "completed", True, None, None),
        CaseDifference("r2", "r3", "d", None, None, "completed", True),  # new, passing
    ]
    points = history.history_points(runs, differences)

    assert [p.previous_id for p in points] == [None, "r1", "r2"]
    assert [p.regressions for p in points] == [(), ("b",), ("c",)]  # b was already failing in r2
    assert [p.fixes for p in points] == [(), (), ()]
    assert [p.pass_rate for p in points] == [1.0, pytest.approx(2 / 3), pytest.approx(1 / 3)]
    assert points[1].duration_s == 20.0
    assert history.neighbour_pairs(runs) == [("r1", "r2"), ("r2", "r3")]


# ---------------------------------------------------------------- over a real store


def test_final_runs_are_each_invocations_last_attempt(store):
    first = record(store, "qa", {"a": "pass"}, at=T0)
    killed = record(store, "qa", {"a": "error"}, status=RunStatus.FAILED, cause="killed", at=T0 + timedelta(minutes=1))
    resumed = record(store, "qa", {"a": "pass"}, parent=killed, at=T0 + timedelta(minutes=2))
    record(store, "other", {"a": "pass"}, at=T0 + timedelta(minutes=3))
    running = record(store, "qa", {"a": "pass"}, at=T0 + timedelta(minutes=4), finish=False)

    assert [r.id for r in store.final_runs("qa")] == [resumed.id, first.id]  # not the resumed attempt, not running
    assert [r.id for r in store.final_runs("qa", limit=1)] == [resumed.id]
    assert [r.id for r in store.final_runs("qa", before=resumed)] == [first.id]
    assert store.final_runs("qa", before=first) == []
    assert [r.id for r in store.final_runs("qa", before=running)] == [resumed.id, first.id]


def test_the_stores_differences_give_the_regressions_compare_finds(store):
    """The suite page reads only the differing cases; its regressions must be exactly `compare`'s."""
    rng = random.Random(7)
    names = [f"case-{i}" for i in range(12)]
    runs = []
    for i in range(8):
        present = [n for n in names if rng.random() < 0.85]
        verdicts = {n: rng.choice(["pass", "pass", "fail", "error"]) for n in present}
        if i == 5:  # terminated before some of its cases ran
            runs.append(record(store, "qa", dict(list(verdicts.items())[:4]), status=RunStatus.FAILED,
                               cause="killed", planned=tuple(list(verdicts)[4:]), at=T0 + timedelta(minutes=i)))
        else:
            runs.append(record(store, "qa", verdicts, at=T0 + timedelta(minutes=i)))
    final = store.final_runs("qa", limit=50)[::-1]
    assert [r.id for r in final] == [r.id for r in runs]

    points = history.history_points(final, store.case_differences(history.neighbour_pairs(final)))
    for older, point in zip(final, points[1:]):
        expected = compare.read_comparison(store, older, point.run)
        assert list(point.regressions) == [c.name for c in expected.regressions]
        assert list(point.fixes) == [c.name for c in expected.of(compare.FIX)]
    assert any(p.regressions for p in points) and points[5].run.status == "failed"
    assert store.case_differences([]) == []


# ---------------------------------------------------------------- the chart


@pytest.mark.parametrize("value, ceiling", [
    (0, 1.0), (None, 1.0), (0.03, 0.05), (0.9, 1.0), (1.0, 1.0), (1.2, 2.0), (2.2, 2.5), (3, 5.0), (7.5, 10.0),
    (18, 20.0), (240, 250.0), (1000, 1000.0),
])
def test_nice_ceiling(value, ceiling):
    assert nice_ceiling(value) == pytest.approx(ceiling)


def test_layout_spaces_runs_evenly_and_scales_both_panels():
    g = layout([1.0, 0.5, None, 0.0], [10.0, None, 18.0, 0.0])
    assert g.xs == (history_chart.LEFT, pytest.approx(290.666, abs=0.01), pytest.approx(517.333, abs=0.01),
                    history_chart.WIDTH - history_chart.RIGHT)
    top, bottom = history_chart.RATE_TOP, history_chart.RATE_BOTTOM
    assert g.rate_ys == (top, (top + bottom) / 2, None, bottom)
    assert g.duration_max == 20.0  # 18 s rounds up to a 20 s scale
    d_top, d_bottom = history_chart.DURATION_TOP, history_chart.DURATION_BOTTOM
    assert g.duration_ys == ((d_top + d_bottom) / 2, None, pytest.approx(d_bottom - 0.9 * (d_bottom - d_top)), d_bottom)
    assert [value for _, value in g.duration_ticks] == [0.0, 10.0, 20.0]
    # A run without a value breaks its line rather than bridging the gap.
    assert [len(s) for s in g.segments(g.rate_ys)] == [2, 1]
    assert [len(s) for s in g.segments(g.duration_ys)] == [1, 2]


def test_layout_of_one_run_centres_it_and_clamps_out_of_range_values():
    g = layout([1.7], [0.0])
    assert g.xs == ((history_chart.LEFT + history_chart.WIDTH - history_chart.RIGHT) / 2,)
    assert g.rate_ys == (history_chart.RATE_TOP,) and g.duration_max == 1.0


def test_the_chart_is_markup_the_policy_allows_with_escaped_titles():
    hostile = '<script>alert(1)</script>"'
    items = [ChartItem(1.0, 3.0, f"run one {hostile}", "/evals/runs/one"),
             ChartItem(0.5, 4.0, "run two", "/evals/runs/two",
                       Marker(f"1 regression: {hostile}", "/evals/compare?a=one&b=two"))]
    svg = render_chart(items, f"suite {hostile}", "first", "last")
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg" class="history-chart"')
    assert "<script" not in svg and "style=" not in svg and "<style" not in svg
    assert not re.search(r"\son\w+=", svg)  # no event handler attribute
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;" in svg
    assert svg.count('<a href="/evals/compare?a=one&amp;b=two" class="regression">') == 1
    assert len(re.findall(r'<circle class="point rate', svg)) == 2
    assert '<polyline class="series rate" fill="none" points="64,28 744,83"/>' in svg
