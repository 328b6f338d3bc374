"""The DuckDB store on real files: schema, compare-and-set transitions, clear errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import duckdb
import pytest

from evalrunner.models import Cause, RunStatus
from evalrunner.owner import Owner, this_process
from evalrunner.scope import Scope
from evalrunner.store import CaseEvent, DuckDBStore, RunRequest
from evalrunner.store import errors
from evalrunner.store.duckdb_store import utcnow
from evalrunner.store.schema import CURRENT_VERSION


def request(suite: str = "s", cases=("a", "b", "c"), **kw) -> RunRequest:
    return RunRequest(suite=suite, case_names=tuple(cases), timeout_seconds=2, owner=kw.pop("owner", this_process()), **kw)


def case_event(run_id: str, name: str, status: str = "running", **kw) -> CaseEvent:
    return CaseEvent(f"{run_id}/{name}", run_id, name, status, utcnow(), **kw)


@pytest.fixture
def store(tmp_path):
    s = DuckDBStore.open(tmp_path / "runs.duckdb")
    yield s
    s.close()


def test_schema_has_the_runbook_columns_and_ours(store):
    cols = {r[0] for r in store._cur().execute("DESCRIBE eval_runs").fetchall()}
    assert {"id", "suite", "status", "created_at", "completed_at", "error"} <= cols  # runbook
    assert {"cause", "owner", "heartbeat_at", "deadline_at", "attempt", "parent_run_id"} <= cols
    case_cols = {r[0] for r in store._cur().execute("DESCRIBE eval_cases").fetchall()}
    assert {"id", "run_id", "status", "error", "cause"} <= case_cols
    versions = store._cur().execute("SELECT version FROM schema_version").fetchall()
    assert versions[-1][0] == CURRENT_VERSION


def test_reopening_does_not_reapply_migrations(tmp_path):
    path = tmp_path / "db.duckdb"
    DuckDBStore.open(path).close()
    with DuckDBStore.open(path) as s:
        assert s._cur().execute("SELECT count(*) FROM schema_version").fetchone()[0] == len(
            __import__("evalrunner.store.schema", fromlist=["MIGRATIONS"]).MIGRATIONS
        )


def test_deadline_is_timeout_times_cases_plus_grace(store):
    run = store.start_run(request(cases=("a", "b", "c"), deadline_grace_seconds=60)).run
    assert run.deadline_at - run.started_at == timedelta(seconds=2 * 3 + 60)
    assert run.owner == this_process()
    assert run.heartbeat_at == run.started_at


def test_terminal_row_never_changes_again(store):
    run = store.start_run(request()).run
    store.save_cases([case_event(run.id, "a", "completed", passed=True, score=1.0)])
    done = store.finish_run(run.id, RunStatus.COMPLETED)
    assert done.status == "completed" and done.passed == 1

    # Every later writer is fenced: the runner again, recovery, a heartbeat, a case save.
    assert store.finish_run(run.id, RunStatus.FAILED, Cause.KILLED.value, "late") is None
    assert store.terminate_run(run.id, Cause.MANUAL, "late", "manual") is None
    assert store.heartbeat(run.id) is False
    report = store.save_cases([case_event(run.id, "b", "completed", passed=False)])
    assert report.fenced
    after = store.get_run(run.id)
    assert (after.status, after.cause, after.error, after.completed_at) == ("completed", None, None, done.completed_at)
    assert [c.name for c in store.cases(run.id)] == ["a"]


def test_terminal_case_row_is_not_overwritten(store):
    run = store.start_run(request()).run
    store.save_cases([case_event(run.id, "a", "completed", passed=True, score=1.0, output="4")])
    store.save_cases([case_event(run.id, "a", "running")])
    store.save_cases([case_event(run.id, "a", "failed", error="late", cause="case_raised")])
    (case,) = store.cases(run.id)
    assert (case.status, case.passed, case.output, case.error) == ("completed", True, "4", None)


def test_run_and_running_cases_terminate_in_one_transaction(store):
    run = store.start_run(request()).run
    store.save_cases([
        case_event(run.id, "a", "completed", passed=True, score=1.0),
        case_event(run.id, "b", "running"),
        case_event(run.id, "c", "running"),
    ])
    closed = store.terminate_run(run.id, Cause.KILLED, "owner process is gone", "sweeper")
    cases = {c.name: c for c in store.cases(run.id)}
    assert closed.status == "failed" and closed.cause == "killed" and closed.terminated_by == "sweeper"
    assert cases["a"].status == "completed"
    assert {cases["b"].status, cases["c"].status} == {"failed"}
    assert cases["b"].cause == "killed" and cases["b"].completed_at == closed.completed_at
    assert (closed.passed, closed.failed, closed.errored) == (1, 0, 2)


def test_a_failing_close_leaves_run_and_cases_untouched(store, monkeypatch):
    """Atomicity: if the run update fails, the case updates roll back with it."""
    run = store.start_run(request()).run
    store.save_cases([case_event(run.id, "a", "running")])
    store.faults = type(store.faults)("suite_status_write=*")
    with pytest.raises(duckdb.IOException):
        store.finish_run(run.id, RunStatus.FAILED, "runner_error", "x")
    original = store._close_run

    def close_then_fail(cur, *a, **kw):
        original(cur, *a, **kw)
        raise duckdb.IOException("IO Error: disk went away mid-transaction")

    store.faults = type(store.faults)("")
    monkeypatch.setattr(store, "_close_run", close_then_fail)
    with pytest.raises(duckdb.IOException):
        store.terminate_run(run.id, Cause.KILLED, "x", "sweeper")
    assert store.get_run(run.id).status == "running"
    assert store.cases(run.id)[0].status == "running"


def test_concurrent_terminations_close_exactly_once(store):
    """Two closers race (runner finishing, sweeper terminating): one wins, one is fenced."""
    import threading

    run = store.start_run(request()).run
    results = []
    barrier = threading.Barrier(2)

    def closer(kind):
        barrier.wait()
        if kind == "runner":
            results.append(("runner", store.finish_run(run.id, RunStatus.COMPLETED)))
        else:
            results.append(("sweeper", store.terminate_run(run.id, Cause.KILLED, "gone", "sweeper")))

    threads = [threading.Thread(target=closer, args=(k,)) for k in ("runner", "sweeper")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [k for k, row in results if row is not None]
    assert len(winners) == 1
    final = store.get_run(run.id)
    assert final.status == ("completed" if winners == ["runner"] else "failed")


def test_schema_from_a_newer_release_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "new.duckdb"
    with DuckDBStore.open(path) as s:
        s._cur().execute("INSERT INTO schema_version VALUES (99, 'from the future', now())")
    before = path.read_bytes()
    with pytest.raises(errors.StoreSchemaTooNewError) as exc:
        DuckDBStore.open(path)
    assert "schema version 99" in str(exc.value) and f"supports up to {CURRENT_VERSION}" in str(exc.value)
    assert "Upgrade evalrunner" in str(exc.value)
    assert path.read_bytes() == before


def test_second_process_gets_a_clear_error_naming_the_holder(tmp_path):
    path = tmp_path / "held.duckdb"
    DuckDBStore.open(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(path)!r}); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(errors.StoreLockedError) as exc:
            DuckDBStore.open(path)
        message = str(exc.value)
        assert f"process {holder.pid}" in message
        assert "Wait for it to finish" in message and "--db" in message
    finally:
        holder.kill()
        holder.wait()


def test_not_a_database_gives_a_clear_error(tmp_path):
    path = tmp_path / "notes.duckdb"
    path.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(errors.StoreError) as exc:
        DuckDBStore.open(path)
    assert str(path) in str(exc.value)
    assert path.read_text().startswith("these are my notes")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2 MiB filesystem (needs root to mount, as in CI)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs and must run as root (CI does)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_gives_a_clear_error_and_loses_nothing(small_tmpfs):
    path = small_tmpfs / "runs.duckdb"
    with DuckDBStore.open(path) as s:
        run = s.start_run(request()).run
        s.save_cases([case_event(run.id, "a", "completed", passed=True, score=1.0)])
        s.finish_run(run.id, RunStatus.COMPLETED)
    with open(small_tmpfs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    with pytest.raises(errors.StoreError) as exc:
        with DuckDBStore.open(path) as s:
            big = s.start_run(request(suite="big", cases=[f"c{i}" for i in range(2000)])).run
            # A write larger than the WAL's slack and the emergency reserve (which it releases) together.
            s.finish_run(big.id, RunStatus.COMPLETED, error="x" * 1_000_000)
    assert isinstance(exc.value, errors.StoreDiskFullError)
    assert "no space left" in str(exc.value) and "no committed row is lost" in str(exc.value)
    (small_tmpfs / "filler").unlink()
    with DuckDBStore.open(path) as s:
        kept = s.get_run(run.id)
        assert kept.status == "completed" and kept.passed == 1


def test_read_only_location_gives_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    DuckDBStore.open(ro / "runs.duckdb").close()
    if os.geteuid() == 0:  # root ignores file modes: make the filesystem itself read-only
        subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
    else:
        os.chmod(ro / "runs.duckdb", 0o444)
        os.chmod(ro, 0o555)
    try:
        with pytest.raises(errors.StoreError) as exc:
            DuckDBStore.open(ro / "runs.duckdb")
        message = str(exc.value)
        assert "cannot be written" in message and str(ro / "runs.duckdb") in message
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)


def test_owner_liveness_tells_a_reused_pid_from_the_owner():
    from evalrunner.owner import local_liveness

    me = this_process()
    assert local_liveness(me) == "alive"
    assert local_liveness(Owner(**{**me.__dict__, "process_started_at": me.process_started_at - 3600})) == "dead"
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert local_liveness(Owner(kind="process", host=socket.gethostname(), pid=gone.pid, process_started_at=time.time())) == "dead"
    assert local_liveness(Owner(kind="process", host="some-other-host", pid=1)) == "unknown"
    assert local_liveness(Owner(kind="pod", namespace="ns", pod="p")) == "unknown"


def test_suite_locks_apply_per_namespace(store):
    """The same suite name in two namespaces is two suites; in one namespace the policy applies."""
    from evalrunner.admission import RunRefused

    def start(scope):
        return store.start_run(request(suite="smoke", scope=scope)).run

    start(Scope("team-a", "nightly", "uid-1"))
    start(Scope("team-b", "nightly", "uid-2"))  # another namespace: no collision
    start(None)  # a local run: no collision either
    with pytest.raises(RunRefused):
        start(Scope("team-a", "other", "uid-3"))


# ---------------------------------------------------------------- one writer; guards inside writes


def test_a_case_batch_racing_a_close_never_leaves_running_rows_under_the_closed_run(store):
    """Two threads of one process: a runner posting case batches, a controller closing the run (Replace).

    Whichever the database orders first, the batch lands before the close (and is closed with it)
    or sees the run closed and writes nothing; never `running` case rows under a failed run.
    """
    import random
    import threading

    for round_ in range(60):
        run = store.start_run(request(suite=f"race-{round_}", cases=[f"c{i}" for i in range(200)])).run
        closed = threading.Event()

        def post_batches(run, closed):
            for first in range(0, 200, 10):
                report = store.save_cases([case_event(run.id, f"c{i}") for i in range(first, first + 10)])
                if report.fenced:
                    return
            closed.wait(5)

        poster = threading.Thread(target=post_batches, args=(run, closed))
        poster.start()
        time.sleep(random.random() * 0.005)
        store.terminate_run(run.id, Cause.REPLACED, "replaced by another EvalRun", "controller")
        closed.set()
        poster.join()
        left = [c.name for c in store.cases(run.id) if c.status == "running"]
        assert not left, f"round {round_}: case rows running under a closed run: {left[:5]}"


def test_every_write_runs_on_the_one_writer_thread(store):
    """Writes from many threads (handlers, loops, the runner) are serialised on one thread."""
    import threading

    writers: set[int] = set()
    store.transaction_observer = lambda seconds, error: writers.add(threading.get_ident())
    runs = [store.start_run(request(suite=f"w{i}")).run for i in range(4)]

    def work(run):
        store.save_cases([case_event(run.id, "a", "running")])
        store.heartbeat(run.id)
        store.finish_run(run.id, RunStatus.COMPLETED)

    threads = [threading.Thread(target=work, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(writers) == 1 and threading.get_ident() not in writers


def test_a_store_makes_its_process_switch_threads_often_enough_for_its_writer(store):
    """DuckDB takes the GIL back between executor tasks; at Python's 5 ms a busy loop stalls every write."""
    import sys

    from evalrunner.store.writer import SWITCH_INTERVAL_S

    assert sys.getswitchinterval() <= SWITCH_INTERVAL_S
    sys.setswitchinterval(SWITCH_INTERVAL_S / 5)  # a process that asked for less keeps it
    try:
        DuckDBStore.open(":memory:").close()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S / 5, abs=2e-6)  # kept in whole µs
    finally:
        sys.setswitchinterval(SWITCH_INTERVAL_S)


def test_latest_attempt_is_the_highest_attempt_of_the_ids_in_that_scope(store):
    """What the controller reads on every reconcile: a suite's current attempt, whatever the order of ids."""
    ours, theirs = Scope("ns", "er", "uid-1"), Scope("ns", "other", "uid-2")
    first = store.start_run(request(suite="q", scope=ours)).run
    store.finish_run(first.id, RunStatus.FAILED, cause=Cause.CASE_RAISED.value)
    second = store.start_run(request(suite="q", scope=ours, parent_run_id=first.id)).run
    elsewhere = store.start_run(request(suite="q2", scope=theirs)).run
    assert second.attempt == 2
    for ids in ([first.id, second.id], [second.id, first.id]):
        assert store.latest_attempt(ids, ours).id == second.id
    assert store.latest_attempt([first.id, elsewhere.id], theirs).id == elsewhere.id
    assert store.latest_attempt([first.id], theirs) is None
    assert store.latest_attempt(["no-such-run"]) is None


def test_case_rows_stranded_by_manual_sql_are_closed_with_the_run_cause(store):
    """The runbook's SQL fails the run row only; the repair fails its running cases, keeping the run as written."""
    manual = store.start_run(request(suite="manual")).run
    replaced = store.start_run(request(suite="replaced")).run
    done = store.start_run(request(suite="done")).run
    for run in (manual, replaced, done):
        store.save_cases([case_event(run.id, "a", "completed", passed=True, score=1.0, completed_at=utcnow()),
                          case_event(run.id, "b", "running")])
    store._cur().execute("UPDATE eval_runs SET status = 'failed', completed_at = CURRENT_TIMESTAMP, "
                         "error = 'Manual recovery' WHERE id = ?", [manual.id])
    store._cur().execute("UPDATE eval_runs SET status = 'failed', cause = 'replaced' WHERE id = ?", [replaced.id])
    store._cur().execute("UPDATE eval_runs SET status = 'completed' WHERE id = ?", [done.id])

    found = {s.run_id: (s.count, s.cause) for s in store.stranded_cases()}
    assert found == {manual.id: (1, "manual"), replaced.id: (1, "replaced"), done.id: (1, "runner_error")}
    repaired = store.close_stranded_cases("sweeper")
    assert {s.run_id for s in repaired} == set(found)
    assert store.stranded_cases() == [] and store.close_stranded_cases("sweeper") == []
    for run in (manual, replaced, done):
        cases = {c.name: c for c in store.cases(run.id)}
        assert cases["a"].status == "completed"
        assert cases["b"].status == "failed" and cases["b"].cause == found[run.id][1]
        assert "closed by sweeper" in cases["b"].error
    row = store.get_run(manual.id)
    assert (row.status, row.error, row.cause) == ("failed", "Manual recovery", None)  # the run row is kept
    assert (row.passed, row.failed, row.errored) == (1, 0, 1)  # its totals follow its case rows


def test_token_usage_is_stored_per_case_and_summed_per_attempt_when_the_run_closes(store):
    run = store.start_run(request(cases=("a", "b", "c"))).run
    store.save_cases([
        case_event(run.id, "a", "completed", passed=True, prompt_tokens=10, completion_tokens=2, total_tokens=12),
        case_event(run.id, "b", "completed", passed=False, prompt_tokens=5, completion_tokens=1, total_tokens=6),
        case_event(run.id, "c", "failed", cause="case_raised"),  # no usage reported
    ])
    assert store.get_run(run.id).total_tokens is None  # summed at the close, like passed/failed/errored
    done = store.finish_run(run.id, RunStatus.COMPLETED)
    assert (done.prompt_tokens, done.completion_tokens, done.total_tokens) == (15, 3, 18)
    assert [(c.name, c.total_tokens) for c in store.cases(run.id)] == [("a", 12), ("b", 6), ("c", None)]
    # A resumed attempt carries case a over with its usage, but spent nothing on it: its totals are its own.
    again = store.start_run(request(cases=("b", "c"), parent_run_id=run.id, carried_case_names=("a",))).run
    store.save_cases([case_event(again.id, "b", "completed", passed=True, total_tokens=7)])
    closed = store.finish_run(again.id, RunStatus.COMPLETED)
    assert (closed.prompt_tokens, closed.total_tokens) == (None, 7)
    assert {c.name: c.total_tokens for c in store.cases(again.id)} == {"a": 12, "b": 7}
    # No usage at all: NULL, not 0.
    quiet = store.start_run(request(suite="python-only", cases=("a",))).run
    store.save_cases([case_event(quiet.id, "a", "completed", passed=True)])
    assert store.finish_run(quiet.id, RunStatus.COMPLETED).total_tokens is None


def test_a_version_2_database_gains_the_usage_columns(tmp_path):
    from evalrunner.store.schema import MIGRATIONS

    path = tmp_path / "v2.duckdb"
    con = duckdb.connect(str(path))  # what a version-2 release left behind, with a row in it
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description VARCHAR, "
                "applied_at TIMESTAMPTZ)")
    for migration in MIGRATIONS[:2]:
        for statement in migration.statements:
            con.execute(statement)
        con.execute("INSERT INTO schema_version VALUES (?, ?, now())", [migration.version, migration.description])
    con.execute("INSERT INTO eval_runs (id, suite, status, created_at, passed) VALUES ('old', 's', 'completed', now(), 1)")
    con.close()
    with DuckDBStore.open(path) as s:
        assert s.schema_version() == CURRENT_VERSION
        old = s.get_run("old")
        assert old.passed == 1 and old.total_tokens is None
