"""Resume after process death (docs/ARCHITECTURE.md, "The flow of a run": a later
attempt carries over the cases an earlier attempt completed, and does not re-run them).

A real `evalrunner run` is SIGKILLed mid-suite; `evalrunner run --resume`
then opens attempt 2. The target appends every input it is called with to the
file named by $RESUME_TEST_CALLS, which proves which cases each attempt
actually executed.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers import (
    LogReader,
    dead_owner,
    events,
    insert_running_row,
    kill_and_reap,
    process_owner,
    query,
    read_run,
    read_runs,
    run_cli,
    start_cli,
    start_sleeper,
    write_suite,
)

CASES = [f"c{i:02d}" for i in range(1, 11)]
CALLS_ENV = "RESUME_TEST_CALLS"

TARGET_MODULE = f'''\
import asyncio
import os


async def record(value):
    with open(os.environ["{CALLS_ENV}"], "a") as calls:
        calls.write(f"{{value}}\\n")
    await asyncio.sleep(0.15)
    return "done"
'''


def resumable_suite(directory: Path, name: str = "resumable") -> Path:
    (directory / "recording.py").write_text(TARGET_MODULE)
    cases = "\n".join(f"  - {{id: {c}, input: {c}, expected: done}}" for c in CASES)
    return write_suite(directory, f"""\
name: {name}
timeout_seconds: 1
concurrency: 1
target:
  python: {{callable: "recording:record"}}
cases:
{cases}
""")


def calls(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_resume_carries_over_completed_cases_and_runs_the_rest(tmp_path: Path) -> None:
    db = tmp_path / "db.duckdb"
    suite = resumable_suite(tmp_path)
    first_calls, second_calls = tmp_path / "calls-1.txt", tmp_path / "calls-2.txt"

    proc = start_cli(["--log-level", "debug", "run", suite], db, env={CALLS_ENV: str(first_calls)})
    reader = LogReader(proc)
    try:
        completed_logged = reader.wait_for("eval.case_completed", count=3)
        reader.wait_durable([e["case_id"] for e in completed_logged])
    finally:
        kill_and_reap(proc)
    reader.join()
    first_id = reader.wait_for("eval.suite_started")[0]["run_id"]
    logged_names = {e["case"] for e in completed_logged}
    first = read_run(db, first_id)
    assert first is not None and first.status == "running"
    done_in_first = {
        name for (name,) in query(db, "SELECT name FROM eval_cases WHERE run_id = ? AND status = 'completed'", [first_id])
    }
    assert logged_names <= done_in_first, "a case logged as completed was lost by SIGKILL"
    assert len(done_in_first) < len(CASES), "the run finished before it was killed; nothing to resume"

    result = run_cli(["run", suite, "--resume", first_id, "--json"], db, env={CALLS_ENV: str(second_calls)})

    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    second = data["run"]
    assert second["id"] != first_id
    assert (second["attempt"], second["parent_run_id"], second["status"]) == (2, first_id, "completed")
    # final counts cover every case of the suite, carried or executed
    assert (second["case_count"], second["passed"], second["failed"], second["errored"]) == (len(CASES), len(CASES), 0, 0)

    rows = {c["name"]: c for c in data["cases"]}
    assert set(rows) == set(CASES)
    carried = {name for name, row in rows.items() if row["carried_from"]}
    assert carried == done_in_first
    for name in carried:
        assert rows[name]["carried_from"] == f"{first_id}/{name}"
        assert rows[name]["id"] == f"{second['id']}/{name}" and rows[name]["status"] == "completed"
    for name in set(CASES) - carried:
        assert rows[name]["carried_from"] is None and rows[name]["status"] == "completed" and rows[name]["passed"]

    # not re-executed: attempt 2 called the target exactly for the cases attempt 1 had not completed
    assert sorted(calls(second_calls)) == sorted(set(CASES) - carried)
    assert carried <= set(calls(first_calls))

    started = [e for e in events(result.stderr) if e["event"] == "eval.suite_started"]
    assert len(started) == 1 and started[0]["carried_over"] == len(carried)
    assert started[0]["attempt"] == 2 and started[0]["parent_run_id"] == first_id

    # the killed first attempt was closed (by the resume command's recovery), not left running
    old = read_run(db, first_id)
    assert old is not None and (old.status, old.cause) == ("failed", "killed")

    show = run_cli(["show", second["id"]], db)
    assert show.returncode == 0, show.stderr
    assert f"attempts: {first_id} (failed) -> {second['id']} (completed)" in show.stdout
    assert "carried over" in show.stdout
    # the first attempt's page leads to the later one too
    assert json.loads(run_cli(["show", first_id, "--json"], db).stdout)["attempts"] == [first_id, second["id"]]


def test_resume_of_unknown_run_exits_2(tmp_path: Path) -> None:
    db = tmp_path / "db.duckdb"
    result = run_cli(["run", resumable_suite(tmp_path), "--resume", "no-such-run"], db,
                     env={CALLS_ENV: str(tmp_path / "calls.txt")})
    assert result.returncode == 2
    assert "no-such-run" in result.stderr
    assert not (tmp_path / "calls.txt").exists() and read_runs(db) == []


def test_resume_of_another_suites_run_exits_2(tmp_path: Path) -> None:
    db = tmp_path / "db.duckdb"
    other = insert_running_row(db, "other-suite", dead_owner())  # closed as killed by the command's sweep
    result = run_cli(["run", resumable_suite(tmp_path), "--resume", other.id], db,
                     env={CALLS_ENV: str(tmp_path / "calls.txt")})
    assert result.returncode == 2
    assert other.id in result.stderr and "other-suite" in result.stderr
    assert not (tmp_path / "calls.txt").exists()
    assert [r.suite for r in read_runs(db)] == ["other-suite"]


def test_resume_of_a_live_run_exits_2(tmp_path: Path) -> None:
    db = tmp_path / "db.duckdb"
    sleeper = start_sleeper()
    try:
        live = insert_running_row(db, "resumable", process_owner(sleeper.pid))
        result = run_cli(["run", resumable_suite(tmp_path), "--resume", live.id], db,
                         env={CALLS_ENV: str(tmp_path / "calls.txt")})
        assert result.returncode == 2, result.stderr
        assert live.id in result.stderr and "still running" in result.stderr
        assert read_run(db, live.id) == live
    finally:
        kill_and_reap(sleeper)
