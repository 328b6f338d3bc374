"""The comparison of two runs on constructed rows, and its three renderings."""

from __future__ import annotations

import json

import pytest

from evalrunner import compare
from evalrunner.compare import FIX, NEW, NOT_RUN, REGRESSION, REMOVED, UNCHANGED, classify, compare_runs

from compare_support import case_row, cases, run_row


def names(changes) -> list[str]:
    return [c.name for c in changes]


@pytest.mark.parametrize("before, after, kind", [
    ("pass", "pass", UNCHANGED), ("pass", "fail", REGRESSION), ("pass", "error", REGRESSION),
    ("pass", NOT_RUN, REGRESSION), ("pass", "running", REGRESSION),
    ("fail", "pass", FIX), ("error", "pass", FIX), (NOT_RUN, "pass", FIX),
    ("fail", "error", UNCHANGED), ("error", "fail", UNCHANGED), ("fail", "fail", UNCHANGED),
    (None, "pass", NEW), (None, "fail", NEW), ("pass", None, REMOVED), ("fail", None, REMOVED),
])
def test_the_rule(before, after, kind):
    assert classify(before, after) == kind


def test_regressions_fixes_new_removed_and_unchanged():
    a, b = run_row("A", case_count=6), run_row("B", case_count=6, minute=5)
    a_cases = cases("A", {"add": "pass", "capital": "pass", "divide": "pass", "haiku": "fail", "old": "pass",
                          "flaky": "error"})
    b_cases = cases("B", {"add": "pass", "haiku": "pass", "fresh": "fail", "flaky": "fail"}) + [
        case_row("B", "capital", "fail", detail="expected 'Paris'"),
        case_row("B", "divide", "error", error="ZeroDivisionError: division by zero"),
    ]
    c = compare_runs(a, a_cases, b, b_cases)

    assert names(c.regressions) == ["capital", "divide"]
    assert names(c.of(FIX)) == ["haiku"] and names(c.of(NEW)) == ["fresh"] and names(c.of(REMOVED)) == ["old"]
    assert names(c.of(UNCHANGED)) == ["add", "flaky"]  # error -> fail still does not pass
    capital, divide = c.regressions
    assert (capital.before, capital.after, capital.detail) == ("pass", "fail", "expected 'Paris'")
    assert (divide.after, divide.detail) == ("error", "case_raised: ZeroDivisionError: division by zero")
    assert c.warnings == ()
    assert (c.a.passed, c.a.cases, c.b.passed, c.b.cases) == (4, 6, 2, 6)


def test_score_deltas_means_and_pass_rates():
    a, b = run_row("A"), run_row("B", minute=5)
    a_cases = cases("A", {"x": ("pass", 0.9), "y": ("pass", 0.8), "z": ("fail", 0.2), "w": ("pass", None)})
    b_cases = cases("B", {"x": ("pass", 0.6), "y": ("pass", 0.85), "z": ("fail", 0.2), "w": ("fail", 0.1)})
    c = compare_runs(a, a_cases, b, b_cases)

    by_name = {ch.name: ch for ch in c.changes}
    assert by_name["x"].score_delta == pytest.approx(-0.3)
    assert by_name["y"].score_delta == pytest.approx(0.05)
    assert by_name["z"].score_delta == 0 and by_name["w"].score_delta is None  # no score in A
    # Verdict unchanged but score moved, biggest drop first; an unmoved score is not listed.
    assert names(c.score_changes) == ["x", "y"]
    assert c.a.mean_score == pytest.approx((0.9 + 0.8 + 0.2) / 3)  # cases without a score are left out
    assert c.b.mean_score == pytest.approx((0.6 + 0.85 + 0.2 + 0.1) / 4)
    assert c.mean_score_delta == pytest.approx(c.b.mean_score - c.a.mean_score)
    assert (c.a.pass_rate, c.b.pass_rate, c.pass_rate_delta) == (0.75, 0.5, -0.25)


def test_carried_over_cases_are_the_resumed_attempts_results():
    """Attempt 2 carried `add` and `capital` over from attempt 1 and ran the rest again."""
    before = run_row("A")
    first = run_row("R1", status="failed", cause="killed", case_count=3, minute=5)
    second = run_row("R2", attempt=2, parent="R1", case_count=3, minute=6)
    a_cases = cases("A", {"add": "pass", "capital": "pass", "haiku": "pass"})
    first_cases = cases("R1", {"add": "pass", "capital": "fail"}) + [case_row("R1", "haiku", "error")]
    second_cases = (cases("R2", {"add": "pass", "capital": "fail"}, carried_from="R1/x")
                    + cases("R2", {"haiku": "pass"}))

    c = compare_runs(before, a_cases, second, second_cases)
    assert names(c.regressions) == ["capital"] and c.regressions[0].carried  # its verdict came from attempt 1
    assert names(c.of(UNCHANGED)) == ["add", "haiku"] and c.of(REMOVED) == []
    assert (c.b.passed, c.b.cases) == (2, 3)

    # Against the attempt it resumed: the carried cases are the same rows, the re-run one is fixed.
    own = compare_runs(first, first_cases, second, second_cases, resumed_by={"R1": "R2"})
    assert names(own.of(FIX)) == ["haiku"] and own.regressions == []
    assert any("resumed by a later attempt, R2" in w for w in own.warnings)


def test_cases_a_terminated_run_never_ran_are_not_run_not_removed():
    a = run_row("A", case_count=4)
    killed = run_row("K", status="failed", cause="killed", case_count=4, minute=5)
    a_cases = cases("A", {"one": "pass", "two": "pass", "three": "pass", "four": "fail"})
    k_cases = cases("K", {"one": "pass"}) + [case_row("K", "two", "error")]  # then it was killed

    c = compare_runs(a, a_cases, killed, k_cases)
    assert names(c.regressions) == ["three", "two"]
    assert {ch.name: ch.after for ch in c.changes} == {"one": "pass", "two": "error", "three": NOT_RUN,
                                                       "four": NOT_RUN}
    assert c.of(REMOVED) == [] and names(c.of(UNCHANGED)) == ["four", "one"]
    assert (c.b.passed, c.b.cases, c.b.not_run) == (1, 4, 2)  # the pass rate counts what it never ran
    assert any("before 2 of its 4 cases ran" in w for w in c.warnings)

    # A completed run that lacks a case removed it.
    done = run_row("D", case_count=1, minute=6)
    assert names(compare_runs(a, a_cases, done, cases("D", {"one": "pass"})).of(REMOVED)) == ["four", "three", "two"]


def test_runs_of_different_suites_are_compared_with_a_warning():
    c = compare_runs(run_row("A", suite="qa"), cases("A", {"x": "pass"}),
                     run_row("B", suite="qa-staging"), cases("B", {"x": "fail"}))
    assert names(c.regressions) == ["x"]
    assert c.warnings == ("the runs are of different suites (qa and qa-staging); cases are matched by name all the same",)


def test_a_running_run_is_refused():
    done, running = run_row("A"), run_row("B", status="running")
    assert compare.refusal(done, done) is None
    assert compare.refusal(done, running) == "run B is still running; compare it once it has finished"
    assert compare.refusal(running, done) == compare.refusal(done, running)  # before or after alike


# ---------------------------------------------------------------- renderings


@pytest.fixture
def mixed():
    a, b = run_row("20260105-090000-aaaaaa"), run_row("20260105-091000-bbbbbb", minute=10)
    return compare_runs(
        a, cases(a.id, {"add": "pass", "capital": "pass", "haiku": "fail", "old": "pass", "same": ("pass", 0.9)}),
        b, cases(b.id, {"add": "pass", "capital": "fail", "haiku": "pass", "fresh": "pass", "same": ("pass", 0.7)}),
    )


def test_table(mixed):
    text = compare.to_text(mixed)
    lines = text.splitlines()
    assert lines[0].startswith("A 20260105-090000-aaaaaa  suite qa") and lines[1].startswith("B 20260105-091000")
    assert "regressions (1)" in lines and "fixes (1)" in lines and "new (1)" in lines and "removed (1)" in lines
    assert "score changes (1)" in lines and "unchanged" not in "\n".join(lines[:-2])
    regression = lines[lines.index("regressions (1)") + 3]
    assert regression.split()[:6] == ["capital", "pass", "fail", "1", "0", "-1.000"]
    assert lines[-2] == "1 regression, 1 fix, 1 new, 1 removed, 2 unchanged"
    assert lines[-1] == "pass rate 80.0% -> 80.0% (+0.0 pp); mean score 0.780 -> 0.740 (-0.040)"
    assert "unchanged (2)" in compare.to_text(mixed, list_unchanged=True)


def test_json(mixed):
    data = json.loads(compare.render(mixed, "json"))
    assert data["summary"] == {"regressions": 1, "fixes": 1, "new": 1, "removed": 1, "unchanged": 2,
                               "pass_rate_delta": 0.0, "mean_score_delta": pytest.approx(-0.04)}
    assert [c["name"] for c in data["regressions"]] == ["capital"]
    assert data["regressions"][0] == {
        "name": "capital", "kind": "regression", "before": "pass", "after": "fail", "score_before": 1.0,
        "score_after": 0.0, "score_delta": -1.0, "detail": None, "carried": False}
    assert data["score_changes"][0]["name"] == "same" and data["score_changes"][0]["score_delta"] == pytest.approx(-0.2)
    assert data["a"]["id"] == "20260105-090000-aaaaaa" and data["b"]["pass_rate"] == 0.8
    assert "unchanged" not in data and [c["name"] for c in compare.to_dict(mixed, True)["unchanged"]] == ["add", "same"]


def test_markdown_for_a_pull_request_comment(mixed):
    md = compare.to_markdown(mixed)
    lines = md.splitlines()
    assert lines[0] == "### ❌ 1 regression in `qa`"
    assert lines[2].startswith("**1 regression, 1 fix, 1 new, 1 removed, 2 unchanged**; pass rate 80.0% → 80.0%")
    assert "`20260105-090000-aaaaaa` (before) → run `20260105-091000-bbbbbb` (after)" in md
    table = [line for line in lines if line.startswith("| regression") or line.startswith("| fix")]
    assert table == ["| regression | `capital` | pass | fail | 1.000 → 0.000 (-1.000) |  |",
                     "| fix | `haiku` | fail | pass | 0.000 → 1.000 (+1.000) |  |"]
    assert "<details><summary>new (1)</summary>" in md and "<details><summary>score changes (1)</summary>" in md
    assert md.endswith("</details>\n")


def test_markdown_without_regressions_and_with_hostile_names():
    hostile = "<script>alert(1)</script>|`x`*y*"
    c = compare_runs(run_row("A"), cases("A", {hostile: "fail"}), run_row("B"), cases("B", {hostile: "pass"}))
    md = compare.to_markdown(c)
    assert md.startswith("### ✅ No regressions in `qa`")
    row = next(line for line in md.splitlines() if line.startswith("| fix"))
    # Escaped: no tag, no code span, and the pipe does not open a new cell.
    assert "<script>" not in md and row.count(" | ") == 5
    assert r"\<script\>alert(1)\</script\>\|\`x\`\*y\*" in row


def test_markdown_tables_stay_short_enough_for_a_comment():
    many = {f"case-{i:03d}": "pass" for i in range(compare.MARKDOWN_ROWS + 7)}
    c = compare_runs(run_row("A"), cases("A", many), run_row("B"), cases("B", {n: "fail" for n in many}))
    md = compare.to_markdown(c)
    assert md.count("| regression |") == compare.MARKDOWN_ROWS
    assert "…and 7 more; `--format json` lists them all." in md
    assert len(json.loads(compare.render(c, "json"))["regressions"]) == compare.MARKDOWN_ROWS + 7
    with pytest.raises(ValueError, match="format: one of table, json, markdown"):
        compare.render(c, "yaml")
