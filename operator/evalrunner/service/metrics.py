"""`/metrics` in the Prometheus text format.

Three sources, one custom registry (never the library's global one, so two
apps in one process cannot collide):

- Read from `eval_runs` at scrape time (one row per run, never the case
  rows), on the store thread, so they are true for the whole file whoever
  wrote it (the runner, the sweeper, the controller, a manual recovery, an
  earlier process):
  `evalrunner_runs{status}`, `evalrunner_stuck_runs{cause}`,
  `evalrunner_run_terminations_total{cause,terminated_by}` (failed rows),
  `evalrunner_detection_delay_seconds{detector}`,
  `evalrunner_tokens_total{suite,kind}` (prompt or completion tokens, summed
  over closed runs from their totals: a run's tokens count once it closes),
  `evalrunner_run_heartbeat_age_seconds{run_id,suite}` and its max.
- Counted from `eval_cases` once, when the app is built, then kept by the
  store as it writes case rows (`store/case_durations.py`):
  `evalrunner_case_duration_seconds{status}`. A scrape never scans the case
  rows. Sound because this process holds the DuckDB file lock: every write
  to the file while it runs is one of its own.
- Measured in this process: `evalrunner_store_write_seconds` (each write
  transaction, conflict retries included) and
  `evalrunner_store_write_errors_total{error}`, through
  `DuckDBStore.transaction_observer`. They start at zero when the process does.

Detection delay, precisely: for a row terminated by an automatic detector
(`terminated_by` is `sweeper…` or `controller…`; the `detector` label is that
first word; runs replaced by a newer run are not detections),
`completed_at - heartbeat_at`, the time from the owner's last heartbeat to the
terminal write. A runner heartbeats every few seconds, so this over-states the
time from the owner's death by at most one heartbeat interval.
"""

from __future__ import annotations

from datetime import datetime
from typing import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, exposition
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import admission, recovery
from ..models import RunStatus
from ..owner import local_liveness
from ..store.duckdb_store import DuckDBStore, RunIdTaken, utcnow
from ..store.records import HistogramCounts, MetricsSnapshot
from .context import CALLS, STORE
from .stuck import why_stuck

DETECTION_DELAY_BUCKETS = (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600)
CASE_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STORE_WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", "text/plain; version=0.0.4; charset=utf-8")

# Refusals decided inside a write transaction are answers, not store errors.
_NOT_ERRORS = (admission.RunRefused, RunIdTaken)


class StoreWriteMetrics:
    """Latency and errors of the store's write transactions in this process."""

    def __init__(self, registry: CollectorRegistry):
        self.latency = Histogram(
            "evalrunner_store_write_seconds", "Duration of store write transactions (retries included).",
            buckets=STORE_WRITE_BUCKETS, registry=registry,
        )
        self.errors = Counter(
            "evalrunner_store_write_errors", "Store write transactions that failed, by exception type.",
            ["error"], registry=registry,
        )

    def observe(self, seconds: float, error: BaseException | None) -> None:
        self.latency.observe(seconds)
        if error is not None and not isinstance(error, _NOT_ERRORS):
            self.errors.labels(type(error).__name__).inc()


class DatabaseCollector(Collector):
    """Turns the latest snapshot of the database into metric families."""

    def __init__(self) -> None:
        self.snapshot: MetricsSnapshot | None = None
        self.stuck: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        runs = GaugeMetricFamily("evalrunner_runs", "Runs in the database by status.", labels=["status"])
        for status in RunStatus:
            runs.add_metric([status.value], snap.runs_by_status.get(status.value, 0))
        yield runs

        stuck = GaugeMetricFamily(
            "evalrunner_stuck_runs", "Running runs that are stuck (as the /evals page shows them), by cause.",
            labels=["cause"],
        )
        for cause, n in sorted(self.stuck.items()):
            stuck.add_metric([cause], n)
        yield stuck

        terminations = CounterMetricFamily(
            "evalrunner_run_terminations", "Failed runs by cause and by who terminated them.",
            labels=["cause", "terminated_by"],
        )
        for (cause, by), n in sorted(snap.terminations.items()):
            terminations.add_metric([cause, by], n)
        yield terminations

        yield _histogram(
            "evalrunner_detection_delay_seconds",
            "Seconds from a run's last heartbeat to its termination by a detector (sweeper or controller).",
            "detector", snap.detection_delay,
        )
        yield _histogram(
            "evalrunner_case_duration_seconds", "Case durations (carried-over cases excluded), by case status.",
            "status", snap.case_duration,
        )

        tokens = CounterMetricFamily(
            "evalrunner_tokens", "Tokens spent by closed runs' model calls (targets and judges), by suite and kind "
            "(prompt or completion).", labels=["suite", "kind"],
        )
        for (suite, kind), n in sorted(snap.tokens.items()):
            tokens.add_metric([suite, kind], n)
        yield tokens

        ages = GaugeMetricFamily(
            "evalrunner_run_heartbeat_age_seconds", "Seconds since each running run's last heartbeat.",
            labels=["run_id", "suite"],
        )
        oldest = 0.0
        for hb in snap.heartbeat_ages:
            if hb.age_s is not None:
                ages.add_metric([hb.run_id, hb.suite], hb.age_s)
                oldest = max(oldest, hb.age_s)
        yield ages
        yield GaugeMetricFamily(
            "evalrunner_run_heartbeat_age_max_seconds",
            "The oldest heartbeat among running runs (0 when none is running).", value=oldest,
        )


def _histogram(name: str, doc: str, label: str, series: dict[str, HistogramCounts]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, counts in sorted(series.items()):
        buckets = [(_le(bound), float(n)) for bound, n in counts.buckets] + [("+Inf", float(counts.count))]
        family.add_metric([value], buckets, counts.sum)
    return family


def _le(bound: float) -> str:
    return repr(float(bound))


class Metrics:
    """The registry of one app: write metrics fed by the store, database metrics read per scrape."""

    def __init__(self, liveness: recovery.LivenessCheck | None, heartbeat_timeout_s: float):
        self.registry = CollectorRegistry()
        self.writes = StoreWriteMetrics(self.registry)
        self.database = DatabaseCollector()
        self.registry.register(self.database)
        self.liveness = liveness or (lambda owner: local_liveness(owner))
        self.heartbeat_timeout_s = heartbeat_timeout_s

    def read(self, store: DuckDBStore, now: datetime) -> tuple[MetricsSnapshot, dict[str, int]]:
        """On the store thread: the snapshot, and the stuck runs counted by cause."""
        snap = store.metrics_snapshot(now, DETECTION_DELAY_BUCKETS, CASE_DURATION_BUCKETS)
        stuck: dict[str, int] = {}
        for run in store.running_runs():
            found = why_stuck(run, now, self.liveness, self.heartbeat_timeout_s)
            if found is not None:
                stuck[found.cause] = stuck.get(found.cause, 0) + 1
        return snap, stuck

    def render(self, snap: MetricsSnapshot, stuck: dict[str, int]) -> bytes:
        # No await between setting and generating: a concurrent scrape cannot interleave.
        self.database.snapshot, self.database.stuck = snap, stuck
        return exposition.generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


def add_routes(app: web.Application, metrics: Metrics) -> None:
    app[METRICS] = metrics
    app.router.add_get("/metrics", serve_metrics)


async def serve_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    snap, stuck = await request.app[CALLS](metrics.read, request.app[STORE], utcnow())
    return web.Response(body=metrics.render(snap, stuck), headers={"Content-Type": CONTENT_TYPE})
