"""Completed case results survive a full disk, a lost final write and a trimmed summary.

Real parts throughout: `evalrunner` subprocesses on a real 2 MiB tmpfs that
fills up for real, DuckDB files read back after the fact, the store service
over real HTTP. Each test names the loss it guards against.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from disk_support import fill, grow, small_disk
from helpers import (
    EXAMPLES,
    LogReader,
    dead_owner,
    events,
    insert_running_row,
    query,
    read_run,
    run_cli,
    start_cli,
)

from evalrunner import recovery, summary
from evalrunner.controller.classify import runner_summary
from evalrunner.faults import Faults
from evalrunner.models import Cause, RunStatus
from evalrunner.owner import this_process
from evalrunner.store import CaseEvent, DuckDBStore, RunRequest
from evalrunner.store.duckdb_store import utcnow
from evalrunner.store.records import case_row_id
from evalrunner.store.reserve import RESERVE_BYTES

SMOKE = EXAMPLES / "smoke.yaml"


def case_rows(db: Path, run_id: str) -> dict[str, tuple]:
    """case row id -> (status, cause, passed) for one run."""
    found = query(db, "SELECT id, status, cause, passed FROM eval_cases WHERE run_id = ?", [run_id])
    return {r[0]: r[1:] for r in found}


def completed_case_ids(log_events: list[dict]) -> set[str]:
    return {e["case_id"] for e in log_events if e["event"] == "eval.case_completed"}


# ---------------------------------------------------------------- smoke runs until the disk is full


def test_smoke_runs_until_the_disk_is_full_keep_every_case_they_reported(tmp_path):
    """Once lost: a run whose final write hit the full disk left a 0-byte summary and was closed `killed`, 0/0/0."""
    reported: dict[str, set[str]] = {}
    outcomes = []
    with small_disk(tmp_path / "disk", "2m") as disk:
        (disk / "other-files").write_bytes(os.urandom(512 * 1024))  # a small disk holds other things too
        db = disk / "runs.duckdb"
        refused_in_a_row = 0
        for _ in range(8):
            result = run_cli(["run", SMOKE, "--no-progress"], db)
            logged = events(result.stderr)
            outcomes.append((result.returncode, logged))
            done = completed_case_ids(logged)
            if done:
                reported[next(iter(done)).split("/")[0]] = done
                refused_in_a_row = 0
            else:
                refused_in_a_row += 1
                if refused_in_a_row == 2:
                    break
        doctor_on_full_disk = run_cli(["doctor"], db, log_format=None)

        grow(disk, "8m")  # space is freed
        listing = run_cli(["runs", "--json"], db)
        assert listing.returncode == 0, listing.stderr
        runs = {r["id"]: r for r in json.loads(listing.stdout)}

        assert reported, "no smoke run got as far as its cases"
        for run_id, done in reported.items():
            run = runs[run_id]
            assert run["status"] == "completed" and run["cause"] is None, run
            assert (run["passed"], run["failed"], run["errored"]) == (6, 0, 0), run
            rows = case_rows(db, run_id)
            assert set(rows) == done and all(status == "completed" for status, _, _ in rows.values()), rows
        assert query(db, "SELECT count(*) FROM eval_runs WHERE status = 'running'") == [(0,)]

    # The scenario really filled the disk: the reserve was spent once, and then runs were refused
    # up front (exit 3, nothing lost) rather than started without room for their results.
    all_events = [e for _, logged in outcomes for e in logged]
    assert any(e["event"] == "store.reserve_released" for e in all_events)
    refusals = [e for code, logged in outcomes for e in logged if code == 3 and e["event"] == "cli.error"]
    assert refusals and "emergency reserve" in refusals[-1]["error"]
    assert doctor_on_full_disk.returncode == 1
    assert "FAIL  emergency reserve: missing" in doctor_on_full_disk.stdout


# ---------------------------------------------------------------- a run that fills the disk part-way


def test_a_disk_filled_during_a_run_loses_no_completed_case(tmp_path):
    """Once lost: 12 of 20 results, when group-commit batches failed and their rows were dropped."""
    (tmp_path / "durable_targets.py").write_text(
        "import asyncio\n\n\n"
        "async def slow_text(spec):\n"
        "    seconds, chars = str(spec).split(':')\n"
        "    await asyncio.sleep(float(seconds))\n"
        "    return 'x' * int(chars)\n"
    )
    suite = tmp_path / "fills-the-disk.yaml"
    suite.write_text(
        "name: fills-the-disk\ntimeout_seconds: 5\nconcurrency: 2\n"
        "target: {python: {callable: 'durable_targets:slow_text'}}\nscorer: contains\ncases:\n"
        + "".join(f"  - {{id: c{i:02d}, input: '0.1:3000', expected: x}}\n" for i in range(16))
    )

    with small_disk(tmp_path / "disk", "2m") as disk:
        db = disk / "runs.duckdb"
        proc = start_cli(["run", suite, "--no-progress"], db)
        reader = LogReader(proc)
        reader.wait_for("eval.case_completed", 3)
        fill(disk / "filler")  # another process fills the disk while the run goes on
        proc.wait(30)
        reader.join()
        logged = reader.events()
        run_id = logged[0]["run_id"]
        absorbed = query(db, "SELECT status FROM eval_runs WHERE id = ?", [run_id]) == [("completed",)]

        (disk / "filler").unlink()
        listing = run_cli(["runs"], db)  # closes the run from its summary, if it was left running
        assert listing.returncode == 0, listing.stderr
        done = completed_case_ids(logged)
        rows = case_rows(db, run_id)

    assert len(done) == 16
    lost = {case_id for case_id in done if rows.get(case_id, (None,))[0] != "completed"}
    assert not lost, f"completed cases missing from the database: {sorted(lost)}"
    # Here the reserve absorbed it: the run closed itself, and nothing had to wait for the next command.
    assert absorbed and proc.returncode == 0
    (released,) = [e for e in logged if e["event"] == "store.reserve_released"]
    assert released["path"] == f"{db}.reserve" and released["size"] == RESERVE_BYTES


# ---------------------------------------------------------------- both final writes lost


def test_a_lost_final_write_is_closed_from_the_summary_with_its_case_rows(tmp_path):
    """Once lost: the summary said 6 passed, but the row ended `completed` with 0/0/0 and no case rows."""
    db = tmp_path / "double.duckdb"
    result = run_cli(["run", SMOKE, "--no-progress"], db,
                     env={"EVALRUNNER_FAULTS": "case_save=*,suite_status_write=*"})
    assert result.returncode == 3, result.stderr
    logged = events(result.stderr)
    run_id = logged[0]["run_id"]
    spool_file = tmp_path / "double.duckdb.unwritten" / f"{run_id}.json"
    spooled = summary.RunSummary.from_json(spool_file.read_text())
    saved_before = query(db, "SELECT count(*) FROM eval_cases WHERE run_id = ?", [run_id])

    listing = run_cli(["runs"], db)  # no faults now
    assert listing.returncode == 0, listing.stderr
    status, cause, by, passed, failed, errored = query(
        db, "SELECT status, cause, terminated_by, passed, failed, errored FROM eval_runs WHERE id = ?", [run_id])[0]
    assert (status, cause, by) == ("completed", None, "sweeper (runner summary)")
    assert (passed, failed, errored) == (6, 0, 0)
    rows = case_rows(db, run_id)
    assert len(rows) == 6 and all(r == ("completed", None, True) for r in rows.values())

    assert saved_before == [(0,)]  # every case row came from the summary
    assert {c.name for c in spooled.cases} == {"add", "mul", "div", "pow", "neg", "precedence"}
    assert not spool_file.exists()  # applied, then removed
    assert len([e for e in logged if e["event"] == "eval.case_save_failed"]) == 6  # once per row, retries or not
    (echoed,) = [e for e in logged if e["event"] == "eval.run_summary"]  # the copy on stderr
    assert echoed["summary"]["passed"] == 6 and len(echoed["summary"]["cases"]) == 6


def test_an_unreadable_summary_is_reported_and_kept_not_silently_ignored(tmp_path):
    db = tmp_path / "empty.duckdb"
    run = insert_running_row(db, "smoke", dead_owner())
    spool = tmp_path / "empty.duckdb.unwritten"
    spool.mkdir()
    (spool / f"{run.id}.json").write_bytes(b"")  # what a full disk left behind

    listing = run_cli(["runs"], db)
    assert listing.returncode == 0, listing.stderr
    closed = read_run(db, run.id)
    assert (closed.status, closed.cause) == ("failed", "killed")  # the fallback, as without a summary
    warnings = [e for e in events(listing.stderr) if e["event"] == "eval.summary_unreadable"]
    assert len(warnings) == 1, "an unreadable summary must not be passed over in silence"
    assert warnings[0]["run_id"] == run.id and warnings[0]["path"] == str(spool / f"{run.id}.json")
    assert warnings[0]["reason"] == "empty file" and (spool / f"{run.id}.json.unreadable").exists()


# ---------------------------------------------------------------- the termination message


def test_a_summary_over_the_termination_message_limit_is_trimmed_and_still_closes_the_run(tmp_path):
    """In a pod the summary is the termination message, which Kubernetes cuts at 4096 bytes."""
    store = DuckDBStore.open(tmp_path / "controller.duckdb", faults=Faults(""))
    try:
        def pod_run(n_cases: int) -> str:
            names = tuple(f"case-{i:03d}" for i in range(n_cases))
            run = store.start_run(RunRequest("pods", names, 5.0, this_process())).run
            now = utcnow()
            results = tuple(summary.CaseResult.from_event(CaseEvent(
                case_row_id(run.id, name), run.id, name, "completed", now, now, None, None, True, 1.0,
                f"{name} said " + "y" * 400, "exact match", 12.5)) for name in names)
            kept = summary.termination_message_writer(str(tmp_path / f"{run.id}.message"))(summary.RunSummary(
                run.id, "pods", "completed", None, None, n_cases, 0, 0, "StoreServiceError: unreachable", results))
            return Path(kept).read_text()

        # 20 cases: dropping outputs is enough, every verdict is kept.
        message = pod_run(20)
        assert len(message.encode()) <= summary.MAX_SUMMARY_BYTES
        parsed = runner_summary({"state": {"terminated": {"message": message}}})  # as the controller reads it
        assert parsed.trimmed == "case outputs, errors and timestamps dropped" and len(parsed.cases) == 20
        closed = recovery.terminate_for_owner_death(store, parsed.run_id, Cause.KILLED, "pod gone", "controller", parsed)
        assert (closed.status, closed.passed, closed.terminated_by) == ("completed", 20, "controller (runner summary)")
        assert "trimmed" in closed.error

        # 200 cases: some case results must go too, and the message says how many.
        message = pod_run(200)
        assert len(message.encode()) <= summary.MAX_SUMMARY_BYTES
        parsed = runner_summary({"state": {"terminated": {"message": message}}})
        kept = len(parsed.cases)
        assert 0 < kept < 200 and f"{200 - kept} of 200 case results dropped" in parsed.trimmed
        assert (parsed.passed, parsed.status) == (200, "completed")
        closed = recovery.terminate_for_owner_death(store, parsed.run_id, Cause.KILLED, "pod gone", "controller", parsed)
        assert closed.passed == kept  # the rows it could write; the rest were never in the message
        assert {c.status for c in store.cases(closed.id)} == {"completed"}

        # A small summary is not touched.
        small = summary.RunSummary("r", "s", "failed", "killed", "boom", 0, 0, 1)
        assert summary.RunSummary.from_json(small.to_json(summary.MAX_SUMMARY_BYTES)) == small
    finally:
        store.close()


# ---------------------------------------------------------------- the store itself on a full disk


def test_a_checkpoint_on_a_full_disk_reopens_the_database_and_the_write_lands(tmp_path, logs):
    """DuckDB invalidates a database whose checkpoint failed (FatalException); the store reopens it."""
    with small_disk(tmp_path / "disk", "4m") as disk:
        store = DuckDBStore.open(disk / "runs.duckdb", faults=Faults(""))
        run = store.start_run(RunRequest("ckpt", ("a", "b"), 5.0, this_process())).run
        # Make the next commit checkpoint (as one does once the WAL passes its threshold), on a full disk.
        store._cur().execute("SET checkpoint_threshold = '1KB'")
        fill(disk / "filler")
        now = utcnow()
        report = store.save_cases([
            CaseEvent(case_row_id(run.id, n), run.id, n, "completed", now, now, passed=True, score=1.0)
            for n in ("a", "b")
        ])
        assert report.failures == {}
        assert store.finish_run(run.id, RunStatus.COMPLETED).passed == 2  # the reopened store keeps working
        store.close()
        (disk / "filler").unlink()
        assert read_run(disk / "runs.duckdb", run.id).passed == 2
    (reopened,) = logs.events("store.reopened")
    assert "Failed to create checkpoint" in reopened["reason"]
    assert len(logs.events("store.reserve_released")) == 1


# ---------------------------------------------------------------- the cluster path


def test_the_runners_final_write_over_http_carries_the_unsaved_case_results(tmp_path):
    from service_support import ServiceThread

    from evalrunner.service.auth import new_token
    from evalrunner.scope import Scope
    from evalrunner.store.http_client import HttpStore

    store = DuckDBStore.open(tmp_path / "service.duckdb", faults=Faults(""))
    service = ServiceThread(store, "admin-token")
    try:
        token = new_token()
        store.register_token(Scope("team", "nightly", "uid-1"), token)
        client = HttpStore(service.origin, token, faults=Faults(""))
        run = client.start_run(RunRequest("pods", ("a", "b"), 5.0, this_process())).run
        now = utcnow()
        unsaved = [CaseEvent(case_row_id(run.id, n), run.id, n, "completed", now, now, passed=n == "a",
                             score=1.0 if n == "a" else 0.0, output=f"output of {n}") for n in ("a", "b")]
        closed = client.finish_run(run.id, RunStatus.COMPLETED, case_events=unsaved)
        assert (closed.status, closed.passed, closed.failed) == ("completed", 1, 1)
        assert {c.name: c.output for c in store.cases(run.id)} == {"a": "output of a", "b": "output of b"}
    finally:
        service.stop()
        store.close()
