"""The `evalrunner` command end to end: real subprocesses against real DuckDB files.

Exit codes are contract (see the docstring of evalrunner.cli): 0 passed,
1 failed/stuck, 2 bad input, 3 not recorded (locked), 4 refused by Forbid.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import (
    EXAMPLES,
    LogReader,
    copy_example_targets,
    dead_owner,
    events,
    insert_running_row,
    kill_and_reap,
    process_owner,
    query,
    read_run,
    read_runs,
    cli_args,
    cli_env,
    run_cli,
    start_cli,
    start_sleeper,
    write_suite,
)
from evalrunner.owner import Owner

SMOKE = EXAMPLES / "smoke.yaml"
MIXED = EXAMPLES / "mixed.yaml"
SLOW = EXAMPLES / "slow.yaml"

MIXED_VERDICTS = {
    "upper-ok": "pass",
    "upper-wrong": "fail",
    "contains-ok": "pass",
    "raises": "error",
    "times-out": "error",
    "regex-fail": "fail",
}


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert 'File "' not in stderr, stderr


@dataclass
class History:
    """One database with a smoke run, a mixed run and a dead owner's run closed by the sweep."""

    db: Path
    junit: Path
    ghost_id: str
    smoke: subprocess.CompletedProcess[str]
    mixed: subprocess.CompletedProcess[str]

    @property
    def smoke_run(self) -> dict:
        return json.loads(self.smoke.stdout)["run"]

    @property
    def mixed_json(self) -> dict:
        return json.loads(self.mixed.stdout)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    tmp = tmp_path_factory.mktemp("history")
    db = tmp / "runs.duckdb"
    ghost = insert_running_row(db, "ghost", dead_owner())
    smoke = run_cli(["run", SMOKE, "--json"], db)
    junit = tmp / "mixed.xml"
    mixed = run_cli(["run", MIXED, "--json", "--junit", junit], db)
    return History(db, junit, ghost.id, smoke, mixed)


# ---------------------------------------------------------------- exit codes


def test_passing_suite_exits_0_and_is_recorded_completed(history: History) -> None:
    assert history.smoke.returncode == 0, history.smoke.stderr
    run = read_run(history.db, history.smoke_run["id"])
    assert run is not None
    assert (run.status, run.cause, run.passed, run.failed, run.errored) == ("completed", None, 6, 0, 0)
    assert run.suite == "smoke" and run.attempt == 1


def test_suite_with_failures_exits_1(history: History) -> None:
    assert history.mixed.returncode == 1, history.mixed.stderr
    run = history.mixed_json["run"]
    assert (run["status"], run["passed"], run["failed"], run["errored"]) == ("completed", 2, 2, 2)


def test_malformed_suite_exits_2_naming_file_and_field(tmp_path: Path, history: History) -> None:
    bad = write_suite(tmp_path, """\
        name: broken
        timeout_seconds: -1
        target:
          python: {callable: "targets:noop"}
        cases:
          - {id: a, input: x}
        """, name="broken.yaml")
    before = len(read_runs(history.db))
    result = run_cli(["run", bad], history.db, log_format=None)
    assert result.returncode == 2
    assert str(bad) in result.stderr
    assert "timeout_seconds" in result.stderr
    assert "greater than 0" in result.stderr
    assert_no_traceback(result.stderr)
    assert len(read_runs(history.db)) == before, "a refused suite must not create a row"


def test_malformed_suite_in_json_log_format_is_still_json(tmp_path: Path) -> None:
    bad = write_suite(tmp_path, "name: broken\ncases: [{id: a, input: x}]\n", name="broken.yaml")
    result = run_cli(["run", bad], tmp_path / "db.duckdb")
    assert result.returncode == 2
    lines = events(result.stderr)  # every line parses as a JSON object
    assert any(str(bad) in json.dumps(e) and "target" in json.dumps(e) for e in lines), result.stderr


def test_show_unknown_run_id_exits_2(history: History) -> None:
    result = run_cli(["show", "no-such-run"], history.db, log_format=None)
    assert result.returncode == 2
    assert "no-such-run" in result.stderr and "evalrunner runs" in result.stderr
    assert_no_traceback(result.stderr)


def test_locked_database_exits_3_naming_holder_pid(tmp_path: Path) -> None:
    db = tmp_path / "locked.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(60)",
         str(db)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = run_cli(["run", SMOKE], db, log_format=None)
        assert result.returncode == 3, result.stderr
        assert f"process {holder.pid}" in result.stderr
        assert str(db) in result.stderr
        # says what to do
        assert "Wait for it to finish" in result.stderr and "--db" in result.stderr
        assert "start `evalrunner serve --db FILE` first" in result.stderr
        assert_no_traceback(result.stderr)

        doctor = run_cli(["doctor"], db, log_format=None)
        assert doctor.returncode == 1
        lock_lines = [line for line in doctor.stdout.splitlines() if "lock:" in line]
        assert lock_lines and lock_lines[0].startswith("FAIL"), doctor.stdout
        assert str(holder.pid) in lock_lines[0]
        assert_no_traceback(doctor.stderr)
    finally:
        kill_and_reap(holder)
    # once the holder is gone the same file works and nothing was lost
    assert run_cli(["run", SMOKE], db).returncode == 0


def test_forbid_policy_refusal_exits_4(tmp_path: Path) -> None:
    copy_example_targets(tmp_path)
    suite = write_suite(tmp_path, """\
        name: exclusive
        timeout_seconds: 1
        lock_policy: Forbid
        target:
          python: {callable: "targets:noop"}
        cases:
          - {id: one, input: x, expected: ok}
        """)
    db = tmp_path / "db.duckdb"
    sleeper = start_sleeper()
    try:
        live = insert_running_row(db, "exclusive", process_owner(sleeper.pid))
        result = run_cli(["run", suite], db, log_format=None)
        assert result.returncode == 4, result.stderr
        assert live.id in result.stderr and "Forbid" in result.stderr
        assert_no_traceback(result.stderr)
    finally:
        kill_and_reap(sleeper)


# ---------------------------------------------------------------- output formats


def test_run_json_has_run_and_cases(history: History) -> None:
    data = history.mixed_json
    assert set(data) >= {"run", "cases"}
    assert data["run"]["suite"] == "mixed" and data["run"]["status"] == "completed"
    by_name = {c["name"]: c for c in data["cases"]}
    assert set(by_name) == set(MIXED_VERDICTS)
    for case in data["cases"]:
        assert case["run_id"] == data["run"]["id"]
        assert case["id"] == f"{data['run']['id']}/{case['name']}"
    assert by_name["raises"]["status"] == "failed" and by_name["raises"]["cause"] == "case_raised"
    assert by_name["times-out"]["cause"] == "case_timeout"
    assert by_name["upper-wrong"]["status"] == "completed" and by_name["upper-wrong"]["passed"] is False
    assert by_name["upper-ok"]["passed"] is True


def test_run_junit_xml_matches_mixed_suite(history: History) -> None:
    root = ET.fromstring(history.junit.read_bytes())
    assert root.tag == "testsuite" and root.get("name") == "mixed"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("6", "2", "2")
    cases = {tc.get("name"): tc for tc in root.iter("testcase")}
    assert set(cases) == set(MIXED_VERDICTS)
    for name, verdict in MIXED_VERDICTS.items():
        tc = cases[name]
        failures, errors = tc.findall("failure"), tc.findall("error")
        if verdict == "pass":
            assert not failures and not errors, name
        elif verdict == "fail":
            assert len(failures) == 1 and not errors, name
            assert failures[0].get("message"), name
        else:
            assert len(errors) == 1 and not failures, name
    assert cases["raises"].find("error").get("type") == "case_raised"  # type: ignore[union-attr]
    assert "exploded" in cases["raises"].find("error").get("message")  # type: ignore[union-attr]
    assert cases["times-out"].find("error").get("type") == "case_timeout"  # type: ignore[union-attr]
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["run.id"] == history.mixed_json["run"]["id"]
    assert props["run.attempt"] == "1" and props["run.cause"] == "" and props["run.parent_run_id"] == ""


def test_log_format_json_every_line_is_an_event_with_ids(history: History, tmp_path: Path) -> None:
    seen: set[str] = set()
    for stderr in (history.smoke.stderr, history.mixed.stderr):
        for event in events(stderr):  # fails on any line that is not a JSON object
            name = event.get("event", "")
            seen.add(name)
            if name.startswith("eval."):
                assert event.get("run_id") and event.get("suite"), event
            if name.startswith("eval.case_"):
                assert event.get("case_id", "").startswith(event["run_id"] + "/"), event
    assert {"eval.suite_started", "eval.case_completed", "eval.case_failed", "eval.suite_completed",
            "eval.run_terminated"} <= seen
    terminated = [e for e in events(history.smoke.stderr) if e["event"] == "eval.run_terminated"]
    assert [(e["run_id"], e["suite"], e["cause"]) for e in terminated] == [(history.ghost_id, "ghost", "killed")]


# ---------------------------------------------------------------- runs / show


def ids(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [r["id"] for r in json.loads(result.stdout)]


def test_runs_filters_by_status_and_suite(history: History) -> None:
    smoke_id, mixed_id = history.smoke_run["id"], history.mixed_json["run"]["id"]
    assert ids(run_cli(["runs", "--status", "completed", "--json"], history.db)) == [mixed_id, smoke_id]
    assert ids(run_cli(["runs", "--suite", "smoke", "--json"], history.db)) == [smoke_id]
    text = run_cli(["runs", "--status", "failed"], history.db)
    assert history.ghost_id in text.stdout and "killed" in text.stdout and smoke_id not in text.stdout


def test_runs_quiet_prints_ids_only_for_scripts(history: History) -> None:
    result = run_cli(["runs", "--suite", "mixed", "--limit", "1", "-q"], history.db, log_format=None)
    assert result.returncode == 0
    [run_id] = result.stdout.split()
    assert read_run(history.db, run_id).suite == "mixed"  # type: ignore[union-attr]


def test_show_by_id_and_unique_prefix(history: History) -> None:
    mixed_id = history.mixed_json["run"]["id"]
    full = run_cli(["show", mixed_id], history.db)
    assert full.returncode == 0, full.stderr
    for name in MIXED_VERDICTS:
        assert name in full.stdout
    assert f"run {mixed_id}" in full.stdout and "owner: PID" in full.stdout

    prefix = run_cli(["show", mixed_id[:-2], "--json"], history.db)
    assert prefix.returncode == 0, prefix.stderr
    data = json.loads(prefix.stdout)
    assert data["run"]["id"] == mixed_id and data["attempts"] == [mixed_id]
    assert len(data["cases"]) == 6

    ambiguous = run_cli(["show", mixed_id[:2]], history.db, log_format=None)
    assert ambiguous.returncode == 2 and "ambiguous" in ambiguous.stderr


# ---------------------------------------------------------------- doctor / verify / recover


def test_doctor_ok_on_fresh_database(tmp_path: Path) -> None:
    missing = run_cli(["doctor"], tmp_path / "fresh.duckdb", log_format=None)
    assert missing.returncode == 0 and "no database yet" in missing.stdout
    assert not (tmp_path / "fresh.duckdb").exists()  # doctor only looks
    assert run_cli(["run", str(EXAMPLES / "smoke.yaml")], tmp_path / "fresh.duckdb").returncode == 0
    result = run_cli(["doctor"], tmp_path / "fresh.duckdb", log_format=None)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("ok") for line in lines), result.stdout
    assert any("writable" in line for line in lines)


def test_verify_clean_database_exits_0(history: History) -> None:
    result = run_cli(["verify"], history.db)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: no run is stuck" in result.stdout


def kill_after_first_case(db: Path) -> tuple[str, Owner | None]:
    """SIGKILL a real `evalrunner run slow.yaml` once a case completed and the next ones are recorded."""
    proc = start_cli(["--log-level", "debug", "run", SLOW], db)
    reader = LogReader(proc)
    try:
        started = reader.wait_for("eval.suite_started")[0]
        completed = reader.wait_for("eval.case_completed")[0]
        reader.wait_durable([completed["case_id"]], running=1)  # the completed row and the next running one
    finally:
        kill_and_reap(proc)
    reader.join()
    run = read_run(db, started["run_id"])
    assert run is not None and run.status == "running"
    return started["run_id"], run.owner


def test_stuck_run_of_killed_process_is_reported_then_recovered_manually(tmp_path: Path) -> None:
    db = tmp_path / "db.duckdb"
    run_id, owner = kill_after_first_case(db)
    assert owner is not None and owner.kind == "process"

    verify = run_cli(["--no-recover", "verify"], db, log_format=None)
    assert verify.returncode == 1, verify.stdout
    stuck = [line for line in verify.stdout.splitlines() if line.startswith("STUCK")]
    assert len(stuck) == 1 and run_id in stuck[0] and "killed" in stuck[0] and f"PID {owner.pid}" in stuck[0]
    assert read_run(db, run_id).status == "running"  # type: ignore[union-attr]  # inspect only

    cases_before = {name: status for name, status in query(db, "SELECT name, status FROM eval_cases WHERE run_id = ?", [run_id])}
    assert "running" in cases_before.values() and "completed" in cases_before.values(), cases_before

    recover = run_cli(["--no-recover", "recover", run_id, "--reason", "host rebooted at 03:00"], db)
    assert recover.returncode == 0, recover.stderr
    run = read_run(db, run_id)
    assert run is not None
    assert (run.status, run.cause, run.terminated_by) == ("failed", "manual", "manual")
    assert "host rebooted at 03:00" in (run.error or "")
    rows = query(db, "SELECT name, status, cause, completed_at, error FROM eval_cases WHERE run_id = ?", [run_id])
    for name, status, cause, completed_at, error in rows:
        if cases_before[name] == "running":
            # terminated in the same transaction as the run row
            assert (status, cause, completed_at) == ("failed", "manual", run.completed_at), name
            assert "host rebooted at 03:00" in error
        else:
            assert status == "completed" and cause is None, name
    assert run.errored == sum(1 for s in cases_before.values() if s == "running")
    terminated = [e for e in events(recover.stderr) if e["event"] == "eval.run_terminated"]
    assert terminated and terminated[0]["run_id"] == run_id and terminated[0]["cause"] == "manual"

    assert run_cli(["verify"], db).returncode == 0
    again = run_cli(["recover", run_id, "--reason", "twice"], db)
    assert again.returncode == 0 and "already failed" in again.stdout
    assert read_run(db, run_id).error == run.error  # type: ignore[union-attr]  # terminal rows never change


def test_recover_with_a_reason_after_a_kill_records_both_the_cause_and_the_reason(tmp_path: Path) -> None:
    """Without --no-recover the command's own sweep closes the killed run first: the reason must still be kept."""
    db = tmp_path / "db.duckdb"
    run_id, _ = kill_after_first_case(db)
    recover = run_cli(["recover", run_id, "--reason", "disk was full"], db, log_format=None)
    assert recover.returncode == 0, recover.stderr
    assert "not recorded" not in recover.stdout, recover.stdout
    run = read_run(db, run_id)
    assert run is not None and (run.status, run.cause) == ("failed", "killed"), "the precise cause stays"
    assert "disk was full" in (run.error or ""), run.error
    assert run.terminated_by == "manual", "the operator's command closed it"


def test_runs_shows_the_runners_own_duration_and_who_closed_each_run(tmp_path: Path, history: History) -> None:
    """A killed run swept seconds later took as long as its runner lived, not until the sweep."""
    db = tmp_path / "db.duckdb"
    run_id, _ = kill_after_first_case(db)
    killed_at = time.monotonic()
    time.sleep(2.5)
    listed = run_cli(["runs"], db, log_format=None)
    swept_after = time.monotonic() - killed_at
    header, _, *rows = listed.stdout.splitlines()
    columns = header.split()
    assert "closed" in header and "by" in header, header
    row = next(r for r in rows if r.startswith(run_id)).split()
    secs = float(row[columns.index("secs") + 1])  # "closed by" is two words in the header
    runner = read_run(db, run_id)
    assert runner is not None and runner.terminated_by == "sweeper"
    lived = (runner.heartbeat_at - runner.started_at).total_seconds()
    closed_span = (runner.completed_at - runner.started_at).total_seconds()  # until the sweep closed it
    assert abs(secs - lived) < 0.01 and secs < closed_span - 2, (secs, lived, closed_span, swept_after)
    assert "sweeper" in row

    own = run_cli(["runs"], history.db, log_format=None).stdout.splitlines()[2:]
    assert own and all(re.search(r"  \d+\.\d\d  ", line) for line in own), own  # one format: 0.03, 1.03
    assert all(" runner " in line for line in own if not line.startswith(history.ghost_id)), own


def test_verify_terminates_dead_owner_run_when_recovering(tmp_path: Path) -> None:
    db = tmp_path / "db.duckdb"
    stuck = insert_running_row(db, "ghost", dead_owner())
    result = run_cli(["verify"], db)
    assert result.returncode == 0, result.stdout
    assert f"terminated {stuck.id}" in result.stdout
    run = read_run(db, stuck.id)
    assert run is not None and (run.status, run.cause) == ("failed", "killed")


def test_recover_of_dead_owner_run_says_what_closed_it(tmp_path: Path) -> None:
    """Without --no-recover the recovery on open closes the row (cause `killed`), with the reason; say so."""
    db = tmp_path / "db.duckdb"
    stuck = insert_running_row(db, "ghost", dead_owner())
    result = run_cli(["recover", stuck.id[:12], "--reason", "stuck since monday"], db)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" not in result.stdout
    assert f"run {stuck.id} terminated: failed (killed)" in result.stdout
    assert "Manual recovery: stuck since monday" in result.stdout
    run = read_run(db, stuck.id)
    assert run is not None and (run.status, run.cause) == ("failed", "killed")
    assert run.error.endswith("; Manual recovery: stuck since monday"), run.error


def test_recover_row_whose_owner_cannot_be_checked(tmp_path: Path) -> None:
    """An owner on another host cannot be proven dead: the sweep leaves it, `recover` closes it."""
    db = tmp_path / "db.duckdb"
    owner = Owner(kind="process", host=f"not-{socket.gethostname()}", pid=1, process_started_at=0.0)
    stuck = insert_running_row(db, "remote", owner, case_names=("a", "b"))
    verify = run_cli(["verify"], db)
    assert verify.returncode == 0, verify.stdout  # its owner may be alive; not stuck yet
    assert f"running {stuck.id}" in verify.stdout and "cannot be checked from this host" in verify.stdout
    assert read_run(db, stuck.id).status == "running"  # type: ignore[union-attr]

    result = run_cli(["recover", stuck.id, "--reason", "node decommissioned"], db)
    assert result.returncode == 0, result.stderr
    run = read_run(db, stuck.id)
    assert run is not None and (run.status, run.cause) == ("failed", "manual")
    assert run.error == "Manual recovery: node decommissioned"


def test_recover_refuses_live_owner_unless_forced(tmp_path: Path) -> None:
    db = tmp_path / "db.duckdb"
    sleeper = start_sleeper()
    try:
        live = insert_running_row(db, "busy", process_owner(sleeper.pid))
        refused = run_cli(["recover", live.id, "--reason", "looks stuck"], db, log_format=None)
        assert refused.returncode == 2
        assert live.id in refused.stderr and f"PID {sleeper.pid}" in refused.stderr
        assert "--force" in refused.stderr
        assert_no_traceback(refused.stderr)
        assert read_run(db, live.id).status == "running"  # type: ignore[union-attr]

        forced = run_cli(["recover", live.id, "--reason", "looks stuck", "--force"], db)
        assert forced.returncode == 0, forced.stderr
        run = read_run(db, live.id)
        assert run is not None and (run.status, run.cause) == ("failed", "manual")
        assert "looks stuck" in (run.error or "")
        assert sleeper.poll() is None, "recover only closes the row; it does not kill the owner"
    finally:
        kill_and_reap(sleeper)


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_closed_output_pipe_does_not_change_the_runs_result(tmp_path: Path, log_format: str) -> None:
    """`evalrunner run SUITE 2>&1 | head -3`: the reader goes away after three lines; the run still passed."""
    db = tmp_path / "pipe.duckdb"
    proc = subprocess.Popen(cli_args(["run", str(SMOKE)], db, log_format), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=cli_env())
    assert proc.stdout is not None
    for _ in range(3):
        proc.stdout.readline()
    proc.stdout.close()  # what `head -3` does once it has its lines
    assert proc.wait(timeout=60) == 0, "all six cases passed: a closed stdout is not a failure"
    run = read_runs(db)[0]
    assert (run.status, run.cause, run.passed) == ("completed", None, 6), run


def test_a_timed_out_sync_target_does_not_hold_the_process(tmp_path: Path) -> None:
    """A synchronous target cannot be interrupted; the process still ends when its cases are decided."""
    (tmp_path / "stuck.py").write_text("import time\n\ndef wait(value):\n    time.sleep(6)\n    return value\n")
    suite = write_suite(tmp_path, """\
name: stuck
timeout_seconds: 0.5
concurrency: 2
target: {python: {callable: "stuck:wait"}}
cases:
  - {id: a, input: x, expected: x}
  - {id: b, input: y, expected: y}
""")
    db = tmp_path / "db.duckdb"
    began = time.monotonic()
    result = run_cli(["run", suite], db)
    took = time.monotonic() - began
    assert result.returncode == 1, result.stderr
    run = read_runs(db)[0]
    assert (run.status, run.errored) == ("completed", 2)
    assert took < 4, f"the process waited {took:.1f}s for threads whose cases timed out at 0.5 s"


def test_the_controller_without_any_credentials_says_what_is_missing(tmp_path: Path) -> None:
    """No service-account token (not in a pod) and no kubeconfig: one clear line and exit 2, no traceback."""
    env = {"HOME": str(tmp_path), "KUBECONFIG": ""}
    result = run_cli(["controller", "--port", "0"], tmp_path / "db.duckdb", env=env, log_format=None, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "serviceaccount/token" in result.stderr and "--kubeconfig" in result.stderr, result.stderr
    assert_no_traceback(result.stderr)
    assert not (tmp_path / "db.duckdb").exists(), "nothing is created before the credentials are found"
