"""Suite-level locking (docs/ARCHITECTURE.md; the runbook's "new submissions collide with the stale row").

A `running` row of suite X is inserted for a real owner process: a live
`sleep` or a process that already exited. Then `evalrunner run` of a suite
named X decides by its `lock_policy`: Forbid refuses while the owner lives,
Allow runs beside it, Replace terminates it (and signals its owner); a stale
row (dead owner) never blocks a submission, whatever the policy.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from helpers import (
    copy_example_targets,
    dead_owner,
    events,
    insert_running_row,
    kill_and_reap,
    process_owner,
    query,
    read_run,
    read_runs,
    run_cli,
    start_sleeper,
    write_suite,
)
from evalrunner.store import CaseEvent, DuckDBStore
from evalrunner.store.duckdb_store import utcnow
from evalrunner.store.records import RunRow, case_row_id

SUITE = "exclusive"


def suite_file(directory: Path, policy: str) -> Path:
    copy_example_targets(directory)
    return write_suite(directory, f"""\
        name: {SUITE}
        timeout_seconds: 1
        lock_policy: {policy}
        target:
          python: {{callable: "targets:noop"}}
        cases:
          - {{id: one, input: x, expected: ok}}
          - {{id: two, input: y, expected: ok}}
        """)


@pytest.fixture
def sleeper():
    proc = start_sleeper(60)
    yield proc
    kill_and_reap(proc)


def live_row(db: Path, pid: int) -> RunRow:
    """A running row owned by `pid`, with one case row still running, as its runner would leave it."""
    row = insert_running_row(db, SUITE, process_owner(pid), case_names=("one", "two"))
    with DuckDBStore.open(db) as store:
        report = store.save_cases([CaseEvent(case_row_id(row.id, "one"), row.id, "one", "running", utcnow())])
        assert not report.failures and not report.fenced
        return store.get_run(row.id)  # a batch of case rows renews the heartbeat


def new_runs(db: Path, old: RunRow) -> list[RunRow]:
    return [r for r in read_runs(db, suite=SUITE) if r.id != old.id]


def test_forbid_refuses_while_owner_is_live(tmp_path: Path, sleeper) -> None:
    db = tmp_path / "db.duckdb"
    live = live_row(db, sleeper.pid)

    result = run_cli(["run", suite_file(tmp_path, "Forbid")], db)

    assert result.returncode == 4, result.stdout + result.stderr
    refusal = [e for e in events(result.stderr) if e.get("exit_code") == 4]
    assert refusal, result.stderr
    message = refusal[0]["error"]
    assert live.id in message and f"PID {sleeper.pid}" in message
    assert "evalrunner recover" in message  # says what to do
    assert read_run(db, live.id) == live, "the live row must be untouched"
    assert new_runs(db, live) == [], "a refused run leaves no row"
    assert sleeper.poll() is None


def test_allow_runs_beside_live_run(tmp_path: Path, sleeper) -> None:
    db = tmp_path / "db.duckdb"
    live = live_row(db, sleeper.pid)

    result = run_cli(["run", suite_file(tmp_path, "Allow")], db)

    assert result.returncode == 0, result.stdout + result.stderr
    assert read_run(db, live.id) == live
    [new] = new_runs(db, live)
    assert (new.status, new.passed, new.lock_policy) == ("completed", 2, "Allow")
    assert sleeper.poll() is None


def test_replace_terminates_live_run_and_signals_its_owner(tmp_path: Path, sleeper) -> None:
    db = tmp_path / "db.duckdb"
    live = live_row(db, sleeper.pid)

    result = run_cli(["run", suite_file(tmp_path, "Replace")], db)

    assert result.returncode == 0, result.stdout + result.stderr
    [new] = new_runs(db, live)
    assert new.status == "completed"
    old = read_run(db, live.id)
    assert old is not None
    assert (old.status, old.cause, old.terminated_by) == ("failed", "replaced", "admission")
    assert new.id in (old.error or "")
    # the old run's running case row is closed with it (same transaction)
    [(case_status, case_cause, case_completed)] = query(
        db, "SELECT status, cause, completed_at FROM eval_cases WHERE run_id = ?", [live.id]
    )
    assert (case_status, case_cause, case_completed) == ("failed", "replaced", old.completed_at)
    # its live owner was asked to stop
    assert sleeper.wait(timeout=5) == -signal.SIGTERM
    logged = [e for e in events(result.stderr) if e["event"] == "eval.run_terminated" and e["run_id"] == live.id]
    assert len(logged) == 1 and logged[0]["cause"] == "replaced" and logged[0]["replaced_by"] == new.id
    assert logged[0]["owner_signalled"] is True and logged[0]["suite"] == SUITE


@pytest.mark.parametrize("policy", ["Forbid", "Replace"])
def test_stale_row_never_blocks_a_submission(tmp_path: Path, policy: str) -> None:
    db = tmp_path / "db.duckdb"
    stale = insert_running_row(db, SUITE, dead_owner(), case_names=("one", "two"))

    result = run_cli(["run", suite_file(tmp_path, policy)], db)

    assert result.returncode == 0, result.stdout + result.stderr
    old = read_run(db, stale.id)
    assert old is not None
    # terminated as what it is (its owner died), not as "replaced"
    assert (old.status, old.cause, old.terminated_by) == ("failed", "killed", "sweeper")
    assert f"PID {stale.owner.pid}" in (old.error or "")  # type: ignore[union-attr]
    [new] = new_runs(db, stale)
    assert new.status == "completed"
    logged = [e for e in events(result.stderr) if e["event"] == "eval.run_terminated"]
    assert [(e["run_id"], e["suite"], e["cause"]) for e in logged] == [(stale.id, SUITE, "killed")]
    started = [e for e in events(result.stderr) if e["event"] == "eval.suite_started"]
    assert [e["run_id"] for e in started] == [new.id]


def test_row_whose_pid_was_reused_is_stale(tmp_path: Path, sleeper) -> None:
    """A live process with the owner's PID but another start time is not the owner."""
    db = tmp_path / "db.duckdb"
    impostor = process_owner(sleeper.pid)
    owner = process_owner(sleeper.pid, started_at=impostor.process_started_at - 3600)  # type: ignore[operator]
    stale = insert_running_row(db, SUITE, owner)

    result = run_cli(["run", suite_file(tmp_path, "Forbid")], db)

    assert result.returncode == 0, result.stdout + result.stderr
    old = read_run(db, stale.id)
    assert old is not None and (old.status, old.cause) == ("failed", "killed")
    assert new_runs(db, stale)[0].status == "completed"
    assert sleeper.poll() is None, "the unrelated process that reuses the PID is left alone"
