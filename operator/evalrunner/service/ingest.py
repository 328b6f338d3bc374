"""The runner API's write path: a bounded queue of case batches, coalesced, and a heartbeat lane.

A hundred runners each post a batch of case results every few tens of
milliseconds. Written one request at a time, each batch would pay a
transaction of its own on the store's one writer thread (invariant 10), and
the queue in front of it would grow without limit while every runner waited.
So the service puts one thread of its own, the ingest thread, between the
handlers and the writer:

- **Bounded.** Case events waiting or being written are counted; a batch
  that would take the count past `max_pending_events` is refused at once
  with `Busy` (the handler answers 503 with `Retry-After`), unless nothing
  is pending (so a batch bigger than the bound still goes through alone).
  The wait asked for is how long the events ahead take at the rate recently
  written. The client retries after it (store/http_client.py).
- **Coalesced.** The ingest thread takes every batch queued at the moment
  it is free (up to `max_events_per_write` events) and writes them with one
  writer call, one transaction (`DuckDBStore.save_case_batches`): each
  batch keeps its own run guard inside it, and each request gets its own
  report. Under load the batches pile up while one transaction runs, so the
  transactions grow and their fixed cost is shared; when idle a batch is
  written at once, alone.
- **Heartbeats first.** A heartbeat is a one-row update, but it must not
  wait behind a queue of large batches: a lapsed lease would make the
  controller close a healthy run. Heartbeats have their own lane, never
  refused (at most one entry per run: a run's heartbeats waiting together
  are one), and every heartbeat waiting when the ingest thread takes its
  next group is written first, in the same transaction as that group (one
  commit for both: under load a commit is what a write costs most). A
  heartbeat therefore waits for at most one group in flight, whose size is
  bounded by `max_events_per_write`; if the shared transaction fails, the
  heartbeats are written on their own before the batches are retried.

Other writes (start, finish, the sweeper, the controller) go to the
writer directly, as before; they are few and must not be refused. The
ingest thread hands the writer one transaction at a time, so they never
queue behind more than one group.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

from ..store.duckdb_store import DuckDBStore
from ..store.records import CaseEvent, SaveReport

MAX_PENDING_EVENTS = 50_000
MAX_EVENTS_PER_WRITE = 20_000
# Bounds of the wait a refused client is asked for: a full queue drains in well under a second.
MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 5.0


class Busy(Exception):
    """The queue is full; try again after `retry_after_s`."""

    def __init__(self, retry_after_s: float, pending_events: int):
        super().__init__(f"the store is busy ({pending_events} case events waiting to be written); "
                         f"retry after {retry_after_s:.2f}s")
        self.retry_after_s = retry_after_s
        self.pending_events = pending_events

    @property
    def headers(self) -> dict[str, str]:
        # Retry-After takes whole seconds; retry-after-ms says it precisely to clients that read it.
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s))),
                "retry-after-ms": str(max(1, round(self.retry_after_s * 1000)))}


@dataclass
class _Batch:
    events: Sequence[CaseEvent]
    answer: Future = field(default_factory=Future)


@dataclass
class IngestStats:
    """Counts since start, for the benchmark and the logs."""

    writes: int = 0  # transactions: a group of batches and the heartbeats waiting with it
    batches: int = 0
    events: int = 0
    heartbeats: int = 0
    refused: int = 0
    write_s: float = 0.0  # time spent in them (waiting for the writer included)
    largest_write: int = 0  # events


class Ingest:
    def __init__(self, store: DuckDBStore, max_pending_events: int = MAX_PENDING_EVENTS,
                 max_events_per_write: int = MAX_EVENTS_PER_WRITE):
        self.store = store
        self.max_pending_events = max_pending_events
        self.max_events_per_write = max_events_per_write
        self.stats = IngestStats()
        self._work = threading.Condition()
        self._batches: deque[_Batch] = deque()
        self._heartbeats: dict[str, list[Future]] = {}
        self._pending_events = 0  # queued or being written
        self._events_per_s = 50_000.0  # recent write rate, for the wait a refusal asks for
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="store-ingest", daemon=True)
        self._thread.start()

    @property
    def pending_events(self) -> int:
        return self._pending_events

    def check_room(self) -> None:
        """Refuse early, before the body is read, when the queue is already full."""
        with self._work:
            if self._pending_events >= self.max_pending_events:
                self._refuse()

    def save_cases(self, events: Sequence[CaseEvent]) -> Future:
        """Queue a batch; the future holds its SaveReport. Raises Busy when the queue is full."""
        with self._work:
            if self._pending_events and self._pending_events + len(events) > self.max_pending_events:
                self._refuse()
            batch = _Batch(events)
            self._batches.append(batch)
            self._pending_events += len(events)
            self._work.notify()
        return batch.answer

    def heartbeat(self, run_id: str) -> Future:
        """Queue a heartbeat; the future holds whether the run is still running (False: fenced)."""
        answer: Future = Future()
        with self._work:
            self._heartbeats.setdefault(run_id, []).append(answer)
            self._work.notify()
        return answer

    def stop(self) -> None:
        """Write what is queued, then stop the thread."""
        with self._work:
            self._stopping = True
            self._work.notify()
        self._thread.join()

    def _refuse(self) -> None:
        self.stats.refused += 1
        wait = self._pending_events / max(self._events_per_s, 1.0)
        raise Busy(min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, wait)), self._pending_events)

    def _serve(self) -> None:
        while True:
            with self._work:
                while not (self._batches or self._heartbeats or self._stopping):
                    self._work.wait()
                if self._stopping and not (self._batches or self._heartbeats):
                    return
                heartbeats, self._heartbeats = self._heartbeats, {}
                group: list[_Batch] = []
                n = 0
                while self._batches and (not group or n + len(self._batches[0].events) <= self.max_events_per_write):
                    batch = self._batches.popleft()
                    group.append(batch)
                    n += len(batch.events)
            self._write(heartbeats, group, n)

    def _write(self, heartbeats: dict[str, list[Future]], group: list[_Batch], n_events: int) -> None:
        started = time.perf_counter()
        try:
            reports: list[SaveReport]
            reports, alive = self.store.save_case_batches_and_heartbeats([b.events for b in group], list(heartbeats))
        except BaseException as exc:  # every waiting request gets the error, and the thread lives on
            for answer in [b.answer for b in group] + [a for answers in heartbeats.values() for a in answers]:
                answer.set_exception(exc)
        else:
            for run_id, answers in heartbeats.items():
                for answer in answers:
                    answer.set_result(run_id in alive)
            for batch, report in zip(group, reports):
                batch.answer.set_result(report)
        finally:
            elapsed = time.perf_counter() - started
            with self._work:
                self._pending_events -= n_events
                if n_events and elapsed > 0:
                    self._events_per_s = 0.8 * self._events_per_s + 0.2 * (n_events / elapsed)
            self.stats.writes += 1
            self.stats.batches += len(group)
            self.stats.events += n_events
            self.stats.heartbeats += sum(len(a) for a in heartbeats.values())
            self.stats.write_s += elapsed
            self.stats.largest_write = max(self.stats.largest_write, n_events)
