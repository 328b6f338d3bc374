"""The DuckDB store: every state transition of runs and cases, and all SQL.

Invariants kept here:

- A row leaves `running` once. Every terminal write is a compare-and-set
  (`... WHERE id = ? AND status = 'running' RETURNING`); a late writer gets
  nothing back and learns it was fenced.
- A run row and its still-running case rows become terminal in one
  transaction (`_close_run`), whoever closes it: the runner itself, the
  sweeper, the controller or a manual `evalrunner recover`.
- A case row is never written `running` under a closed run: the batch's
  guard is an UPDATE of its run row, so it and a close are ordered by the
  database, and `close_stranded_cases` repairs any row that ever is
  (manual SQL included).
- One process opens the file read-write, and within it one thread writes
  (`Writer`); reads use the calling thread's own cursor.
"""

from __future__ import annotations

import hashlib
from operator import attrgetter
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import duckdb

from .. import admission, log
from ..faults import Faults
from ..models import Cause, RunStatus
from ..owner import Owner
from ..scope import Scope, lock_domain
from . import errors, file_check
from .records import (
    Admission,
    CaseDifference,
    CaseEvent,
    CaseRow,
    CaseTally,
    HeartbeatAge,
    HistogramCounts,
    MetricsSnapshot,
    RunRequest,
    RunRow,
    SaveReport,
    StrandedCases,
    case_row_id,
)
from .case_durations import RETURNED as CASE_STATE, CaseDurations, CaseState
from .reserve import DiskReserve
from .schema import CURRENT_VERSION, MIGRATIONS
from .writer import Writer

Clock = Callable[[], datetime]
TransactionObserver = Callable[[float, "BaseException | None"], None]

RUNNING = RunStatus.RUNNING.value
COMPLETED = RunStatus.COMPLETED.value
FAILED = RunStatus.FAILED.value

RUN_COLUMNS = (
    "id, suite, status, created_at, started_at, completed_at, error, cause, owner, heartbeat_at, "
    "deadline_at, attempt, parent_run_id, timeout_seconds, case_count, passed, failed, errored, "
    "lock_policy, terminated_by, source, scope, prompt_tokens, completion_tokens, total_tokens"
)
CASE_COLUMNS = (
    "id, run_id, name, status, created_at, started_at, completed_at, error, cause, passed, score, "
    "output, detail, duration_ms, carried_from, prompt_tokens, completion_tokens, total_tokens"
)
TOKEN_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens")

# A run's totals, counted from its case rows in one pass: `UPDATE eval_runs SET {_RECOUNT} FROM
# ({_CASE_TOTALS} WHERE …) totals`. Tokens are this attempt's: a carried-over case's were counted by the
# run it ran in.
_CASE_TOTALS = (
    "SELECT run_id AS totals_run_id, "
    "count(*) FILTER (WHERE status = 'completed' AND passed) AS n_passed, "
    "count(*) FILTER (WHERE status = 'completed' AND NOT passed) AS n_failed, "
    "count(*) FILTER (WHERE status = 'failed') AS n_errored, "
    + ", ".join(f"sum({column}) FILTER (WHERE carried_from IS NULL) AS n_{column}" for column in TOKEN_COLUMNS)
    + " FROM eval_cases"
)
_RECOUNT = (
    "passed = coalesce(n_passed, 0), failed = coalesce(n_failed, 0), errored = coalesce(n_errored, 0), "
    + ", ".join(f"{column} = n_{column}" for column in TOKEN_COLUMNS)
)
# The cause a case row stranded under closed run `r` gets: the run's own; `runner_error` under a
# completed run (as `_close_run` does); `manual` under a run failed by hand with no cause.
_STRANDED_CAUSE = (
    "CASE WHEN r.status = 'completed' THEN 'runner_error' ELSE coalesce(r.cause, 'manual') END"
)

# The store needs no extension beyond those built in (json, parquet, icu). Left on, DuckDB would download one
# to read a file it was not meant to (a SQLite file as --db) and report that download's failure instead.
OFFLINE = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}

# DuckDB raises TransactionException ("Conflict on update") when two
# transactions update the same row; the second one is retried.
_CONFLICT_RETRIES = 5


# Closed runs deleted per retention transaction (with all their case rows).
RETENTION_BATCH_RUNS = 200
RETENTION_LOGGED_IDS = 50


@dataclass
class Retained:
    """What one retention pass deleted."""

    runs: int = 0
    cases: int = 0
    batches: int = 0
    run_ids: list[str] = field(default_factory=list)  # the first RETENTION_LOGGED_IDS of them, oldest first
    checkpointed: bool = False
    checkpoint_error: str | None = None


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_run_id(now: datetime) -> str:
    # Sortable by creation time, unique without coordination.
    return now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class DuckDBStore:
    """One DuckDB file, opened read-write by this process."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: str, clock: Clock = utcnow, faults: Faults | None = None):
        self._con = con
        self.path = path
        self.clock = clock
        self.faults = faults if faults is not None else Faults.from_env()
        self._local = threading.local()
        self._writer = Writer()
        self.reserve = DiskReserve(path) if path != ":memory:" else None
        # Called after every write transaction with (seconds, exception or None); /metrics uses it.
        # It runs on the writing thread and must not raise (a failing observer is ignored).
        self.transaction_observer: TransactionObserver | None = None
        # The case-duration histogram, kept as rows change once `track_case_durations` starts it;
        # the open transaction's changes wait in `_case_changes` until it commits.
        self.case_durations: CaseDurations | None = None
        self._case_changes: list[tuple[str, list[CaseState]]] = []
        # Bumped by every revocation, so a cache of token lookups knows to forget what it holds.
        self.tokens_revoked = 0

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], clock: Clock = utcnow, faults: Faults | None = None) -> DuckDBStore:
        """Open (creating if needed) and migrate; raise a StoreError with a clear message."""
        path = str(path)
        try:
            if path != ":memory:":
                file_check.refuse_unusable(path)
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            con = duckdb.connect(path, config=OFFLINE)
        except (duckdb.Error, OSError) as exc:
            raise (errors.translate(exc, path) or errors.StoreError(f"cannot open database {path}: {exc}")) from exc
        store = cls(con, path, clock, faults)
        try:
            if path != ":memory:":
                file_check.refuse_missing_blocks(con, path)
            store._migrate()
        except errors.StoreError:
            con.close()
            raise
        except (duckdb.Error, OSError) as exc:
            con.close()
            raise (errors.translate(exc, path) or errors.StoreError(f"cannot prepare database {path}: {exc}")) from exc
        store._ensure_reserve()
        return store

    def _ensure_reserve(self) -> None:
        """Best effort: a disk too full for the reserve must not stop anyone reading or closing runs."""
        if self.reserve is None:
            return
        why_not = self.reserve.ensure()
        if why_not:
            log.get().warning(
                log.STORE_RESERVE_UNAVAILABLE, path=str(self.reserve.path), size=self.reserve.size, reason=why_not,
                consequence="`evalrunner run` starts no run until there is room for it",
            )

    def require_reserve(self) -> None:
        """Refuse to start a run that a full disk could lose.

        Without the reserve, a run that meets a full disk could lose its final
        status and, with no room for it either, its summary.
        """
        if self.reserve is None or self.reserve.in_place():
            return
        raise errors.StoreReserveMissingError(
            self.path, str(self.reserve.path), shutil.disk_usage(self.reserve.path.parent).free, self.reserve.size
        )

    def release_reserve(self) -> bool:
        """Free the emergency reserve for a write that found the disk full; True if that freed space."""
        if self.reserve is None or not self.reserve.release():
            return False
        log.get().warning(log.STORE_RESERVE_RELEASED, path=str(self.reserve.path), size=self.reserve.size,
                          db=self.path, note="recreated by a later open once there is room")
        return True

    def _reopen(self, reason: BaseException) -> None:
        """Replace a connection DuckDB has invalidated (a FatalException, such as a checkpoint on a full disk)."""
        try:
            self._con.close()
        except duckdb.Error:
            pass
        try:
            self._con = duckdb.connect(self.path)
        except duckdb.Error as exc:
            raise (errors.translate(exc, self.path) or errors.StoreError(
                f"cannot reopen database {self.path} after a fatal error ({reason}): {exc}")) from exc
        log.get().warning(log.STORE_REOPENED, path=self.path, reason=errors.first_line(str(reason)))

    def close(self) -> None:
        self._writer.shutdown()
        try:
            self._con.close()
        except duckdb.Error:
            pass

    def __enter__(self) -> DuckDBStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cur(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cur", None)
        if cur is None or self._local.con is not self._con:  # none yet, or the connection was reopened
            cur = self._con.cursor()
            self._local.cur, self._local.con = cur, self._con
        return cur

    def _read_row(self, sql: str, params: object = None) -> tuple | None:
        """The first row of a read, or None; the whole result is taken, so the read's transaction ends here.

        DuckDB ends a read's transaction only once its result is used up: after
        `fetchone()` it stays open on this thread's cursor until the thread's
        next statement, and a thread that then idles would pin that snapshot,
        keeping every version written since in memory and refusing checkpoints.
        """
        rows = self._cur().execute(sql, params).fetchall()
        return rows[0] if rows else None

    def schema_version(self) -> int:
        row = self._read_row("SELECT max(version) FROM schema_version")
        return int(row[0] or 0) if row else 0

    def _migrate(self) -> None:
        cur = self._cur()
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMPTZ)"
        )
        found = self.schema_version()
        if found > CURRENT_VERSION:
            raise errors.StoreSchemaTooNewError(self.path, found, CURRENT_VERSION)
        for migration in MIGRATIONS:
            if migration.version <= found:
                continue
            cur.begin()
            try:
                for statement in migration.statements:
                    cur.execute(statement)
                cur.execute(
                    "INSERT INTO schema_version VALUES (?, ?, ?)",
                    [migration.version, migration.description, self.clock()],
                )
                cur.commit()
            except BaseException:
                cur.rollback()
                raise

    # ------------------------------------------------------------ transactions

    def _transaction(self, body: Callable[[duckdb.DuckDBPyConnection], object]) -> object:
        """Run `body` in a transaction on the writer thread, retrying DuckDB write-write conflicts."""
        return self._writer.run(lambda: self._observed_transaction(body))

    def _observed_transaction(self, body: Callable[[duckdb.DuckDBPyConnection], object]) -> object:
        """Tell the observer how long the transaction took and how it went."""
        observer = self.transaction_observer
        if observer is None:
            return self._run_transaction(body)
        started = time.perf_counter()
        try:
            result = self._run_transaction(body)
        except BaseException as exc:
            _notify(observer, time.perf_counter() - started, exc)
            raise
        _notify(observer, time.perf_counter() - started, None)
        return result

    def _run_transaction(self, body: Callable[[duckdb.DuckDBPyConnection], object]) -> object:
        """A transaction that found the disk full is tried once more after releasing the reserve."""
        try:
            return self._attempt_transaction(body)
        except errors.StoreDiskFullError:
            if not self.release_reserve():
                raise
            return self._attempt_transaction(body)

    def _attempt_transaction(self, body: Callable[[duckdb.DuckDBPyConnection], object]) -> object:
        cur = self._cur()
        for attempt in range(_CONFLICT_RETRIES):
            try:
                self._case_changes = []
                cur.begin()
                result = body(cur)
                cur.commit()
                self._committed_case_changes()
                return result
            except duckdb.FatalException as exc:
                # A failed checkpoint (at commit, when the WAL grew large) invalidates the database:
                # nothing works on it until it is reopened. The transaction did not commit.
                self._reopen(exc)
                raise (errors.translate(exc, self.path) or exc) from exc
            except duckdb.TransactionException as exc:
                _rollback(cur)
                if "conflict" not in str(exc).lower() or attempt == _CONFLICT_RETRIES - 1:
                    raise (errors.translate(exc, self.path) or exc) from exc
                time.sleep(0.005 * (attempt + 1))
            except duckdb.Error as exc:
                _rollback(cur)
                raise (errors.translate(exc, self.path) or exc) from exc
            except BaseException:
                _rollback(cur)
                raise
        raise AssertionError("unreachable")

    def _committed_case_changes(self) -> None:
        changes, self._case_changes = self._case_changes, []
        if self.case_durations is None:
            return
        for kind, rows in changes:
            if kind == "written":
                self.case_durations.written(rows)
            else:
                self.case_durations.deleted(rows)

    def _write_cases(self, cur: duckdb.DuckDBPyConnection, sql: str, params: object, kind: str = "written",
                     returning: str = CASE_STATE) -> None:
        """Run a statement that writes case rows; when the counters are kept, note the rows it changed."""
        if self.case_durations is None:
            cur.execute(sql, params)
            return
        rows = cur.execute(f"{sql} RETURNING {returning}", params).fetchall()
        if rows:
            self._case_changes.append((kind, rows))

    def track_case_durations(self, buckets: Sequence[float]) -> None:
        """Count the case-duration histogram once, then keep it as this store writes (see case_durations)."""

        def body(cur: duckdb.DuckDBPyConnection) -> None:
            counts = CaseDurations(tuple(float(b) for b in buckets))
            counts.load(cur)
            self.case_durations = counts

        self._writer.run(lambda: self._run_transaction(body))

    # ------------------------------------------------------------ opening runs

    def start_run(self, request: RunRequest) -> Admission:
        """Insert a `running` row after applying the suite's lock policy, atomically.

        Raises admission.RunRefused when the policy forbids it. Carried-over
        cases (resume) are copied from the parent in the same transaction.
        """

        def body(cur: duckdb.DuckDBPyConnection) -> Admission:
            now = self.clock()
            if request.run_id:
                existing = self._select_runs(cur, "WHERE id = ?", [request.run_id])
                if existing:
                    return self._replayed_start(existing[0], request)
            live = [] if request.admitted else [
                r for r in self._select_runs(cur, "WHERE suite = ? AND status = 'running'", [request.suite])
                if lock_domain(r.scope) == lock_domain(request.scope)]
            decision = admission.decide(request.lock_policy, [r.id for r in live])
            if not decision.admit:
                raise admission.RunRefused(
                    request.suite, [r.id for r in live], [r.owner.describe() if r.owner else "unknown owner" for r in live]
                )
            run_id = request.run_id or new_run_id(now)
            replaced = []
            for rid in decision.replace:
                closed = self._close_run(
                    cur, rid, FAILED, Cause.REPLACED.value, f"replaced by run {run_id}", "admission", now
                )
                if closed:
                    replaced.append(closed)
            attempt = 1
            if request.parent_run_id:
                parent = self._select_runs(cur, "WHERE id = ?", [request.parent_run_id])
                attempt = (parent[0].attempt + 1) if parent else 1
            n_cases = len(request.case_names)
            deadline = now + timedelta(seconds=request.timeout_seconds * max(n_cases, 1) + request.deadline_grace_seconds)
            cur.execute(
                "INSERT INTO eval_runs (id, suite, status, created_at, started_at, owner, heartbeat_at, "
                "deadline_at, attempt, parent_run_id, timeout_seconds, case_count, lock_policy, source, scope) "
                "VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    run_id, request.suite, now, now, request.owner.to_json(), now, deadline, attempt,
                    request.parent_run_id, request.timeout_seconds,
                    n_cases + len(request.carried_case_names), request.lock_policy.value, request.source,
                    _scope_text(request.scope),
                ],
            )
            if request.parent_run_id and request.carried_case_names:
                cur.execute(
                    f"INSERT INTO eval_cases ({CASE_COLUMNS}) "
                    "SELECT ? || '/' || name, ?, name, status, ?, started_at, completed_at, error, cause, "
                    "passed, score, output, detail, duration_ms, id, prompt_tokens, completion_tokens, total_tokens "
                    "FROM eval_cases WHERE run_id = ? AND status = 'completed' AND list_contains(?, name)",
                    [run_id, run_id, now, request.parent_run_id, list(request.carried_case_names)],
                )
            row = self._select_runs(cur, "WHERE id = ?", [run_id])[0]
            return Admission(run=row, replaced=tuple(replaced))

        return self._transaction(body)  # type: ignore[return-value]

    def record_failed_start(self, request: RunRequest, cause: str, error: str, terminated_by: str) -> RunRow | None:
        """Record a run that died before its runner could open it (never started, crashed at start).

        The row is born `failed`, so the attempt is visible like any other. None
        if the run id already exists (the runner got there first).
        """

        def body(cur: duckdb.DuckDBPyConnection) -> RunRow | None:
            if self._select_runs(cur, "WHERE id = ?", [request.run_id]):
                return None
            now = self.clock()
            attempt = 1
            if request.parent_run_id:
                parent = self._select_runs(cur, "WHERE id = ?", [request.parent_run_id])
                attempt = (parent[0].attempt + 1) if parent else 1
            cur.execute(
                "INSERT INTO eval_runs (id, suite, status, created_at, started_at, completed_at, error, cause, owner, "
                "attempt, parent_run_id, timeout_seconds, case_count, passed, failed, errored, lock_policy, "
                "terminated_by, source, scope) VALUES (?, ?, 'failed', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, ?, ?, ?, ?)",
                [request.run_id, request.suite, now, now, now, error, cause, request.owner.to_json(), attempt,
                 request.parent_run_id, request.timeout_seconds, len(request.case_names), request.lock_policy.value,
                 terminated_by, request.source, _scope_text(request.scope)],
            )
            return self._select_runs(cur, "WHERE id = ?", [request.run_id])[0]

        return self._transaction(body)  # type: ignore[return-value]

    @staticmethod
    def _replayed_start(existing: RunRow, request: RunRequest) -> Admission:
        """A retried start of a run that already exists: the same owner gets it back, anyone else is refused."""
        if existing.scope == request.scope and existing.owner == request.owner:
            return Admission(run=existing)
        raise RunIdTaken(existing.id)

    def completed_case_names(self, run_id: str) -> list[str]:
        rows = self._cur().execute(
            "SELECT name FROM eval_cases WHERE run_id = ? AND status = 'completed' ORDER BY name", [run_id]
        ).fetchall()
        return [r[0] for r in rows]

    # ------------------------------------------------------------ case rows

    def save_cases(self, events: Sequence[CaseEvent]) -> SaveReport:
        """Group-commit the latest state of each case; isolate rows that fail.

        A batch is one transaction. If it fails, each row is retried on its
        own so that one bad row (runbook case 1) cannot lose its siblings.
        Nothing is written once the run row is no longer `running`.
        """
        report = SaveReport()
        batch = _latest_per_row(events)
        if not batch:
            return report
        try:
            fenced = self._transaction(lambda cur: self._upsert_cases(cur, batch))
            report.fenced = bool(fenced)
            return report
        except (duckdb.Error, errors.StoreError):
            pass
        for ev in batch:
            try:
                fenced = self._transaction(lambda cur, ev=ev: self._upsert_cases(cur, [ev]))
                report.fenced = report.fenced or bool(fenced)
            except (duckdb.Error, errors.StoreError) as exc:
                report.failures[ev.row_id] = f"{type(exc).__name__}: {exc}"
        return report

    def save_case_batches(self, batches: Sequence[Sequence[CaseEvent]]) -> list[SaveReport]:
        """Several callers' batches in one transaction (one writer call): one report per batch.

        Each batch keeps its own guard inside the shared transaction: one
        UPDATE of the runs' rows `WHERE status = 'running'` decides, for every
        batch, whether its run is still open; a batch whose run was closed is
        fenced and writes nothing while the others land, exactly as if each
        were saved alone. The open batches' rows then go in one statement (a
        statement costs about what a commit does, so one per batch would
        undo most of the coalescing); a row that several batches carry ends
        as it would if they were written one after another: at its first
        terminal state, else its latest. If the shared transaction fails,
        each batch is saved on its own (`save_cases`, which isolates a bad
        row), so one bad batch cannot fail its neighbours.
        """
        return self.save_case_batches_and_heartbeats(batches, ())[0]

    def save_case_batches_and_heartbeats(
        self, batches: Sequence[Sequence[CaseEvent]], heartbeats: Sequence[str]
    ) -> tuple[list[SaveReport], set[str]]:
        """`save_case_batches` and `heartbeats` in one transaction (one commit, not two): (reports, alive run ids).

        The heartbeats go first. If the transaction fails, the heartbeats and
        then each batch are written on their own.
        """
        latest = [_latest_per_row(batch) for batch in batches]
        if heartbeats:
            self.faults.check("heartbeat")

        def body(cur: duckdb.DuckDBPyConnection) -> tuple[list[bool], set[str]]:
            alive = self._refresh_heartbeats(cur, heartbeats) if heartbeats else set()
            return self._upsert_case_group(cur, latest), alive

        try:
            fenced, alive = self._transaction(body)  # type: ignore[misc]
        except (duckdb.Error, errors.StoreError):
            alive = self.heartbeats(heartbeats) if heartbeats else set()
            return [self.save_cases(batch) for batch in batches], alive
        reports = []
        for was_fenced in fenced:
            report = SaveReport()
            report.fenced = bool(was_fenced)
            reports.append(report)
        return reports, alive

    def _upsert_case_group(self, cur: duckdb.DuckDBPyConnection, batches: list[list[CaseEvent]]) -> list[bool]:
        """The batches' guards and rows in one transaction; for each batch, True when it was fenced."""
        if self.faults:
            for ev in (ev for batch in batches for ev in batch):
                self.faults.check("case_save", ev.name)
        run_ids = sorted({ev.run_id for batch in batches for ev in batch})
        if not run_ids:
            return [False] * len(batches)
        now = self.clock()
        # The guard, as in `_upsert_cases`: a write to each run row, so DuckDB orders it against a close.
        live = {r[0] for r in cur.execute(
            "UPDATE eval_runs SET heartbeat_at = ? WHERE list_contains(?, id) AND status = 'running' RETURNING id",
            [now, run_ids],
        ).fetchall()}
        fenced = [not all(ev.run_id in live for ev in batch) for batch in batches]
        rows: dict[str, CaseEvent] = {}
        for batch, was_fenced in zip(batches, fenced):
            if was_fenced:
                continue
            for ev in batch:
                earlier = rows.get(ev.row_id)
                if earlier is None or earlier.status == RUNNING:  # a terminal row is never written again
                    rows[ev.row_id] = ev
        if rows:
            self._write_cases(cur, *_case_rows_upsert(None, now, list(rows.values())))
        return fenced

    def _upsert_cases(self, cur: duckdb.DuckDBPyConnection, batch: list[CaseEvent]) -> bool:
        """Returns True when the run is fenced (no longer running) and nothing was written."""
        if self.faults:
            for ev in batch:
                self.faults.check("case_save", ev.name)
        run_ids = sorted({ev.run_id for ev in batch})
        now = self.clock()
        # The guard is a write, not a read: touching the run row orders this batch against a
        # close of the same run (DuckDB refuses the second of two writes to a row), so the batch
        # lands before the close, and is closed with it, or sees the run closed and writes nothing.
        # A batch of case results is also a sign of life, hence the heartbeat.
        live = cur.execute(
            "UPDATE eval_runs SET heartbeat_at = ? WHERE list_contains(?, id) AND status = 'running' RETURNING id",
            [now, run_ids],
        ).fetchall()
        if len(live) != len(run_ids):
            return True
        for run_id in run_ids:
            self._write_cases(cur, *_case_rows_upsert(run_id, now, [ev for ev in batch if ev.run_id == run_id]))
        return False

    # ------------------------------------------------------------ heartbeat

    def heartbeat(self, run_id: str) -> bool:
        """Refresh the lease. False means the row is no longer ours to write (fenced)."""
        self.faults.check("heartbeat")

        def body(cur: duckdb.DuckDBPyConnection) -> bool:
            rows = cur.execute(
                "UPDATE eval_runs SET heartbeat_at = ? WHERE id = ? AND status = 'running' RETURNING id",
                [self.clock(), run_id],
            ).fetchall()
            return bool(rows)

        return bool(self._transaction(body))

    def heartbeats(self, run_ids: Sequence[str]) -> set[str]:
        """Refresh the leases of several runs in one transaction; the ids still running (the rest are fenced)."""
        self.faults.check("heartbeat")
        if not run_ids:
            return set()
        return self._transaction(lambda cur: self._refresh_heartbeats(cur, run_ids))  # type: ignore[return-value]

    def _refresh_heartbeats(self, cur: duckdb.DuckDBPyConnection, run_ids: Sequence[str]) -> set[str]:
        rows = cur.execute(
            "UPDATE eval_runs SET heartbeat_at = ? WHERE list_contains(?, id) AND status = 'running' RETURNING id",
            [self.clock(), sorted(set(run_ids))],
        ).fetchall()
        return {r[0] for r in rows}

    # ------------------------------------------------------------ retention

    def delete_expired_runs(self, completed_before: datetime, batch_runs: int = RETENTION_BATCH_RUNS) -> Retained:
        """Delete closed runs that ended before `completed_before`, with their case rows; never a running row.

        In transactions of at most `batch_runs` runs, each its own writer
        call, so other writes interleave and no transaction grows with the
        history. A run's cases go in the same transaction as the run. Then a
        CHECKPOINT, so the freed blocks are reused by later writes (DuckDB
        does not give them back to the filesystem; the file stops growing
        until new data fills them).
        """
        deleted = Retained()

        def one_batch(cur: duckdb.DuckDBPyConnection) -> tuple[list[str], int]:
            ids = [r[0] for r in cur.execute(
                "SELECT id FROM eval_runs WHERE status <> 'running' AND completed_at < ? "
                "ORDER BY completed_at LIMIT ?", [completed_before, batch_runs]).fetchall()]
            if not ids:
                return [], 0
            before = self._case_changes_count()
            self._write_cases(cur, "DELETE FROM eval_cases WHERE run_id IN (SELECT unnest(?::VARCHAR[]))", [ids],
                              kind="deleted")
            cases = self._case_changes_count() - before
            if self.case_durations is None:
                cases = int(cur.fetchone()[0])
            runs = cur.execute(
                "DELETE FROM eval_runs WHERE list_contains(?, id) AND status <> 'running' RETURNING id", [ids]
            ).fetchall()
            return [r[0] for r in runs], cases

        while True:
            runs, cases = self._transaction(one_batch)  # type: ignore[misc]
            if not runs:
                break
            deleted.run_ids += runs[:RETENTION_LOGGED_IDS - len(deleted.run_ids)]
            deleted.runs += len(runs)
            deleted.cases += cases
            deleted.batches += 1
        if deleted.runs:
            try:
                self._writer.run(lambda: self._cur().execute("CHECKPOINT"))
                deleted.checkpointed = True
            except duckdb.Error as exc:  # the next automatic checkpoint frees the blocks instead
                deleted.checkpoint_error = errors.first_line(str(exc))
        return deleted

    def _case_changes_count(self) -> int:
        return sum(len(rows) for _, rows in self._case_changes)

    # ------------------------------------------------------------ terminal writes

    def finish_run(
        self,
        run_id: str,
        status: RunStatus,
        cause: str | None = None,
        error: str | None = None,
        unsaved_cases: dict[str, str] | None = None,
        terminated_by: str = "runner",
        case_events: Sequence[CaseEvent] = (),
    ) -> RunRow | None:
        """The owner's own terminal write. None when someone else already closed the run.

        `case_events` are the latest states of case rows whose saves failed:
        they land in the same transaction as the close, so the totals count
        them. `unsaved_cases` (row id -> why) are closed as `case_save_failed`
        unless their event landed.
        """
        self.faults.check("suite_status_write")
        now = self.clock()
        return self._transaction(  # type: ignore[return-value]
            lambda cur: self._close_run(
                cur, run_id, status.value, cause, error, terminated_by, now, unsaved_cases or {}, case_events
            )
        )

    def terminate_run(self, run_id: str, cause: Cause | str, error: str, terminated_by: str) -> RunRow | None:
        """Terminate a run on behalf of a dead or unreachable owner (recovery, controller, manual).

        Same transaction shape as the owner's own failure write. None when the
        run was already terminal.
        """
        now = self.clock()
        cause_value = cause.value if isinstance(cause, Cause) else cause
        return self._transaction(  # type: ignore[return-value]
            lambda cur: self._close_run(cur, run_id, FAILED, cause_value, error, terminated_by, now)
        )

    def close_from_summary(
        self,
        run_id: str,
        status: RunStatus,
        cause: str | None,
        error: str | None,
        terminated_by: str,
        case_events: Sequence[CaseEvent],
    ) -> RunRow | None:
        """Close a run as its runner's summary says, after the runner's own final write was lost.

        The summary's case results land in the same transaction as the close
        (rows already terminal stay as they are), so the totals are the ones
        the runner reported. None when the run was already terminal.
        """
        now = self.clock()
        return self._transaction(  # type: ignore[return-value]
            lambda cur: self._close_run(cur, run_id, status.value, cause, error, terminated_by, now, None, case_events)
        )

    def _close_run(
        self,
        cur: duckdb.DuckDBPyConnection,
        run_id: str,
        status: str,
        cause: str | None,
        error: str | None,
        terminated_by: str,
        now: datetime,
        unsaved_cases: dict[str, str] | None = None,
        case_events: Sequence[CaseEvent] = (),
    ) -> RunRow | None:
        still_running = cur.execute("SELECT 1 FROM eval_runs WHERE id = ? AND status = 'running'", [run_id]).fetchone()
        if not still_running:
            return None
        unsaved_cases = dict(unsaved_cases or {})
        self._land_case_events(cur, run_id, case_events, unsaved_cases)
        own_rows = case_row_id(run_id, "")
        for row_id, save_error in unsaved_cases.items():
            if not row_id.startswith(own_rows):  # another run's row is never this run's to close
                continue
            name = row_id[len(own_rows):]
            self._write_cases(
                cur,
                "INSERT INTO eval_cases (id, run_id, name, status, created_at, started_at, completed_at, error, cause) "
                "VALUES (?, ?, ?, 'failed', ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET status = 'failed', completed_at = excluded.completed_at, "
                "error = excluded.error, cause = excluded.cause "
                "WHERE eval_cases.status = 'running' AND eval_cases.run_id = excluded.run_id",
                [row_id, run_id, name, now, now, now, f"case result could not be saved: {save_error}",
                 Cause.CASE_SAVE_FAILED.value],
            )
        case_cause = cause if status == FAILED else Cause.RUNNER_ERROR.value
        self._write_cases(
            cur,
            "UPDATE eval_cases SET status = 'failed', completed_at = ?, cause = ?, error = ? "
            "WHERE run_id = ? AND status = 'running'",
            [now, case_cause or Cause.RUNNER_ERROR.value, _case_error(status, cause, error), run_id],
        )
        # LEFT JOIN: a run without case rows still closes (with zero totals).
        rows = cur.execute(
            f"UPDATE eval_runs SET status = ?, cause = ?, error = ?, completed_at = ?, terminated_by = ?, {_RECOUNT} "
            f"FROM (SELECT * FROM (SELECT ? AS wanted) LEFT JOIN ({_CASE_TOTALS} WHERE run_id = ? GROUP BY run_id) "
            f"ON totals_run_id = wanted) totals "
            f"WHERE id = wanted AND status = 'running' RETURNING {_qualified(RUN_COLUMNS)}",
            [status, cause, error, now, terminated_by, run_id, run_id],
        ).fetchall()
        return _run_row(rows[0]) if rows else None

    def _land_case_events(
        self, cur: duckdb.DuckDBPyConnection, run_id: str, events: Sequence[CaseEvent], unsaved: dict[str, str]
    ) -> None:
        """Write the latest event of each case row that is not terminal yet, inside a close.

        A row whose save is known to fail (an injected `case_save` fault) goes
        to `unsaved` instead, to be closed as `case_save_failed`: one bad row
        must not abort the close of its run.
        """
        latest: dict[str, CaseEvent] = {}
        for ev in events:
            if ev.run_id != run_id:
                continue
            try:
                self.faults.check("case_save", ev.name)
            except duckdb.Error as exc:
                unsaved[ev.row_id] = f"{type(exc).__name__}: {exc}"
                latest.pop(ev.row_id, None)
                continue
            latest[ev.row_id] = ev
        for row_id in latest:
            unsaved.pop(row_id, None)
        if latest:
            self._upsert_cases(cur, list(latest.values()))

    # ------------------------------------------------------------ repairing the invariant

    def stranded_cases(self) -> list[StrandedCases]:
        """Case rows still `running` under a run that is not: what `close_stranded_cases` would close."""
        return self._stranded(self._cur())

    def close_stranded_cases(self, terminated_by: str) -> list[StrandedCases]:
        """Fail every case row still `running` under a closed run, with the run's cause.

        Nothing the product does leaves such a row (a run and its cases close in
        one transaction), but the runbook's manual SQL updates only `eval_runs`.
        The run's status, cause, error and completion time stay as they are; its
        totals are recounted from its case rows.
        """

        def body(cur: duckdb.DuckDBPyConnection) -> list[StrandedCases]:
            found = self._stranded(cur)
            if not found:
                return []
            now = self.clock()
            self._write_cases(
                cur,
                f"UPDATE eval_cases SET status = 'failed', completed_at = ?, cause = {_STRANDED_CAUSE}, "
                "error = 'run was already ' || r.status || coalesce(' (' || r.cause || ')', '') "
                "|| ' while this case was running; closed by ' || ? "
                "FROM eval_runs r WHERE eval_cases.run_id = r.id AND eval_cases.status = 'running' "
                "AND r.status <> 'running'",
                [now, terminated_by],
                returning=", ".join(f"eval_cases.{c.strip()}" for c in CASE_STATE.split(",")),
            )
            cur.execute(
                f"UPDATE eval_runs SET {_RECOUNT} FROM ({_CASE_TOTALS} WHERE list_contains(?, run_id) "
                "GROUP BY run_id) totals WHERE id = totals_run_id", [[s.run_id for s in found]]
            )
            return found

        return self._transaction(body)  # type: ignore[return-value]

    @staticmethod
    def _stranded(cur: duckdb.DuckDBPyConnection) -> list[StrandedCases]:
        rows = cur.execute(
            f"SELECT r.id, r.suite, r.status, {_STRANDED_CAUSE}, count(*) FROM eval_cases c "
            "JOIN eval_runs r ON c.run_id = r.id WHERE c.status = 'running' AND r.status <> 'running' "
            "GROUP BY ALL ORDER BY r.id"
        ).fetchall()
        return [StrandedCases(*r) for r in rows]

    # ------------------------------------------------------------ store-service tokens

    def register_token(self, scope: Scope, token: str) -> None:
        """Let `token` write runs of `scope` (idempotent). Only a hash is stored."""
        self._transaction(lambda cur: cur.execute(
            "INSERT INTO api_tokens VALUES (?, ?, ?) ON CONFLICT (token_sha256) DO NOTHING",
            [_sha256(token), str(scope), self.clock()],
        ))

    def revoke_token(self, token: str) -> None:
        self._transaction(lambda cur: cur.execute("DELETE FROM api_tokens WHERE token_sha256 = ?", [_sha256(token)]))
        self.tokens_revoked += 1

    def scope_for_token(self, token: str) -> Scope | None:
        row = self._read_row("SELECT scope FROM api_tokens WHERE token_sha256 = ?", [_sha256(token)])
        return Scope.parse(row[0]) if row else None

    # ------------------------------------------------------------ reads

    def running_runs(self) -> list[RunRow]:
        return self._select_runs(self._cur(), "WHERE status = 'running' ORDER BY created_at", [])

    def latest_attempt(self, run_ids: Sequence[str], scope: Scope | None = None) -> RunRow | None:
        """Of the runs with these ids (the attempts of one suite), the one with the highest attempt.

        With `scope`, only runs of that scope: a row under another scope is not one of these attempts.
        """
        where, params = "WHERE list_contains(?, id)", [list(run_ids)]
        if scope is not None:
            where, params = where + " AND scope = ?", [*params, _scope_text(scope)]
        # The highest attempt picked here, not by ORDER BY … LIMIT: DuckDB's top-N takes
        # buffer blocks whose handles its eviction queue keeps long after the query, and the
        # controller asks this on every reconcile (a suite has a handful of attempts).
        rows = self._select_runs(self._cur(), where, params)
        return max(rows, key=attrgetter("attempt")) if rows else None

    def get_run(self, run_id: str) -> RunRow | None:
        rows = self._select_runs(self._cur(), "WHERE id = ?", [run_id])
        return rows[0] if rows else None

    def run_statuses(self, run_ids: Sequence[str]) -> dict[str, str]:
        """The status of each of these runs that has a row, in one read (a point read costs milliseconds)."""
        if not run_ids:
            return {}
        rows = self._cur().execute("SELECT id, status FROM eval_runs WHERE list_contains(?, id)",
                                   [list(run_ids)]).fetchall()
        return dict(rows)

    def find_runs_by_prefix(self, prefix: str, limit: int = 5) -> list[RunRow]:
        return self._select_runs(
            self._cur(), "WHERE starts_with(id, ?) ORDER BY created_at DESC LIMIT ?", [prefix, limit]
        )

    def list_runs(
        self, status: str | None = None, suite: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[RunRow]:
        where, params = _run_filters(status, suite)
        return self._select_runs(
            self._cur(), f"{where} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?", [*params, limit, offset]
        )

    def count_runs(self, status: str | None = None, suite: str | None = None) -> int:
        where, params = _run_filters(status, suite)
        row = self._read_row(f"SELECT count(*) FROM eval_runs {where}", params)
        return int(row[0]) if row else 0

    def attempts(self, run_id: str) -> list[RunRow]:
        """The chain of attempts a run belongs to, oldest first."""
        chain: list[RunRow] = []
        current = self.get_run(run_id)
        while current is not None and current.parent_run_id and len(chain) < 100:
            parent = self.get_run(current.parent_run_id)
            if parent is None:
                break
            chain.insert(0, parent)
            current = parent
        me = self.get_run(run_id)
        if me:
            chain.append(me)
        children = self._select_runs(self._cur(), "WHERE parent_run_id = ? ORDER BY created_at", [run_id])
        while children and len(chain) < 100:
            chain.append(children[0])
            children = self._select_runs(self._cur(), "WHERE parent_run_id = ? ORDER BY created_at", [children[0].id])
        return chain

    def cases(self, run_id: str) -> list[CaseRow]:
        rows = self._cur().execute(
            f"SELECT {CASE_COLUMNS} FROM eval_cases WHERE run_id = ? ORDER BY started_at NULLS LAST, name", [run_id]
        ).fetchall()
        return [CaseRow(*r) for r in rows]

    # ------------------------------------------------------------ reads for the /evals page and /metrics

    def page_runs(
        self,
        status: str | None = None,
        suite: str | None = None,
        limit: int = 50,
        before: tuple[datetime, str] | None = None,
        after: tuple[datetime, str] | None = None,
    ) -> list[RunRow]:
        """One page of runs, newest first, by keyset rather than OFFSET, so a deep page costs what the first does.

        `before` is the (created_at, id) of the last row of the page above
        (older rows follow); `after` that of the first row of the page below
        (the newer rows just above it, still returned newest first).
        """
        where, params = _run_filters(status, suite)
        clauses = [where[len("WHERE "):]] if where else []
        order = "DESC"
        if before is not None:
            clauses.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [before[0], before[0], before[1]]
        if after is not None:
            clauses.append("(created_at > ? OR (created_at = ? AND id > ?))")
            params += [after[0], after[0], after[1]]
            order = "ASC"
        tail = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._select_runs(
            self._cur(), f"{tail} ORDER BY created_at {order}, id {order} LIMIT ?", [*params, limit]
        )
        return rows[::-1] if order == "ASC" else rows

    def case_tallies(self, run_ids: Sequence[str]) -> dict[str, CaseTally]:
        """Pass/fail/error/running counts and tokens so far from the case rows, for runs whose totals are
        not written yet."""
        if not run_ids:
            return {}
        rows = self._cur().execute(
            "SELECT run_id, "
            "count(*) FILTER (WHERE status = 'completed' AND passed), "
            "count(*) FILTER (WHERE status = 'completed' AND NOT coalesce(passed, false)), "
            "count(*) FILTER (WHERE status = 'failed'), "
            "count(*) FILTER (WHERE status = 'running'), "
            "sum(total_tokens) FILTER (WHERE carried_from IS NULL) "
            "FROM eval_cases WHERE list_contains(?, run_id) GROUP BY run_id",
            [list(run_ids)],
        ).fetchall()
        return {r[0]: CaseTally(int(r[1]), int(r[2]), int(r[3]), int(r[4]), None if r[5] is None else int(r[5]))
                for r in rows}

    def suite_names(self, limit: int = 200) -> list[str]:
        """Suites seen, most recently run first (for the page's suite filter)."""
        rows = self._cur().execute(
            "SELECT suite FROM eval_runs GROUP BY suite ORDER BY max(created_at) DESC LIMIT ?", [limit]
        ).fetchall()
        return [r[0] for r in rows]

    def final_runs(self, suite: str, limit: int = 50, before: RunRow | None = None) -> list[RunRow]:
        """A suite's finished invocations, newest first: its closed runs that no later attempt resumed.

        With `before`, only those created before that run (the attempts it
        resumed are excluded anyway). A suite's history and a run's previous
        run, for comparisons, are made of these.
        """
        clauses = ["suite = ?", "status <> 'running'",
                   "NOT EXISTS (SELECT 1 FROM eval_runs later WHERE later.parent_run_id = eval_runs.id)"]
        params: list[object] = [suite]
        if before is not None:
            clauses.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [before.created_at, before.created_at, before.id]
        return self._select_runs(
            self._cur(), f"WHERE {' AND '.join(clauses)} ORDER BY created_at DESC, id DESC LIMIT ?", [*params, limit]
        )

    def case_differences(self, pairs: Sequence[tuple[str, str]]) -> list[CaseDifference]:
        """For each (before, after) pair of run ids, the cases whose presence or pass verdict differs.

        Only the differences leave the database, so a suite's history costs
        what changed between its runs, not every case row of every run.
        """
        if not pairs:
            return []
        rows = self._cur().execute(
            "WITH pairs AS (SELECT unnest($1::VARCHAR[]) AS before_id, unnest($2::VARCHAR[]) AS after_id), "
            "sides AS ("
            " SELECT p.before_id, p.after_id, c.name, false AS is_after, c.status, c.passed "
            " FROM pairs p JOIN eval_cases c ON c.run_id = p.before_id"
            " UNION ALL"
            " SELECT p.before_id, p.after_id, c.name, true, c.status, c.passed "
            " FROM pairs p JOIN eval_cases c ON c.run_id = p.after_id) "
            "SELECT before_id, after_id, name, "
            "any_value(status) FILTER (WHERE NOT is_after), any_value(passed) FILTER (WHERE NOT is_after), "
            "any_value(status) FILTER (WHERE is_after), any_value(passed) FILTER (WHERE is_after) "
            "FROM sides GROUP BY before_id, after_id, name "
            "HAVING count(*) FILTER (WHERE NOT is_after) = 0 OR count(*) FILTER (WHERE is_after) = 0 "
            "OR bool_or(NOT is_after AND status = 'completed' AND coalesce(passed, false)) "
            "<> bool_or(is_after AND status = 'completed' AND coalesce(passed, false)) "
            "ORDER BY after_id, name",
            [[p[0] for p in pairs], [p[1] for p in pairs]],
        ).fetchall()
        return [CaseDifference(*r) for r in rows]

    def metrics_snapshot(
        self, now: datetime, delay_buckets: Sequence[float], duration_buckets: Sequence[float]
    ) -> MetricsSnapshot:
        """Everything /metrics reads from the database, in one pass on the store thread.

        Detection delay of a row closed by an automatic detector (the sweeper
        or the controller, `terminated_by` starting with either; replaced runs
        excluded) is `completed_at - heartbeat_at`: from the owner's last sign
        of life to the terminal write. It over-states the true delay by at most
        one heartbeat interval, never under-states it.
        """
        cur = self._cur()
        by_status = {r[0]: int(r[1]) for r in cur.execute(
            "SELECT status, count(*) FROM eval_runs GROUP BY status").fetchall()}
        terminations = {(r[0], r[1]): int(r[2]) for r in cur.execute(
            "SELECT coalesce(cause, 'unknown'), coalesce(terminated_by, 'unknown'), count(*) "
            "FROM eval_runs WHERE status = 'failed' GROUP BY ALL").fetchall()}
        delay_rows = _histogram_rows(
            cur,
            "SELECT split_part(terminated_by, ' ', 1) AS label, "
            "epoch(completed_at) - epoch(heartbeat_at) AS x FROM eval_runs "
            "WHERE (starts_with(terminated_by, 'sweeper') OR starts_with(terminated_by, 'controller')) "
            "AND coalesce(cause, '') <> 'replaced' AND heartbeat_at IS NOT NULL AND completed_at IS NOT NULL",
            delay_buckets,
        )
        counted = self.case_durations
        if counted is not None and counted.buckets == tuple(float(b) for b in duration_buckets):
            duration_rows = counted.snapshot()  # kept as rows change: no scan of eval_cases per scrape
        else:
            duration_rows = self.scan_case_durations(duration_buckets)
        heartbeats = [
            HeartbeatAge(r[0], r[1], (now - r[2]).total_seconds() if r[2] is not None else None)
            for r in cur.execute(
                "SELECT id, suite, heartbeat_at FROM eval_runs WHERE status = 'running' ORDER BY created_at"
            ).fetchall()
        ]
        # Run totals, one row per run: cheaper than the case rows, and only closed runs have them.
        tokens: dict[tuple[str, str], int] = {}
        for suite, prompt, completion in cur.execute(
            "SELECT suite, sum(prompt_tokens), sum(completion_tokens) FROM eval_runs "
            "WHERE prompt_tokens IS NOT NULL OR completion_tokens IS NOT NULL GROUP BY suite"
        ).fetchall():
            for kind, n in (("prompt", prompt), ("completion", completion)):
                if n is not None:
                    tokens[(suite, kind)] = int(n)
        return MetricsSnapshot(by_status, terminations, delay_rows, duration_rows, heartbeats, tokens)

    def scan_case_durations(self, buckets: Sequence[float]) -> dict[str, HistogramCounts]:
        """The case-duration histogram counted from every case row (what `case_durations` keeps without a scan)."""
        return _histogram_rows(
            self._cur(),
            "SELECT status AS label, duration_ms / 1000.0 AS x FROM eval_cases "
            "WHERE duration_ms IS NOT NULL AND carried_from IS NULL",
            buckets,
        )

    def import_runs(self, runs: Sequence[RunRow]) -> int:
        """Insert rows verbatim in one statement (bulk import; the page benchmark's 100,000 runs).

        Rows whose id already exists are skipped. Not a state transition: the
        rows keep the status, owner and timestamps they carry.
        """
        if not runs:
            return 0
        columns = [c.strip() for c in RUN_COLUMNS.split(",")]
        types = {
            "created_at": "TIMESTAMPTZ", "started_at": "TIMESTAMPTZ", "completed_at": "TIMESTAMPTZ",
            "heartbeat_at": "TIMESTAMPTZ", "deadline_at": "TIMESTAMPTZ", "attempt": "INTEGER",
            "timeout_seconds": "DOUBLE", "case_count": "INTEGER", "passed": "INTEGER", "failed": "INTEGER",
            "errored": "INTEGER", **{column: "BIGINT" for column in TOKEN_COLUMNS},
        }
        values = []
        for name in columns:
            if name == "owner":
                values.append([r.owner.to_json() if r.owner else None for r in runs])
            elif name == "scope":
                values.append([_scope_text(r.scope) for r in runs])
            else:
                values.append([getattr(r, name) for r in runs])
        select = ", ".join(f"unnest(${i + 1}::{types.get(name, 'VARCHAR')}[])" for i, name in enumerate(columns))

        def body(cur: duckdb.DuckDBPyConnection) -> int:
            before = cur.execute("SELECT count(*) FROM eval_runs").fetchone()[0]
            cur.execute(f"INSERT INTO eval_runs ({RUN_COLUMNS}) SELECT {select} ON CONFLICT (id) DO NOTHING", values)
            return int(cur.execute("SELECT count(*) FROM eval_runs").fetchone()[0] - before)

        return self._transaction(body)  # type: ignore[return-value]

    def _select_runs(self, cur: duckdb.DuckDBPyConnection, tail: str, params: Iterable[object]) -> list[RunRow]:
        rows = cur.execute(f"SELECT {RUN_COLUMNS} FROM eval_runs {tail}", list(params)).fetchall()
        return [_run_row(r) for r in rows]


class RunIdTaken(errors.StoreError):
    def __init__(self, run_id: str):
        super().__init__(f"run id {run_id} already exists and belongs to another owner")


def _qualified(columns: str) -> str:
    """`a, b` as `eval_runs.a, eval_runs.b`: a RETURNING beside a FROM names its table."""
    return ", ".join(f"eval_runs.{c.strip()}" for c in columns.split(","))


def _scope_text(scope: Scope | None) -> str | None:
    return str(scope) if scope is not None else None


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _run_filters(status: str | None, suite: str | None) -> tuple[str, list[object]]:
    clauses, params = [], []
    if status:
        clauses.append("status = ?")
        params.append(status)
    if suite:
        clauses.append("suite = ?")
        params.append(suite)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def _histogram_rows(
    cur: duckdb.DuckDBPyConnection, source: str, buckets: Sequence[float]
) -> dict[str, HistogramCounts]:
    """Cumulative bucket counts (Prometheus `le` semantics), sum and count of `x`, per `label`."""
    bucket_sql = ", ".join("count(*) FILTER (WHERE x <= ?)" for _ in buckets)
    rows = cur.execute(
        f"SELECT label, {bucket_sql}{',' if buckets else ''} count(*), coalesce(sum(x), 0) "
        f"FROM ({source}) WHERE x IS NOT NULL GROUP BY label ORDER BY label",
        [float(b) for b in buckets],
    ).fetchall()
    n = len(buckets)
    return {
        str(r[0]): HistogramCounts(tuple(zip(map(float, buckets), map(int, r[1:n + 1]))), int(r[n + 1]), float(r[n + 2]))
        for r in rows
    }


def _notify(observer: TransactionObserver, seconds: float, error: BaseException | None) -> None:
    try:
        observer(seconds, error)
    except Exception:  # metrics must never fail a write
        pass


# The columns a batch of case events sets, with their SQL types (row id, run id and created_at are the
# batch's own: one run, one moment).
_CASE_EVENT_FIELDS = (
    ("name", "VARCHAR"), ("status", "VARCHAR"), ("started_at", "TIMESTAMPTZ"), ("completed_at", "TIMESTAMPTZ"),
    ("error", "VARCHAR"), ("cause", "VARCHAR"), ("passed", "BOOLEAN"), ("score", "DOUBLE"), ("output", "VARCHAR"),
    ("detail", "VARCHAR"), ("duration_ms", "DOUBLE"), ("prompt_tokens", "INTEGER"), ("completion_tokens", "INTEGER"),
    ("total_tokens", "INTEGER"),
)


def _case_rows_upsert(run_id: str | None, now: datetime, events: Sequence[CaseEvent]) -> tuple[str, list[object]]:
    """One INSERT … ON CONFLICT for a batch of case events: the statement and its parameters.

    `run_id`: the run of every event, sent once; None when they belong to several runs (one id per row).

    Column-wise parameters unnested into rows, one statement for the batch.
    Converting Python values is most of what a batch costs (and it holds the
    GIL the runner's event loop needs), so a column that is NULL in every
    row is sent as a constant, timestamps as epoch seconds (a float converts
    several times faster than a datetime), and the row id is built in SQL.
    A terminal case row is never overwritten, nor a row of another run (the
    WHERE on the update): a row id that another run wrote first stays its.
    """
    params: list[object] = [run_id, now]
    selected = []
    if run_id is None:
        params.append(list(map(attrgetter("run_id"), events)))
        selected.append(f"unnest(${len(params)}::VARCHAR[]) AS row_run_id")
    for name, sql_type in _CASE_EVENT_FIELDS:
        values = list(map(attrgetter(name), events))
        if all(v is None for v in values):
            selected.append(f"NULL::{sql_type} AS {name}")
            continue
        if sql_type == "TIMESTAMPTZ":
            params.append([None if v is None else v.timestamp() for v in values])
            selected.append(f"to_timestamp(unnest(${len(params)}::DOUBLE[])) AS {name}")
        else:
            params.append(values)
            selected.append(f"unnest(${len(params)}::{sql_type}[]) AS {name}")
    names = ", ".join(name for name, _ in _CASE_EVENT_FIELDS)
    updated = ", ".join(f"{name} = excluded.{name}" for name, _ in _CASE_EVENT_FIELDS
                        if name not in ("name", "started_at"))
    run = "$1" if run_id is not None else "coalesce($1::VARCHAR, row_run_id)"  # $1 is NULL; every $n must appear
    sql = (
        f"INSERT INTO eval_cases (id, run_id, created_at, {names}) "
        f"SELECT {run} || '/' || name, {run}, $2, {names} FROM (SELECT {', '.join(selected)}) "
        f"ON CONFLICT (id) DO UPDATE SET {updated} "
        f"WHERE eval_cases.status = 'running' AND eval_cases.run_id = excluded.run_id"
    )
    return sql, params


def _latest_per_row(events: Sequence[CaseEvent]) -> list[CaseEvent]:
    """The latest event of each case row, in the order the rows first appear."""
    latest: dict[str, CaseEvent] = {}
    for ev in events:
        latest[ev.row_id] = ev
    return list(latest.values())


def _run_row(r: Sequence[object]) -> RunRow:
    values = list(r)
    values[8] = Owner.from_json(values[8])  # type: ignore[arg-type]
    values[21] = Scope.parse(values[21])  # type: ignore[arg-type]
    return RunRow(*values)  # type: ignore[arg-type]


def _case_error(status: str, cause: str | None, error: str | None) -> str:
    if status == FAILED:
        return f"run terminated ({cause}): {error}" if error else f"run terminated ({cause})"
    return "case was still running when its run completed"


def _rollback(cur: duckdb.DuckDBPyConnection) -> None:
    try:
        cur.rollback()
    except duckdb.Error:
        pass
