"""`/metrics` over real HTTP: the text parses, and each metric says what the database and the store did."""

from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from evalrunner import recovery
from evalrunner.faults import Faults
from evalrunner.models import Cause, RunStatus
from evalrunner.store import DuckDBStore
from evalrunner.store.duckdb_store import utcnow

from service_support import Client, ServiceThread, dead_owner, finish, save, start


@pytest.fixture
def store(tmp_path):
    s = DuckDBStore.open(tmp_path / "metrics.duckdb", faults=Faults(""))
    yield s
    s.close()


@pytest.fixture
def service(store):
    svc = ServiceThread(store, "admin")
    yield svc
    svc.stop()


def scrape(service) -> dict[str, list]:
    reply = Client(service).get("/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(reply.text):  # raises on malformed text
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples, name: str, **labels) -> float:
    matches = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {matches}"
    return matches[0]


def test_runs_by_status_terminations_and_stuck(service, store):
    finish(store, start(store, "a"))
    finish(store, start(store, "a"), RunStatus.FAILED, cause="case_raised")
    live = start(store, "b")
    stuck = start(store, "c", owner=dead_owner())
    recovery.recover_run(store, start(store, "d", owner=dead_owner()), "test")

    m = scrape(service)
    assert value(m, "evalrunner_runs", status="running") == 2
    assert value(m, "evalrunner_runs", status="completed") == 1
    assert value(m, "evalrunner_runs", status="failed") == 2
    assert value(m, "evalrunner_run_terminations_total", cause="case_raised", terminated_by="runner") == 1
    assert value(m, "evalrunner_run_terminations_total", cause="manual", terminated_by="manual") == 1
    assert value(m, "evalrunner_stuck_runs", cause="killed") == 1
    ages = {s.labels["run_id"]: s.value for s in m["evalrunner_run_heartbeat_age_seconds"]}
    assert set(ages) == {live.id, stuck.id} and all(0 <= a < 60 for a in ages.values())


def test_detection_delay_is_last_heartbeat_to_termination_by_a_detector(service, store):
    t0 = utcnow() - timedelta(minutes=10)
    swept = start(store, "swept", at=t0)
    store.clock = lambda: t0 + timedelta(seconds=42)
    store.terminate_run(swept.id, Cause.HEARTBEAT_LOST, "no heartbeat", "sweeper")
    by_pod_watch = start(store, "killed", at=t0)
    store.clock = lambda: t0 + timedelta(seconds=3)
    store.terminate_run(by_pod_watch.id, Cause.OOM_KILLED, "OOMKilled", "controller")
    manual = start(store, "manual", at=t0)
    store.clock = lambda: t0 + timedelta(seconds=500)
    store.terminate_run(manual.id, Cause.MANUAL, "by hand", "manual")  # not a detection
    store.clock = utcnow

    m = scrape(service)
    assert value(m, "evalrunner_detection_delay_seconds_count", detector="sweeper") == 1
    assert value(m, "evalrunner_detection_delay_seconds_sum", detector="sweeper") == pytest.approx(42)
    assert value(m, "evalrunner_detection_delay_seconds_bucket", detector="sweeper", le="30.0") == 0
    assert value(m, "evalrunner_detection_delay_seconds_bucket", detector="sweeper", le="60.0") == 1
    assert value(m, "evalrunner_detection_delay_seconds_bucket", detector="controller", le="5.0") == 1
    assert not [s for s in m["evalrunner_detection_delay_seconds_count"] if s.labels["detector"] == "manual"]


def test_case_durations(service, store):
    run = start(store, "durations", cases=("fast", "slow", "boom"))
    save(store, run, "fast", True, duration_ms=40)
    save(store, run, "slow", False, duration_ms=7000)
    save(store, run, "boom", None, duration_ms=100)
    m = scrape(service)
    assert value(m, "evalrunner_case_duration_seconds_count", status="completed") == 2
    assert value(m, "evalrunner_case_duration_seconds_bucket", status="completed", le="0.05") == 1
    assert value(m, "evalrunner_case_duration_seconds_bucket", status="completed", le="10.0") == 2
    assert value(m, "evalrunner_case_duration_seconds_sum", status="completed") == pytest.approx(7.04)
    assert value(m, "evalrunner_case_duration_seconds_count", status="failed") == 1


def test_store_write_latency_and_errors(service, store):
    before = scrape(service)
    writes_before = value(before, "evalrunner_store_write_seconds_count")
    run = start(store, "writes")
    store.heartbeat(run.id)
    store.faults = Faults("case_save=x")
    save(store, run, "x", True)  # the batch fails, then the row alone: two failed transactions
    m = scrape(service)
    assert value(m, "evalrunner_store_write_seconds_count") >= writes_before + 2
    assert value(m, "evalrunner_store_write_errors_total", error="IOException") == 2
    assert value(m, "evalrunner_run_heartbeat_age_max_seconds") >= 0


def test_metrics_without_runs_still_parse(service):
    m = scrape(service)
    assert value(m, "evalrunner_runs", status="running") == 0
    assert value(m, "evalrunner_run_heartbeat_age_max_seconds") == 0
