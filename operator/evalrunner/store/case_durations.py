"""The case-duration histogram of `eval_cases`, kept up to date as rows change.

`/metrics` serves `evalrunner_case_duration_seconds{status}`: every case row
with a duration that was not carried over, by status. Counting that with a
scan of `eval_cases` per scrape costs what the history costs (millions of
rows). Instead the store that owns the file counts it once when tracking
starts and then applies each write transaction's changes after it commits.

This is sound because the process that serves `/metrics` holds the DuckDB
file lock (invariant 2): no other process can write the file while it is
open here, so every change to a case row passes through this store. Manual
SQL or another command can only write the file while this process is not
running, and the next start counts afresh.

What a write tells us: every statement that writes a case row returns the
row's new state (`RETURNING id, status, duration_ms, carried_from`). A row's
earlier state is known too, without reading it: every update of a case row
is guarded by `status = 'running'`, so the row was absent or `running`
before. A `running` row rarely has a duration (the runner sends none until
the case ends), and those that do are remembered by id, so that the row's
later change moves it out of the `running` series.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Iterable

import duckdb

from .records import HistogramCounts

# (row id, status, duration_ms, carried_from): a case row's state as a write returned it.
CaseState = tuple[str, str, "float | None", "str | None"]

# The columns every case write returns for the counters.
RETURNED = "id, status, duration_ms, carried_from"


@dataclass
class _Series:
    per_bucket: list[int]  # not cumulative: values in (bound[i-1], bound[i]]; the last slot is above every bound
    count: int = 0
    sum: float = 0.0


@dataclass
class CaseDurations:
    buckets: tuple[float, ...]
    _series: dict[str, _Series] = field(default_factory=dict)
    _running_timed: dict[str, float] = field(default_factory=dict)  # row id -> seconds, `running` rows with a duration
    # Changed on the writer thread, read by /metrics on another.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def load(self, cur: duckdb.DuckDBPyConnection) -> None:
        """Count every row once (the one scan); then only `written` and `deleted` change the counts."""
        self._series.clear()
        self._running_timed.clear()
        rows = cur.execute(
            "SELECT status, duration_ms / 1000.0 FROM eval_cases WHERE duration_ms IS NOT NULL AND carried_from IS NULL"
        ).fetchall()
        for status, seconds in rows:
            self._add(status, seconds)
        self._running_timed.update(cur.execute(
            "SELECT id, duration_ms / 1000.0 FROM eval_cases "
            "WHERE status = 'running' AND duration_ms IS NOT NULL AND carried_from IS NULL"
        ).fetchall())

    def written(self, rows: Iterable[CaseState]) -> None:
        """Rows inserted, or updated from `running`, with their new state."""
        with self._lock:
            self._written(rows)

    def _written(self, rows: Iterable[CaseState]) -> None:
        for row_id, status, duration_ms, carried_from in rows:
            before = self._running_timed.pop(row_id, None)
            if before is not None:
                self._add("running", before, -1)
            if duration_ms is None or carried_from is not None:
                continue
            seconds = duration_ms / 1000.0
            self._add(status, seconds)
            if status == "running":
                self._running_timed[row_id] = seconds

    def deleted(self, rows: Iterable[CaseState]) -> None:
        with self._lock:
            self._deleted(rows)

    def _deleted(self, rows: Iterable[CaseState]) -> None:
        for row_id, status, duration_ms, carried_from in rows:
            self._running_timed.pop(row_id, None)
            if duration_ms is not None and carried_from is None:
                self._add(status, duration_ms / 1000.0, -1)

    def snapshot(self) -> dict[str, HistogramCounts]:
        """Cumulative counts per bound (Prometheus `le`), as the scan query gives them."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, HistogramCounts]:
        result = {}
        for status, series in sorted(self._series.items()):
            if series.count <= 0:
                continue
            cumulative, running = [], 0
            for bound, n in zip(self.buckets, series.per_bucket):
                running += n
                cumulative.append((float(bound), running))
            result[status] = HistogramCounts(tuple(cumulative), series.count, series.sum)
        return result

    def _add(self, status: str, seconds: float, sign: int = 1) -> None:
        series = self._series.get(status)
        if series is None:
            series = self._series[status] = _Series([0] * (len(self.buckets) + 1))
        series.per_bucket[bisect_left(self.buckets, seconds)] += sign
        series.count += sign
        series.sum += sign * seconds

