"""No read holds a DuckDB transaction open after it returns.

DuckDB ends a read's transaction only when its result is used up. A read
that takes one row with `fetchone()` leaves it open on its thread's cursor
until that thread's next statement; a thread that then idles (the one that
opened the file, a service thread between requests) pins that snapshot for
good. DuckDB must then keep every version written since (the process's
memory grows with every heartbeat and case update) and refuses to
checkpoint ("there are other write transactions active"), so retention
reclaims no space and the WAL grows until a restart replays it.

Real DuckDB files; the reads run on threads that stay alive, as service
threads do.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from evalrunner.faults import Faults
from evalrunner.models import LockPolicy, RunStatus
from evalrunner.owner import this_process
from evalrunner.scope import Scope
from evalrunner.service.auth import new_token
from evalrunner.store import DuckDBStore, RunRequest
from evalrunner.store.duckdb_store import utcnow


def transaction_memory_bytes(store: DuckDBStore) -> int:
    """What DuckDB holds for transactions: the versions kept for snapshots still open."""
    rows = store._writer.run(lambda: store._cur().execute(
        "SELECT memory_usage_bytes FROM duckdb_memory() WHERE tag = 'TRANSACTION'").fetchall())
    return int(rows[0][0]) if rows else 0


def close_runs(store: DuckDBStore, n: int) -> None:
    for i in range(n):
        run = store.start_run(RunRequest(f"s{i}", ("a", "b"), 60.0, this_process(), lock_policy=LockPolicy.ALLOW)).run
        store.heartbeat(run.id)
        store.finish_run(run.id, RunStatus.COMPLETED)


class IdleThread:
    """A thread that runs one call and then waits, alive, as a service thread between requests does."""

    def __init__(self, call):
        self.result: object = None
        self._done, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()
        assert self._done.wait(10)

    def _run(self, call):
        self.result = call()
        self._done.set()
        self._release.wait()

    def stop(self):
        self._release.set()
        self._thread.join(10)


@pytest.fixture
def reopened(tmp_path):
    """A file written by an earlier process and opened again, as a restarted controller opens its database."""
    path = tmp_path / "runs.duckdb"
    token = new_token()
    with DuckDBStore.open(path, faults=Faults("")) as first:
        first.register_token(Scope("team-a", "nightly", "uid-1"), token)
        first.clock = lambda: utcnow() - timedelta(days=40)
        close_runs(first, 20)
    with DuckDBStore.open(path, faults=Faults("")) as store:
        yield store, token


def test_opening_an_existing_file_leaves_no_snapshot_behind(reopened):
    store, _ = reopened
    close_runs(store, 100)

    assert transaction_memory_bytes(store) < 256 * 1024
    deleted = store.delete_expired_runs(utcnow() - timedelta(days=30))
    assert deleted.runs == 20
    assert deleted.checkpointed, deleted.checkpoint_error


@pytest.mark.parametrize("read", [
    pytest.param(lambda store, token: store.count_runs(), id="count_runs"),
    pytest.param(lambda store, token: store.count_runs("completed", "s1"), id="count_runs_filtered"),
    pytest.param(lambda store, token: store.scope_for_token(token), id="scope_for_token"),
    pytest.param(lambda store, token: store.schema_version(), id="schema_version"),
])
def test_a_read_on_a_thread_that_stays_alive_leaves_no_snapshot_behind(reopened, read):
    store, token = reopened
    reader = IdleThread(lambda: read(store, token))
    try:
        assert reader.result  # the read found what it looks for
        close_runs(store, 100)

        assert transaction_memory_bytes(store) < 256 * 1024
        deleted = store.delete_expired_runs(utcnow() - timedelta(days=30))
        assert deleted.checkpointed, deleted.checkpoint_error
    finally:
        reader.stop()
