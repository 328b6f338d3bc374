"""Durable case rows by group commit, and the run's heartbeat.

Store calls block (DuckDB, or HTTP in cluster mode), so they run on one
dedicated thread; the event loop only queues events. Every case event is
committed within `flush_interval_s` plus the time of one batch write (tens of
milliseconds), so a SIGKILL loses at most that window, never an earlier case.
A case's `running` row is written by the first flush that finds it in flight;
a case that starts and ends inside one window is written once, in its final
state (nothing durable was ever `running` in between), and costs no event.

A batch that fails (a full disk, a store briefly unreachable) loses nothing:
the latest event of each row it could not save is kept and retried with the
next batches, at close, and finally inside the run's final write.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from typing import Callable

from .. import log
from ..models import RunStatus
from ..store.records import CaseEvent
from ..store.thread import StoreThread
from ..timing import FLUSH_INTERVAL_S, HEARTBEAT_INTERVAL_S

# Unsaved rows are retried with backoff while their saves keep failing: on a full
# disk every retry is a failed transaction per row, and they would crowd out the rest.
MAX_RETRY_INTERVAL_S = 2.0
# A batch this big is written without waiting for the flush interval: fast cases then write while
# they run, instead of leaving it all to the end of the run.
CATCH_UP_EVENTS = 1000

InFlight = tuple[str, str, "datetime"]  # (run id, case name, started at)


class CaseRecorder:
    """Queues case events and flushes them in batches; reports save failures per case."""

    def __init__(
        self,
        worker: StoreThread,
        run_id: str,
        suite: str,
        on_fenced: Callable[[], None],
        flush_interval_s: float = FLUSH_INTERVAL_S,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        persist: bool = True,
    ):
        self.worker = worker
        self.run_id = run_id
        self.suite = suite
        self.flush_interval_s = flush_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.persist = persist
        self.unsaved: dict[str, str] = {}  # case row id -> why its latest save failed
        self._unsaved_events: dict[str, CaseEvent] = {}  # case row id -> its latest event not yet saved
        self._retry_interval_s = flush_interval_s
        self._next_retry_at = 0.0  # event-loop time
        self.fenced = False
        self._on_fenced = on_fenced
        self._pending: list[CaseEvent] = []
        self._in_flight: dict[str, InFlight] = {}  # case row id -> a case started and not finished
        self._running_written: set[str] = set()  # in-flight rows already written as `running`
        self._stop = asyncio.Event()
        self._batch_full = asyncio.Event()  # set by `record` at CATCH_UP_EVENTS, and by `close`
        self._tasks: list[asyncio.Task[None]] = []
        self._log = log.get(run_id=run_id, suite=suite)

    def started(self, row_id: str, run_id: str, name: str, started_at: datetime) -> None:
        """A case started: its `running` row goes with the next flush, if it is still running then."""
        if self.persist and not self.fenced:
            self._in_flight[row_id] = (run_id, name, started_at)

    def record(self, event: CaseEvent) -> None:
        """A case's latest state (its final one, from the runner)."""
        if self.persist and not self.fenced:
            self._pending.append(event)
            if len(self._pending) == CATCH_UP_EVENTS:
                self._batch_full.set()
            if self._in_flight.pop(event.row_id, None) is not None:
                self._running_written.discard(event.row_id)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._flush_loop(), name="flush")]
        if self.heartbeat_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))

    async def close(self) -> None:
        """Stop the loops and commit whatever is still queued.

        The flush loop is asked to stop, never cancelled: cancelling it while its
        batch waits for the store thread would drop that batch.
        """
        self._stop.set()
        self._batch_full.set()
        for task in self._tasks:
            if task.get_name() != "flush":
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush(retry_now=True)

    def unsaved_events(self) -> list[CaseEvent]:
        """The latest event of every row whose save has not succeeded yet: for the run's final write."""
        return list(self._unsaved_events.values())

    async def flush(self, retry_now: bool = False) -> None:
        """Save the queued events, then retry the rows whose earlier saves failed (when their backoff allows).

        Retries go in a batch of their own, so a row that keeps failing
        (runbook case 1) never holds back the new results.
        """
        if self.fenced:
            return
        batch, self._pending = self._pending, []
        batch += [CaseEvent(row_id, run_id, name, RunStatus.RUNNING.value, started_at)
                  for row_id, (run_id, name, started_at) in self._in_flight.items()
                  if row_id not in self._running_written]
        if batch:
            await self._save(batch)
        now = asyncio.get_running_loop().time()
        just_tried = {ev.row_id for ev in batch}
        retries = [ev for row_id, ev in self._unsaved_events.items() if row_id not in just_tried]
        if not retries or self.fenced or not (retry_now or now >= self._next_retry_at):
            return
        await self._save(retries)
        failing = any(ev.row_id in self._unsaved_events for ev in retries)
        self._retry_interval_s = (
            min(self._retry_interval_s * 2, MAX_RETRY_INTERVAL_S) if failing else self.flush_interval_s
        )
        self._next_retry_at = now + self._retry_interval_s

    async def _save(self, events: list[CaseEvent]) -> None:
        try:
            # Shielded: once a batch is taken, it is written even if our caller is cancelled.
            report = await asyncio.shield(self.worker.call(self.worker.store.save_cases, events))
        except Exception as exc:  # the store itself is unreachable: every row in the batch is unsaved
            report = None
            failures = {ev.row_id: f"{type(exc).__name__}: {exc}" for ev in events}
        else:
            failures = report.failures
            if report.fenced:
                self._fence()
                return
        latest = {ev.row_id: ev for ev in events}
        for row_id, error in failures.items():
            if row_id not in latest:
                continue
            if row_id not in self.unsaved:
                self._log.error(log.CASE_SAVE_FAILED, case_id=row_id, case=latest[row_id].name, error=error,
                                retrying=True)
            self.unsaved[row_id] = error
            self._unsaved_events[row_id] = latest[row_id]
        if report is None:
            return
        saved = [row_id for row_id in latest if row_id not in failures]
        for row_id in saved:
            self.unsaved.pop(row_id, None)
            self._unsaved_events.pop(row_id, None)
        # Durable now: these case results, and these rows as `running` (not results yet).
        results = [row_id for row_id in saved if latest[row_id].status != RunStatus.RUNNING.value]
        running = [row_id for row_id in saved if latest[row_id].status == RunStatus.RUNNING.value]
        self._running_written.update(row_id for row_id in running if row_id in self._in_flight)
        if results or running:
            self._log.debug(log.CASES_SAVED, case_ids=results, running_ids=running)

    async def _flush_loop(self) -> None:
        while not self._stop.is_set():
            # Fast cases fill a batch while the last one was written: write it at once, or the writes
            # fall behind and the run's end waits for them all.
            if len(self._pending) < CATCH_UP_EVENTS:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._batch_full.wait(), timeout=self.flush_interval_s)
            self._batch_full.clear()
            await self.flush()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                alive = await self.worker.call(self.worker.store.heartbeat, self.run_id)
            except Exception as exc:  # a missed beat is survivable; the lease is several beats long
                self._log.warning(log.HEARTBEAT_FAILED, error=f"{type(exc).__name__}: {exc}")
                continue
            if not alive:
                self._fence()
                return

    def _fence(self) -> None:
        if not self.fenced:
            self.fenced = True
            self._pending.clear()
            self._log.warning(log.RUN_FENCED, reason="the run row was terminated by someone else; stopping")
            self._on_fenced()
