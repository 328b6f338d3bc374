"""`evalrunner compare` end to end: a real subprocess on a real DuckDB file, each format, each exit code.

Exit codes (see evalrunner.cli): 0 no regression, 1 a regression, 2 bad input (an unknown or ambiguous
run id, a run still running).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from evalrunner import compare as compare_module
from evalrunner.faults import Faults
from evalrunner.models import RunStatus
from evalrunner.store import DuckDBStore

from compare_support import T0, record
from helpers import run_cli


@dataclass
class Runs:
    db: Path
    before: str  # qa: add, capital, haiku pass; old passes
    after: str  # qa: capital fails, haiku fixed, old removed, fresh new
    killed: str  # qa, attempt 1: killed after two cases
    resumed: str  # qa, attempt 2 of `killed`: carried `add` over, ran the rest
    staging: str  # qa-staging: the same cases as `resumed`
    running: str


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    db = tmp_path_factory.mktemp("compare") / "runs.duckdb"
    store = DuckDBStore.open(db, faults=Faults(""))
    try:
        at = iter(T0 + timedelta(minutes=i) for i in range(10))
        before = record(store, "qa", {"add": "pass", "capital": "pass", "haiku": ("fail", 0.25), "old": "pass"},
                        at=next(at), run_id="20260105-090000-aaaaaa")
        after = record(store, "qa", {"add": "pass", "capital": "fail", "haiku": ("pass", 0.75), "fresh": "pass"},
                       at=next(at), run_id="20260105-090100-bbbbbb")
        killed = record(store, "qa", {"add": "pass", "capital": "error"}, status=RunStatus.FAILED, cause="killed",
                        planned=("haiku", "fresh"), at=next(at), run_id="20260105-090200-cccccc")
        resumed = record(store, "qa", {"capital": "pass", "haiku": "pass", "fresh": "pass"}, parent=killed,
                         carried=("add",), at=next(at), run_id="20260105-090300-dddddd")
        staging = record(store, "qa-staging", {"add": "pass", "capital": "pass", "haiku": "pass", "fresh": "pass"},
                         at=next(at), run_id="20260105-090400-eeeeee")
        running = record(store, "qa", {"add": "pass"}, at=next(at), finish=False, run_id="20260105-090500-ffffff")
    finally:
        store.close()
    return Runs(db, before.id, after.id, killed.id, resumed.id, staging.id, running.id)


def compare(runs: Runs, *args: str):
    # --no-recover: the running row belongs to this (live) test process, but leave it alone regardless.
    return run_cli(["--no-recover", "compare", *args], runs.db, log_format=None)


def test_table_lists_regressions_and_exits_1(runs):
    result = compare(runs, runs.before, runs.after)
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert out.startswith(f"A {runs.before}  suite qa  attempt 1  completed  passed 3/4\n"
                          f"B {runs.after}  suite qa  attempt 1  completed  passed 3/4\n")
    assert "regressions (1)" in out and "fixes (1)" in out and "new (1)" in out and "removed (1)" in out
    assert "capital  pass    fail" in out and "output did not match" in out
    assert out.rstrip().endswith("1 regression, 1 fix, 1 new, 1 removed, 1 unchanged\n"
                                 "pass rate 75.0% -> 75.0% (+0.0 pp); mean score 0.812 -> 0.688 (-0.125)")
    assert result.stderr == ""


def test_json_with_unique_prefixes(runs):
    result = compare(runs, runs.before[:17], runs.after[:17], "--format", "json")
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    assert (data["a"]["id"], data["b"]["id"]) == (runs.before, runs.after)
    assert data["summary"]["regressions"] == 1 and data["summary"]["fixes"] == 1
    assert [c["name"] for c in data["regressions"]] == ["capital"]
    assert data["fixes"][0]["score_delta"] == 0.5 and data["warnings"] == []


def test_markdown_for_a_pull_request(runs):
    result = compare(runs, runs.before, runs.after, "--format", "markdown")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "### ❌ 1 regression in `qa`"
    assert "| change | case | before | after | score | detail |" in lines
    assert "| regression | `capital` | pass | fail | 1.000 → 0.000 (-1.000) | output did not match |" in lines
    assert result.stdout.endswith("</details>\n") and not result.stdout.endswith("\n\n")


def test_no_regression_exits_0_and_carried_cases_count(runs):
    """The resumed attempt's results are its own rows plus the case it carried over from the killed one."""
    result = compare(runs, runs.before, runs.resumed, "--format", "json", "--all")
    assert result.returncode == 0, result.stdout
    data = json.loads(result.stdout)
    assert data["regressions"] == [] and [c["name"] for c in data["fixes"]] == ["haiku"]
    carried = {c["name"]: c["carried"] for c in data["unchanged"]}
    assert carried == {"add": True, "capital": False}
    assert (data["b"]["passed"], data["b"]["cases"], data["b"]["attempt"]) == (4, 4, 2)


def test_a_killed_run_regresses_the_cases_it_never_ran(runs):
    result = compare(runs, runs.after, runs.killed)
    assert result.returncode == 1
    assert "regressions (2)" in result.stdout  # fresh and haiku passed before and were never run
    assert "was terminated (killed) before 2 of its 4 cases ran" in result.stdout
    assert f"resumed by a later attempt, {runs.resumed}" in result.stdout


def test_different_suites_are_compared_with_a_warning(runs):
    result = compare(runs, runs.resumed, runs.staging, "--format", "markdown")
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("### ✅ No regressions in `qa-staging`")
    assert ("> **Warning:** the runs are of different suites (qa and qa-staging); cases are matched by name "
            "all the same") in result.stdout


@pytest.mark.parametrize("args, message", [
    (("nope", "20260105-0901"), "no run with id 'nope'"),
    (("20260105-09", "20260105-090100-bbbbbb"), "run id prefix '20260105-09' is ambiguous"),
    (("20260105-090100-bbbbbb", "20260105-090500"), "run 20260105-090500-ffffff is still running"),
    (("20260105-090100-bbbbbb", "20260105-090500", "--format", "yaml"), "invalid choice: 'yaml'"),
])
def test_bad_input_exits_2(runs, args, message):
    result = compare(runs, *args)  # one at a time: a DuckDB file has one process at a time
    assert result.returncode == 2, result.stdout
    assert message in result.stderr and result.stdout == ""
    assert "Traceback" not in result.stderr


def test_the_command_offers_every_format():
    from evalrunner.cli import build_parser

    for fmt in compare_module.FORMATS:
        assert build_parser().parse_args(["compare", "a", "b", "--format", fmt]).format == fmt
