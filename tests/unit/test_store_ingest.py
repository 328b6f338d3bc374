"""The store service under load: the bounded queue (503 + Retry-After), coalesced writes that keep each
batch's guard, heartbeats ahead of batches, the caches in front of the token and run tables, 413
splitting in the runner's client, case-duration counters kept without scans, and retention.

Real DuckDB files and a real aiohttp server on 127.0.0.1, as the runner's HttpStore sees it.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time
from concurrent.futures import Future
from datetime import timedelta

import pytest
from service_support import ServiceThread

from evalrunner.faults import Faults
from evalrunner.models import LockPolicy, RunStatus
from evalrunner.owner import this_process
from evalrunner.scope import Scope
from evalrunner.service.app import RETENTION_DELETED, delete_expired
from evalrunner.service.auth import TokenCheck, new_token
from evalrunner.service.context import INGEST
from evalrunner.service.ingest import Ingest
from evalrunner.service.metrics import CASE_DURATION_BUCKETS
from evalrunner.store import CaseEvent, DuckDBStore, RunRequest, wire
from evalrunner.store.duckdb_store import utcnow
from evalrunner.store.http_client import HttpStore
from evalrunner.store.records import SaveReport

ADMIN = "admin-token-for-tests"


@pytest.fixture
def store(tmp_path):
    with DuckDBStore.open(tmp_path / "ingest.duckdb", faults=Faults("")) as s:
        yield s


@pytest.fixture
def make_service(store):
    started = []

    def make(**kwargs) -> ServiceThread:
        svc = ServiceThread(store, ADMIN, **kwargs)
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.stop()


def runner_token(store: DuckDBStore, name: str) -> tuple[str, Scope]:
    token, scope = new_token(), Scope("team-a", name, f"uid-{name}")
    store.register_token(scope, token)
    return token, scope


def open_run(client: HttpStore, suite: str = "s", cases=("a",)):
    return client.start_run(RunRequest(suite, tuple(cases), 30.0, this_process(), lock_policy=LockPolicy.ALLOW)).run


def events(run_id: str, names, status: str = "completed", output: str | None = "ok", duration_ms: float | None = 5.0):
    now = utcnow()
    return [CaseEvent(f"{run_id}/{n}", run_id, n, status, now, now if status != "running" else None,
                      passed=True if status == "completed" else None, score=1.0 if status == "completed" else None,
                      output=output, duration_ms=duration_ms) for n in names]


def post(svc: ServiceThread, path: str, body: dict, token: str) -> tuple[int, dict[str, str], dict]:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    conn.request("POST", f"/api/v1{path}", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.headers.items()}, data


class HeldWriter:
    """Occupies the store's one writer thread until released: what a long transaction does."""

    def __init__(self, store: DuckDBStore):
        self.store = store
        self.gate = threading.Event()
        self.holding = threading.Event()
        self.thread = threading.Thread(target=lambda: store._writer.run(self._hold), daemon=True)
        self.thread.start()
        assert self.holding.wait(5)

    def _hold(self) -> None:
        self.holding.set()
        self.gate.wait(10)

    def queued(self) -> int:
        return self.store._writer._pool._work_queue.qsize()

    def release(self) -> None:
        self.gate.set()
        self.thread.join(10)


def in_thread(fn, *args) -> Future:
    result: Future = Future()

    def run():
        try:
            result.set_result(fn(*args))
        except BaseException as exc:
            result.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return result


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# ------------------------------------------------------------------ the bounded queue


def test_a_full_queue_answers_503_with_retry_after_and_the_client_waits_that_long_then_saves(store, make_service):
    svc = make_service(max_pending_events=10)
    token, _ = runner_token(store, "busy")
    client = HttpStore(svc.origin, token)
    run = open_run(client, cases=[f"c{i}" for i in range(15)])
    ingest = svc.app[INGEST]

    held = HeldWriter(store)
    first = in_thread(client.save_cases, events(run.id, [f"c{i}" for i in range(5)]))  # taken, waits for the writer
    wait_until(lambda: ingest.pending_events == 5)

    one_more = in_thread(post, svc, f"/runs/{run.id}/cases", {"events": _wire(events(run.id, ["c5"]))}, token)
    wait_until(lambda: ingest.pending_events == 6)  # one more event fits (6 <= 10): queued

    batch = events(run.id, [f"c{i}" for i in range(6, 15)])  # 9 more would make 15 > 10
    status, headers, body = post(svc, f"/runs/{run.id}/cases", {"events": _wire(batch)}, token)
    assert status == 503 and body["kind"] == "busy" and "busy" in body["error"]
    assert int(headers["retry-after"]) >= 1 and float(headers["retry-after-ms"]) > 0

    slept: list[float] = []

    def sleep_then_free_the_writer(seconds: float) -> None:
        slept.append(seconds)
        held.release()
        wait_until(lambda: ingest.pending_events == 0)

    retrying = HttpStore(svc.origin, token, sleep=sleep_then_free_the_writer)
    report = retrying.save_cases(batch)
    assert report == SaveReport() and retrying.retries == 1
    asked = float(headers["retry-after-ms"]) / 1000
    assert len(slept) == 1 and slept[0] >= asked * 0.5  # the server's ask (as of that moment), never shorter by much
    assert first.result(10) == SaveReport() and one_more.result(10)[0] == 200
    assert {c.name for c in store.cases(run.id) if c.status == "completed"} == {f"c{i}" for i in range(15)}
    assert ingest.stats.refused >= 2


def test_a_batch_bigger_than_the_bound_still_goes_through_alone(store, make_service):
    svc = make_service(max_pending_events=10)
    token, _ = runner_token(store, "big")
    client = HttpStore(svc.origin, token)
    run = open_run(client)
    assert client.save_cases(events(run.id, [f"c{i}" for i in range(50)])) == SaveReport()
    assert len(store.cases(run.id)) == 50


def test_the_client_gives_up_after_its_time_budget(store, make_service):
    svc = make_service(max_pending_events=1)
    token, _ = runner_token(store, "patient")
    client = HttpStore(svc.origin, token)
    run = open_run(client)
    held = HeldWriter(store)
    first = in_thread(client.save_cases, events(run.id, ["a"]))
    wait_until(lambda: svc.app[INGEST].pending_events == 1)
    impatient = HttpStore(svc.origin, token, retry_for_s=0.3)
    started = time.monotonic()
    with pytest.raises(Exception) as exc:
        impatient.save_cases(events(run.id, ["b"]))
    assert "HTTP 503" in str(exc.value) and "gave up after" in str(exc.value)
    assert time.monotonic() - started < 2
    held.release()
    assert first.result(10) == SaveReport()


# ------------------------------------------------------------------ coalescing


def test_coalesced_batches_are_one_transaction_and_keep_each_runs_guard(store):
    client_runs = [store.start_run(RunRequest(s, ("a", "b"), 30.0, this_process(), lock_policy=LockPolicy.ALLOW)).run
                   for s in ("s1", "s2", "s3")]
    closed, open1, open2 = client_runs
    store.finish_run(closed.id, RunStatus.COMPLETED)
    transactions = []
    store.transaction_observer = lambda seconds, error: transactions.append(error)

    reports = store.save_case_batches([events(closed.id, ["a"]), events(open1.id, ["a", "b"]), events(open2.id, ["a"])])

    assert transactions == [None], "one writer call, one transaction"
    assert [r.fenced for r in reports] == [True, False, False]
    assert store.cases(closed.id) == []  # nothing written under the closed run
    assert {c.name for c in store.cases(open1.id)} == {"a", "b"} and len(store.cases(open2.id)) == 1


def test_the_service_coalesces_batches_that_wait_together_and_fences_a_run_closed_meanwhile(store, make_service):
    svc = make_service()
    ingest = svc.app[INGEST]
    tokens = [runner_token(store, f"r{i}")[0] for i in range(4)]
    clients = [HttpStore(svc.origin, t) for t in tokens]
    runs = [open_run(c, suite=f"s{i}", cases=("a", "b")) for i, c in enumerate(clients)]

    held = HeldWriter(store)
    first = in_thread(clients[0].save_cases, events(runs[0].id, ["a"]))
    wait_until(lambda: held.queued() == 1)  # the first group waits for the writer
    later = [in_thread(clients[i].save_cases, events(runs[i].id, ["a", "b"])) for i in (1, 2, 3)]
    wait_until(lambda: ingest.pending_events == 7)
    closing = in_thread(store.finish_run, runs[3].id, RunStatus.FAILED, "manual", "closed meanwhile")
    wait_until(lambda: held.queued() == 2)  # the close is queued on the writer before the second group
    writes_before = ingest.stats.writes
    held.release()

    assert first.result(10) == SaveReport()
    assert closing.result(10) is not None
    reports = [f.result(10) for f in later]
    assert [r.fenced for r in reports] == [False, False, True]
    assert ingest.stats.writes - writes_before == 2, "the three waiting batches went in one transaction"
    assert {c.status for c in store.cases(runs[1].id)} == {"completed"}
    assert store.cases(runs[3].id) == []  # nothing written under the closed run


def test_heartbeats_go_before_batches_that_wait():
    writes: list[tuple[list[str], int]] = []  # (heartbeats, batches) of each transaction, in order
    first_write = threading.Event()

    class SlowStore:
        def save_case_batches_and_heartbeats(self, batches, heartbeats):
            writes.append((sorted(heartbeats), len(batches)))
            first_write.wait(5)
            return [SaveReport() for _ in batches], {"r1"} & set(heartbeats)

    ingest = Ingest(SlowStore())  # type: ignore[arg-type]
    try:
        one = ingest.save_cases(events("r1", ["a"]))
        wait_until(lambda: writes == [([], 1)])  # in flight
        two = ingest.save_cases(events("r1", ["b"] * 5))
        three = ingest.save_cases(events("r2", ["c"]))
        beats = [ingest.heartbeat("r1"), ingest.heartbeat("r2"), ingest.heartbeat("r1")]
        first_write.set()
        assert [b.result(5) for b in beats] == [True, False, True]
        assert one.result(5) == two.result(5) == three.result(5) == SaveReport()
        # The heartbeats waited for the group in flight only, and went first in the next transaction.
        assert writes == [([], 1), (["r1", "r2"], 2)]
    finally:
        first_write.set()
        ingest.stop()


def test_heartbeats_alone_and_with_a_group_refresh_the_lease_and_fence_closed_runs(store):
    runs = [store.start_run(RunRequest(s, ("a",), 30.0, this_process(), lock_policy=LockPolicy.ALLOW)).run
            for s in ("s1", "s2")]
    store.finish_run(runs[1].id, RunStatus.COMPLETED)
    ingest = Ingest(store)
    try:
        assert ingest.heartbeat(runs[0].id).result(5) is True
        assert ingest.heartbeat(runs[1].id).result(5) is False
        before = store.get_run(runs[0].id).heartbeat_at
        saved = ingest.save_cases(events(runs[0].id, ["a"]))
        beat = ingest.heartbeat(runs[0].id)
        assert saved.result(5) == SaveReport() and beat.result(5) is True
        assert store.get_run(runs[0].id).heartbeat_at > before
    finally:
        ingest.stop()


# ------------------------------------------------------------------ caches


def test_tokens_are_checked_on_every_request_with_the_cache_in_front(store, make_service):
    svc = make_service()
    token, _ = runner_token(store, "mine")
    other, _ = runner_token(store, "other")
    client = HttpStore(svc.origin, token)
    run = open_run(client)
    theirs = open_run(HttpStore(svc.origin, other), suite="t")

    unknown = new_token()
    assert post(svc, f"/runs/{run.id}/heartbeat", {}, unknown)[0] == 401
    store.register_token(Scope("team-a", "mine", "uid-mine"), unknown)  # registered after a miss: works at once
    assert post(svc, f"/runs/{run.id}/heartbeat", {}, unknown)[0] == 200

    assert post(svc, f"/runs/{run.id}/heartbeat", {}, token)[0] == 200  # cached now
    assert post(svc, f"/runs/{theirs.id}/heartbeat", {}, token)[0] == 403  # another EvalRun's run, scope cached
    assert post(svc, f"/runs/{theirs.id}/heartbeat", {}, token)[0] == 403
    store.revoke_token(token)
    assert post(svc, f"/runs/{run.id}/heartbeat", {}, token)[0] == 401  # revoked: refused at once
    assert post(svc, "/runs/no-such-run/heartbeat", {}, other)[0] == 404


def test_a_cached_token_expires_after_its_ttl():
    now = [0.0]
    table = {"t": Scope("ns", "er", "uid")}
    lookups = []

    def lookup(token):
        lookups.append(token)
        return table.get(token)

    check = TokenCheck(lookup, ttl_s=5.0, clock=lambda: now[0])
    assert check.caller("Bearer t").scope == table["t"] and check.caller("Bearer t") is not None
    assert lookups == ["t"]
    del table["t"]  # revoked by another process's write (not seen by the revocation counter)
    now[0] = 5.0
    assert check.caller("Bearer t") is None and lookups == ["t", "t"]
    assert check.caller("Bearer nope") is None and check.caller("Bearer nope") is None
    assert lookups == ["t", "t", "nope", "nope"], "a miss is never cached"


# ------------------------------------------------------------------ 413: split, and fail one case alone


def test_a_batch_too_large_for_the_body_limit_is_split_until_it_fits(store, make_service):
    svc = make_service(max_body_bytes=64 * 1024)
    token, _ = runner_token(store, "split")
    client = HttpStore(svc.origin, token)
    run = open_run(client, cases=[f"c{i}" for i in range(200)])

    report = client.save_cases(events(run.id, [f"c{i:03d}" for i in range(200)], output="x" * 1000))  # ~240 KiB

    assert report == SaveReport()
    rows = store.cases(run.id)
    assert len(rows) == 200 and {r.status for r in rows} == {"completed"}


def test_a_single_event_too_large_fails_only_that_case(store, make_service):
    svc = make_service(max_body_bytes=64 * 1024)
    token, _ = runner_token(store, "one-big")
    client = HttpStore(svc.origin, token)
    run = open_run(client, cases=("big", "a", "b", "c"))
    batch = events(run.id, ["a", "b"]) + events(run.id, ["big"], output="y" * 100_000) + events(run.id, ["c"])

    report = client.save_cases(batch)

    assert list(report.failures) == [f"{run.id}/big"] and "HTTP 413" in report.failures[f"{run.id}/big"]
    assert {c.name for c in store.cases(run.id)} == {"a", "b", "c"}

    # The runner's final write carries the unsaved case's result: the close still lands.
    closed = client.finish_run(run.id, RunStatus.COMPLETED, case_events=events(run.id, ["big"], output="y" * 100_000),
                               unsaved_cases={f"{run.id}/big": report.failures[f"{run.id}/big"]})
    assert closed is not None and closed.status == "completed"
    big = {c.name: c for c in store.cases(run.id)}["big"]
    assert big.status == "failed" and big.cause == "case_save_failed" and "413" in big.error


# ------------------------------------------------------------------ /metrics counters


def counters_equal_the_scan(store: DuckDBStore) -> None:
    """The kept histogram is the scan's: counts exactly, sums up to float rounding (added in another order)."""
    kept, scanned = store.case_durations.snapshot(), store.scan_case_durations(CASE_DURATION_BUCKETS)
    assert kept.keys() == scanned.keys()
    for status in kept:
        assert kept[status].buckets == scanned[status].buckets and kept[status].count == scanned[status].count
        assert kept[status].sum == pytest.approx(scanned[status].sum, rel=1e-9, abs=1e-6)


def test_case_duration_counters_equal_a_full_scan_after_a_random_mix_of_writes(store):
    rng = random.Random(7)
    store.track_case_durations(CASE_DURATION_BUCKETS)
    clock = [utcnow() - timedelta(days=30)]
    store.clock = lambda: clock[0]
    most = 0
    for step in range(150):
        clock[0] += timedelta(minutes=10)
        op = rng.random()
        rows = store.list_runs(limit=500)
        live = [r for r in rows if r.status == "running"]
        if op < 0.15 or not live:
            closed = [r for r in rows if r.status != "running"]
            parent = rng.choice(closed) if closed and rng.random() < 0.3 else None
            done = store.completed_case_names(parent.id) if parent else []
            store.start_run(RunRequest(
                f"s{rng.randrange(3)}", tuple(f"c{i}" for i in range(8)), 30.0, this_process(),
                lock_policy=LockPolicy.ALLOW, parent_run_id=parent.id if done else None,
                carried_case_names=tuple(done)))
        elif op < 0.7:
            run = rng.choice(live)
            batch = []
            for name in rng.sample([f"c{i}" for i in range(8)], 3):
                status = rng.choice(["running", "completed", "failed"])
                duration = rng.choice([None, rng.uniform(0, 400_000)])  # running rows with a duration too
                batch += events(run.id, [name], status=status, duration_ms=duration)
            if rng.random() < 0.5:
                store.save_cases(batch)
            else:
                store.save_case_batches([batch[:1], batch[1:]])
        elif op < 0.85:
            run = rng.choice(live)
            store.finish_run(run.id, rng.choice([RunStatus.COMPLETED, RunStatus.FAILED]), "case_raised",
                             unsaved_cases={f"{run.id}/c7": "disk full"},
                             case_events=events(run.id, ["c6"], duration_ms=rng.uniform(0, 5000)))
        elif op < 0.95:
            store.terminate_run(rng.choice(live).id, "manual", "by hand", "test")
        else:
            store.delete_expired_runs(clock[0] - timedelta(hours=rng.choice([1, 5, 20])))
        counters_equal_the_scan(store)
        most = max(most, sum(h.count for h in store.case_durations.snapshot().values()))
    assert most > 15


# ------------------------------------------------------------------ retention


def test_retention_deletes_old_closed_runs_only_and_their_blocks_are_reused(store, logs):
    store.track_case_durations(CASE_DURATION_BUCKETS)
    old, now = utcnow() - timedelta(days=40), utcnow()

    def run_at(when, suite, n_cases, close):
        store.clock = lambda: when
        try:
            run = store.start_run(RunRequest(suite, (), 30.0, this_process(), lock_policy=LockPolicy.ALLOW)).run
            for start in range(0, n_cases, 5000):
                store.save_cases(events(run.id, [f"c{i}" for i in range(start, min(n_cases, start + 5000))],
                                        output="o" * 200))
            if close:
                store.finish_run(run.id, RunStatus.COMPLETED)
            return run
        finally:
            store.clock = utcnow

    old_closed = [run_at(old, "old", 10_000, close=True) for _ in range(3)]
    old_running = run_at(old, "stuck", 10, close=False)
    recent = run_at(now, "recent", 10, close=True)
    store._cur().execute("CHECKPOINT")
    size_full = os.path.getsize(store.path)

    delete_expired(store, retain_days=30)

    assert [store.get_run(r.id) for r in old_closed] == [None, None, None]
    assert store.cases(old_closed[0].id) == []
    assert store.get_run(old_running.id).status == "running" and len(store.cases(old_running.id)) == 10
    assert store.get_run(recent.id) is not None and len(store.cases(recent.id)) == 10
    logged = logs.events(RETENTION_DELETED)
    assert len(logged) == 1 and logged[0]["runs"] == 3 and logged[0]["cases"] == 30_000 and logged[0]["checkpointed"]
    assert sorted(logged[0]["run_ids"]) == sorted(r.id for r in old_closed)
    counters_equal_the_scan(store)

    # Measured (DuckDB 2.0): the retention's CHECKPOINT truncates the file where the freed blocks are at its
    # end, and keeps the others inside it as free blocks for later writes.
    size_after = os.path.getsize(store.path)
    free = store._cur().execute("SELECT free_blocks FROM pragma_database_size()").fetchone()[0]
    assert size_after < size_full or free > 0
    run_at(now, "refill", 30_000, close=True)  # as much again: it grows the file by less than it first took
    store._cur().execute("CHECKPOINT")
    assert os.path.getsize(store.path) < 2 * size_full


def _wire(evs):
    return [wire.case_event_to_json(e) for e in evs]


def test_a_row_in_several_coalesced_batches_ends_as_if_they_were_written_in_turn(store):
    run = store.start_run(RunRequest("s", ("a", "b"), 30.0, this_process(), lock_policy=LockPolicy.ALLOW)).run
    first = events(run.id, ["a"], status="running", duration_ms=None) + events(run.id, ["b"], status="completed")
    second = events(run.id, ["a"], status="completed") + events(run.id, ["b"], status="running", duration_ms=None)

    assert [r.fenced for r in store.save_case_batches([first, second])] == [False, False]

    rows = {c.name: c.status for c in store.cases(run.id)}
    assert rows == {"a": "completed", "b": "completed"}  # b was terminal after the first batch: kept
