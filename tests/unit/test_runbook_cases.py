"""The runbook's three failure cases, injected into real `evalrunner` processes.

Each test breaks something for real (a DuckDB write made to fail with its own
IOException, SIGKILL, SIGTERM), then asserts on rows, logs and exit codes,
and finally runs the runbook's own SQL against the file the product wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "suites"
EVALRUNNER = [sys.executable, "-m", "evalrunner.cli"]


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "EVALRUNNER_FAULTS"}
    out["PYTHONPATH"] = str(ROOT / "operator")
    out.update(extra)
    return out


def cli(db: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EVALRUNNER, *args, "--db", str(db), "--log-format", "json"],
        capture_output=True, text=True, env=env(**extra_env), timeout=60,
    )


def events(stderr: str, name: str | None = None) -> list[dict]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            ev = json.loads(line)
            if name is None or ev["event"] == name:
                out.append(ev)
    return out


def rows(db: Path, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(db)) as con:
        return con.execute(sql, params or []).fetchall()


def start_slow_run(db: Path, **extra_env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*EVALRUNNER, "run", str(EXAMPLES / "slow.yaml"), "--db", str(db), "--log-format", "json", "--no-progress",
         "--log-level", "debug"],  # debug: `eval.cases_saved` says which case rows are committed
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(**extra_env),
    )


def read_until(proc: subprocess.Popen[str], event: str, count: int, timeout: float = 30) -> tuple[list[dict], list[str]]:
    """Read JSON log lines from stderr until `count` events named `event` were seen."""
    seen, lines = [], []
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        assert time.monotonic() < deadline, f"timed out waiting for {count}x {event}; got {lines[-5:]}"
        line = proc.stderr.readline()
        assert line, f"process ended early: {lines[-5:]}"
        lines.append(line)
        if line.startswith("{"):
            ev = json.loads(line)
            if ev["event"] == event:
                seen.append(ev)
    return seen, lines


def read_until_durable(proc: subprocess.Popen[str], read: list[str], case_ids: set[str], running: int = 0,
                       timeout: float = 30) -> None:
    """Read on (after the lines already `read`) until the runner logs these case results, and then
    `running` rows in flight, as committed."""
    saved: set[str] = set()
    in_flight = 0
    lines = iter(read)
    deadline = time.monotonic() + timeout
    while not (case_ids <= saved and in_flight >= running):
        assert time.monotonic() < deadline, f"{sorted(case_ids - saved)} never logged as committed"
        line = next(lines, None) or proc.stderr.readline()
        assert line, "process ended early"
        if line.startswith("{") and (ev := json.loads(line))["event"] == "eval.cases_saved":
            saved |= set(ev["case_ids"])
            in_flight = in_flight + len(ev["running_ids"]) if case_ids <= saved else 0


# ---------------------------------------------------------------- case 1


def test_case1_case_save_failure_leaves_siblings_and_terminates_suite(tmp_path):
    db = tmp_path / "c1.duckdb"
    result = cli(db, "run", str(EXAMPLES / "smoke.yaml"), EVALRUNNER_FAULTS="case_save=pow")
    (failed,) = events(result.stderr, "eval.case_save_failed")
    run_id = failed["run_id"]
    assert failed["case_id"] == f"{run_id}/pow" and failed["suite"] == "smoke"
    assert result.returncode == 1  # a case errored: its result is not recorded
    status, cause = rows(db, "SELECT status, cause FROM eval_runs WHERE id = ?", [run_id])[0]
    assert status == "completed"
    cases = dict(rows(db, "SELECT name, status FROM eval_cases WHERE run_id = ?", [run_id]))
    assert cases.pop("pow") == "failed"
    assert set(cases.values()) == {"completed"} and len(cases) == 5


# ---------------------------------------------------------------- case 2


def test_case2_status_write_failure_then_next_command_closes_the_row(tmp_path):
    db = tmp_path / "c2.duckdb"
    result = cli(db, "run", str(EXAMPLES / "mixed.yaml"), EVALRUNNER_FAULTS="suite_status_write=*")
    assert result.returncode == 3, result.stderr
    (event,) = events(result.stderr, "eval.suite_status_write_failed")
    run_id = event["run_id"]
    assert "Traceback" in event["exception"] and "IOException" in event["exception"]
    (refusal,) = events(result.stderr, "cli.error")
    assert refusal["exit_code"] == 3 and "closes it" in refusal["error"]
    # The row is stuck exactly as the runbook describes...
    assert rows(db, "SELECT status FROM eval_runs WHERE id = ?", [run_id]) == [("running",)]

    # ...until the next command (the database is fine again), which closes it from the runner's summary.
    listing = cli(db, "runs")
    (terminated,) = events(listing.stderr, "eval.run_terminated")
    assert terminated["run_id"] == run_id
    status, cause, by, passed, failed, errored = rows(
        db, "SELECT status, cause, terminated_by, passed, failed, errored FROM eval_runs WHERE id = ?", [run_id]
    )[0]
    assert (status, by) == ("completed", "sweeper (runner summary)")
    assert (passed, failed, errored) == (2, 2, 2)


def test_case2_recover_closes_the_row_when_no_summary_survived(tmp_path):
    db = tmp_path / "c2b.duckdb"
    result = cli(db, "run", str(EXAMPLES / "smoke.yaml"), EVALRUNNER_FAULTS="suite_status_write=*")
    run_id = events(result.stderr, "eval.suite_status_write_failed")[0]["run_id"]
    for leftover in (tmp_path / "c2b.duckdb.unwritten").glob("*.json"):
        leftover.unlink()  # the disk was as broken as the database

    recovered = cli(db, "--no-recover", "recover", run_id, "--reason", "disk was full at 12:00")
    assert recovered.returncode == 0, recovered.stderr
    status, cause, error = rows(db, "SELECT status, cause, error FROM eval_runs WHERE id = ?", [run_id])[0]
    assert (status, cause) == ("failed", "manual")
    assert error == "Manual recovery: disk was full at 12:00"
    assert events(recovered.stderr, "eval.run_terminated")[0]["run_id"] == run_id


# ---------------------------------------------------------------- case 3


def test_case3_sigkill_mid_run_is_terminated_by_the_next_command_without_losing_cases(tmp_path):
    db = tmp_path / "c3.duckdb"
    proc = start_slow_run(db)
    try:
        completed, read = read_until(proc, "eval.case_completed", 3)
        durable = {e["case_id"] for e in completed}
        read_until_durable(proc, read, durable)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    run_id = completed[0]["run_id"]
    assert rows(db, "SELECT status FROM eval_runs WHERE id = ?", [run_id]) == [("running",)]

    listing = cli(db, "runs", "--json")
    assert listing.returncode == 0
    listed = {r["id"]: r for r in json.loads(listing.stdout)}
    assert listed[run_id]["status"] == "failed" and listed[run_id]["cause"] == "killed"
    (terminated,) = events(listing.stderr, "eval.run_terminated")
    assert terminated["run_id"] == run_id and terminated["cause"] == "killed"
    assert f"PID {proc.pid}" in terminated["error"]

    case_rows = dict(rows(db, "SELECT id, status FROM eval_cases WHERE run_id = ?", [run_id]))
    assert all(case_rows[cid] == "completed" for cid in durable), "a completed case was lost"
    assert "running" not in case_rows.values()
    assert set(case_rows.values()) <= {"completed", "failed"}


def test_case3_sigterm_requests_shutdown_and_terminates_the_row(tmp_path):
    db = tmp_path / "term.duckdb"
    proc = start_slow_run(db)
    try:
        completed, _ = read_until(proc, "eval.case_completed", 2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    (shutdown,) = events(err, "actor.shutdown_requested")
    run_id = shutdown["run_id"]
    assert shutdown["signal"] == "SIGTERM" and shutdown["in_flight"] >= 1
    (failed,) = events(err, "eval.suite_failed")
    assert failed["cause"] == "shutdown_requested"
    status, cause = rows(db, "SELECT status, cause FROM eval_runs WHERE id = ?", [run_id])[0]
    assert (status, cause) == ("failed", "shutdown_requested")
    case_rows = rows(db, "SELECT status, cause FROM eval_cases WHERE run_id = ?", [run_id])
    assert ("failed", "shutdown_requested") in case_rows  # in-flight cases were cancelled and closed
    assert sum(1 for s, _ in case_rows if s == "completed") >= 2
    assert all(s != "running" for s, _ in case_rows)


# ---------------------------------------------------------------- the runbook's SQL


def test_runbook_sql_runs_verbatim_against_a_product_database(tmp_path):
    db = tmp_path / "runbook.duckdb"
    proc = start_slow_run(db)
    try:
        completed, read = read_until(proc, "eval.case_completed", 2)
        read_until_durable(proc, read, {e["case_id"] for e in completed}, running=1)  # a sibling is in flight
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    with duckdb.connect(str(db)) as con:
        stuck_run_id = con.execute("SELECT id FROM eval_runs WHERE status = 'running'").fetchone()[0]
        case_id = con.execute(
            "SELECT id FROM eval_cases WHERE run_id = ? AND status = 'running' LIMIT 1", [stuck_run_id]
        ).fetchone()[0]
        runbook = (ROOT.parent / "shared" / "runbook.md")
        sql_blocks = _sql_blocks(runbook.read_text()) if runbook.exists() else _RUNBOOK_SQL
        case_update, run_update, verify = sql_blocks
        con.execute(case_update.replace("<timestamp>", "2026-11-29T12:00:00Z").replace("<case_id>", case_id))
        con.execute(run_update.replace("<stuck_run_id>", stuck_run_id))
        remaining = con.execute(verify).fetchall()
        assert remaining == []
        assert con.execute("SELECT status, error FROM eval_cases WHERE id = ?", [case_id]).fetchone() == (
            "failed", "Manual recovery: see eval.case_save_failed at 2026-11-29T12:00:00Z")
        assert con.execute("SELECT status, error FROM eval_runs WHERE id = ?", [stuck_run_id]).fetchone() == (
            "failed", "Manual recovery")
        # The runbook updates one case row; its in-flight siblings are left running under a failed run.
        stranded = [r[0] for r in con.execute(
            "SELECT id FROM eval_cases WHERE run_id = ? AND status = 'running'", [stuck_run_id]).fetchall()]
    assert stranded, "the slow suite runs two cases at a time: a sibling was in flight"

    # The product reads what the runbook wrote: verify reports the stranded rows and fails ...
    inspected = cli(db, "--no-recover", "verify")
    assert inspected.returncode == 1, inspected.stdout
    assert f"STRANDED {len(stranded)} case row(s) running under failed run {stuck_run_id}" in inspected.stdout
    # ... and the next command closes them with the run's cause (manual: the runbook set none).
    repaired = cli(db, "verify")
    assert repaired.returncode == 1 and f"REPAIRED {len(stranded)} case row(s)" in repaired.stdout
    (logged,) = events(repaired.stderr, "eval.stranded_cases_closed")
    assert (logged["run_id"], logged["cases"], logged["cause"]) == (stuck_run_id, len(stranded), "manual")
    assert rows(db, "SELECT DISTINCT status, cause FROM eval_cases WHERE list_contains(?, id)", [stranded]) == [
        ("failed", "manual")]
    assert rows(db, "SELECT status, error FROM eval_runs WHERE id = ?", [stuck_run_id]) == [
        ("failed", "Manual recovery")]  # the run row the runbook wrote is kept as it is
    verified = cli(db, "verify")
    assert verified.returncode == 0 and "no run is stuck" in verified.stdout


def _sql_blocks(markdown: str) -> list[str]:
    blocks, inside, current = [], False, []
    for line in markdown.splitlines():
        if line.strip().startswith("```sql"):
            inside, current = True, []
        elif line.strip().startswith("```") and inside:
            inside = False
            blocks.append("\n".join(current))
        elif inside:
            current.append(line)
    assert len(blocks) == 3, "the runbook has two UPDATEs and one Verify SELECT"
    return blocks


# The runbook's statements, verbatim, for checkouts without ../shared beside them.
_RUNBOOK_SQL = [
    """UPDATE eval_cases
SET status = 'failed',
    error = 'Manual recovery: see eval.case_save_failed at <timestamp>'
WHERE id = '<case_id>';""",
    """UPDATE eval_runs
SET status = 'failed',
    completed_at = CURRENT_TIMESTAMP,
    error = 'Manual recovery'
WHERE id = '<stuck_run_id>';""",
    """-- No rows should be 'running' from before the current process started
SELECT id, status, created_at, completed_at
FROM eval_runs
WHERE status = 'running'
ORDER BY created_at DESC;""",
]
