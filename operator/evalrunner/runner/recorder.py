"""Durable case rows by group commit, and the run's heartbeat.

Store calls block (DuckDB, or HTTP in cluster mode), so they run on one
dedicated thread; the event loop only queues events. Every case event is
committed within `flush_interval_s` plus the time of one batch write (tens of
milliseconds), so a SIGKILL loses at most that window, never an earlier case.
When a case starts and ends inside one window, only its final state is
written: nothing durable was ever `running` in between.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

from .. import log
from ..store.records import CaseEvent
from ..store.thread import StoreThread

DEFAULT_FLUSH_INTERVAL_S = 0.05
DEFAULT_HEARTBEAT_INTERVAL_S = 5.0


class CaseRecorder:
    """Queues case events and flushes them in batches; reports save failures per case."""

    def __init__(
        self,
        worker: StoreThread,
        run_id: str,
        suite: str,
        on_fenced: Callable[[], None],
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        persist: bool = True,
    ):
        self.worker = worker
        self.run_id = run_id
        self.suite = suite
        self.flush_interval_s = flush_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.persist = persist
        self.unsaved: dict[str, str] = {}  # case row id -> why its save failed
        self.fenced = False
        self._on_fenced = on_fenced
        self._pending: list[CaseEvent] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._log = log.get(run_id=run_id, suite=suite)

    def record(self, event: CaseEvent) -> None:
        if self.persist and not self.fenced:
            self._pending.append(event)

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
        for task in self._tasks:
            if task.get_name() != "flush":
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush()

    async def flush(self) -> None:
        if not self._pending or self.fenced:
            return
        batch, self._pending = self._pending, []
        try:
            # Shielded: once a batch is taken, it is written even if our caller is cancelled.
            report = await asyncio.shield(self.worker.call(self.worker.store.save_cases, batch))
        except Exception as exc:  # the store itself is unreachable: every row in the batch is unsaved
            report = None
            failures = {ev.row_id: f"{type(exc).__name__}: {exc}" for ev in batch}
        else:
            failures = report.failures
            if report.fenced:
                self._fence()
        names = {ev.row_id: ev.name for ev in batch}
        for row_id, error in failures.items():
            if row_id not in self.unsaved:
                self._log.error(log.CASE_SAVE_FAILED, case_id=row_id, case=names.get(row_id), error=error)
            self.unsaved[row_id] = error
        # A later successful save of the same row supersedes an earlier failure.
        if report is not None:
            for ev in batch:
                if ev.row_id not in failures:
                    self.unsaved.pop(ev.row_id, None)

    async def _flush_loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.flush_interval_s)
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
