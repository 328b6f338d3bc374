"""The runner API refuses what it must not store: another run's rows, unknown causes, malformed bodies.

Every request here goes over real HTTP to the real aiohttp app backed by a
real DuckDB file. A refusal is a 4xx whose JSON body names the field, never
a 500 or a plain-text traceback, and it changes nothing that is stored.
"""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request

import pytest
from service_support import ServiceThread

from evalrunner.faults import Faults
from evalrunner.models import RunStatus
from evalrunner.scope import Scope
from evalrunner.service.auth import new_token
from evalrunner.store import CaseEvent, DuckDBStore, RunRequest
from evalrunner.owner import this_process
from evalrunner.store.duckdb_store import utcnow

ADMIN = "admin-token-for-bad-inputs"
TS = "2026-01-01T00:00:00+00:00"
OWNER = {"kind": "process", "host": "h", "pid": 1}


@pytest.fixture
def service(tmp_path):
    store = DuckDBStore.open(tmp_path / "service.duckdb", faults=Faults(""))
    svc = ServiceThread(store, ADMIN, max_body_bytes=2 * 1024 * 1024)
    yield svc
    svc.stop()
    store.close()


def call(service, method: str, path: str, body=None, token: str | None = ADMIN, headers=None):
    """(status, content type, parsed JSON body or the raw text)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{service.origin}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, ctype, raw = resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        status, ctype, raw = exc.code, exc.headers.get("Content-Type", ""), exc.read()
    try:
        return status, ctype, json.loads(raw)
    except ValueError:
        return status, ctype, raw.decode("utf-8", "replace")


def refused(reply, status: int, field: str) -> None:
    code, ctype, body = reply
    assert code == status, reply
    assert ctype.startswith("application/json") and isinstance(body, dict), reply
    assert field in body["error"], body


def token_for(service, name: str) -> str:
    token = new_token()
    service.store.register_token(Scope("team", name, f"uid-{name}"), token)
    return token


def open_run(service, token: str, suite: str, cases=("c1", "c2")) -> str:
    status, _, body = call(service, "POST", "/api/v1/runs",
                           {"suite": suite, "case_names": list(cases), "timeout_seconds": 5, "owner": OWNER}, token)
    assert status == 201, body
    return body["run"]["id"]


def event(row_id: str, run_id: str, name: str, status: str = "running", **extra):
    return {"row_id": row_id, "run_id": run_id, "name": name, "status": status, "started_at": TS, **extra}


def snapshot(store: DuckDBStore):
    """Everything stored, to compare before and after a refused request."""
    cur = store._cur()
    return (cur.execute("SELECT * FROM eval_runs ORDER BY id").fetchall(),
            cur.execute("SELECT * FROM eval_cases ORDER BY id").fetchall())


@pytest.fixture
def two_tenants(service):
    """Runs of two EvalRuns; B has saved c1 as running, not c2 yet."""
    a, b = token_for(service, "a"), token_for(service, "b")
    run_a, run_b = open_run(service, a, "suite-a"), open_run(service, b, "suite-b")
    status, _, _ = call(service, "POST", f"/api/v1/runs/{run_b}/cases",
                        {"events": [event(f"{run_b}/c1", run_b, "c1")]}, b)
    assert status == 200
    return a, b, run_a, run_b


# ---------------------------------------------------------------- isolation


def test_a_token_cannot_write_another_runs_case_through_its_own_run(service, two_tenants):
    a, b, run_a, run_b = two_tenants
    before = snapshot(service.store)
    attack = event(f"{run_b}/c1", run_a, "c1", "completed", completed_at=TS, output="PWNED")
    refused(call(service, "POST", f"/api/v1/runs/{run_a}/cases", {"events": [attack]}, a), 403, "row_id")
    assert snapshot(service.store) == before


def test_a_token_cannot_claim_a_row_id_another_run_has_not_written(service, two_tenants):
    a, b, run_a, run_b = two_tenants
    before = snapshot(service.store)
    claim = event(f"{run_b}/c2", run_a, "c2")
    refused(call(service, "POST", f"/api/v1/runs/{run_a}/cases", {"events": [claim]}, a), 403, "row_id")
    refused(call(service, "POST", f"/api/v1/runs/{run_a}/finish",
                 {"status": "failed", "cause": "case_raised", "unsaved_cases": {f"{run_b}/c2": "x", f"{run_b}/c1": "y"}},
                 a), 403, "unsaved_cases")
    assert snapshot(service.store) == before

    status, _, _ = call(service, "POST", f"/api/v1/runs/{run_b}/cases",
                        {"events": [event(f"{run_b}/c2", run_b, "c2", "completed", completed_at=TS, output="mine")]}, b)
    assert status == 200
    cases = {c.id: c for c in service.store.cases(run_b)}
    assert cases[f"{run_b}/c2"].output == "mine" and cases[f"{run_b}/c2"].run_id == run_b
    assert cases[f"{run_b}/c1"].status == "running"


def test_a_finish_cannot_carry_another_runs_case_events(service, two_tenants):
    a, b, run_a, run_b = two_tenants
    before = snapshot(service.store)
    attack = event(f"{run_b}/c1", run_a, "c1", "completed", completed_at=TS, output="PWNED")
    refused(call(service, "POST", f"/api/v1/runs/{run_a}/finish",
                 {"status": "completed", "case_events": [attack]}, a), 403, "row_id")
    assert snapshot(service.store) == before


def test_the_store_never_moves_a_case_row_to_another_run(tmp_path):
    """Defence in depth below the API: a case row stays with the run that wrote it, as it was."""
    store = DuckDBStore.open(tmp_path / "store.duckdb", faults=Faults(""))
    try:
        def start(run_id):
            return store.start_run(RunRequest("s", ("c1",), 5, this_process(), run_id=run_id, admitted=True)).run.id

        victim, attacker = start("r1/x"), start("r1")  # ids the API refuses; the store must hold anyway
        now = utcnow()
        store.save_cases([CaseEvent(f"{victim}/c1", victim, "c1", "running", now)])
        before = [row for row in snapshot(store)[1] if row[1] == victim]
        # The attacker's case "x/c1" has the row id "r1/x/c1": the victim's row.
        pwned = CaseEvent(f"{victim}/c1", attacker, "x/c1", "completed", now, now, output="PWNED")
        store.save_cases([pwned])
        store.finish_run(attacker, RunStatus.FAILED, "manual", "x", unsaved_cases={f"{victim}/c1": "claimed"},
                         case_events=[pwned])
        assert [row for row in snapshot(store)[1] if row[1] == victim] == before
        assert [row[0] for row in snapshot(store)[1] if row[1] == attacker] == []
    finally:
        store.close()


def test_an_unknown_cause_is_refused_and_never_becomes_a_metrics_label(service):
    token = token_for(service, "c")
    run_id = open_run(service, token, "suite-c")
    before = snapshot(service.store)
    refused(call(service, "POST", f"/api/v1/runs/{run_id}/finish",
                 {"status": "failed", "cause": "<script>alert(6)</script>"}, token), 400, "cause")
    bad_case = event(f"{run_id}/c1", run_id, "c1", "failed", completed_at=TS, cause="<b>x</b>")
    refused(call(service, "POST", f"/api/v1/runs/{run_id}/cases", {"events": [bad_case]}, token), 400, "cause")
    assert snapshot(service.store) == before
    with urllib.request.urlopen(f"{service.origin}/metrics", timeout=10) as resp:
        assert "<script>" not in resp.read().decode()


# ---------------------------------------------------------------- POST /runs


def start_body(**changes):
    body = {"suite": "good-suite", "case_names": ["a", "b"], "timeout_seconds": 5, "owner": OWNER}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


BAD_STARTS = {
    "timeout nan": (start_body(timeout_seconds="nan"), "timeout_seconds"),
    "timeout inf": (start_body(timeout_seconds="inf"), "timeout_seconds"),
    "timeout 1e308": (start_body(timeout_seconds=1e308), "timeout_seconds"),
    "timeout an integer past a float's range": (start_body(timeout_seconds=10**400), "timeout_seconds"),
    "timeout negative": (start_body(timeout_seconds=-1), "timeout_seconds"),
    "timeout zero": (start_body(timeout_seconds=0), "timeout_seconds"),
    "timeout string": (start_body(timeout_seconds="5"), "timeout_seconds"),
    "timeout bool": (start_body(timeout_seconds=True), "timeout_seconds"),
    "grace nan": (start_body(deadline_grace_seconds="nan"), "deadline_grace_seconds"),
    "grace 1e308": (start_body(deadline_grace_seconds=1e308), "deadline_grace_seconds"),
    "grace negative": (start_body(deadline_grace_seconds=-5), "deadline_grace_seconds"),
    "suite empty": (start_body(suite=""), "suite"),
    "suite 1 MB": (start_body(suite="s" * 1_000_000), "suite"),
    "suite markup": (start_body(suite="<b>x</b>"), "suite"),
    "suite number": (start_body(suite=5), "suite"),
    "suite list": (start_body(suite=["a"]), "suite"),
    "duplicate cases": (start_body(case_names=["a", "a"]), "case_names"),
    "carried duplicates a case": (start_body(carried_case_names=["a"], parent_run_id="p-1"), "carried_case_names"),
    "case names a string": (start_body(case_names="abc"), "case_names"),
    "case names an object": (start_body(case_names={"a": 1}), "case_names"),
    "case name a number": (start_body(case_names=[1]), "case_names"),
    "case name with a slash": (start_body(case_names=["x/y"]), "case_names"),
    "case name huge": (start_body(case_names=["c" * 100_000]), "case_names"),
    "owner a list": (start_body(owner=[1]), "owner"),
    "owner pid a string": (start_body(owner={"kind": "process", "pid": "x"}), "owner.pid"),
    "owner kind unknown": (start_body(owner={"kind": "robot"}), "owner.kind"),
    "owner host a number": (start_body(owner={"kind": "process", "host": 5}), "owner.host"),
    "owner unknown field": (start_body(owner={"kind": "process", "evil": 1}), "owner"),
    "owner missing": (start_body(owner=...), "owner"),
    "lock policy unknown": (start_body(lock_policy="Sometimes"), "lock_policy"),
    "admitted a string": (start_body(admitted="no"), "admitted"),
    "run id a number": (start_body(run_id=5), "run_id"),
    "run id with a slash": (start_body(run_id="a/b"), "run_id"),
    "run id huge": (start_body(run_id="r" * 10_000), "run_id"),
    "parent run id a list": (start_body(parent_run_id=["p"]), "parent_run_id"),
    "source an object": (start_body(source={"a": 1}), "source"),
    "source huge": (start_body(source="p" * 100_000), "source"),
    "source a lone surrogate": (start_body(source="\ud800"), "source"),
    "owner host a lone surrogate": (start_body(owner={"kind": "process", "host": "\udfff"}), "owner.host"),
    "scope a number": (start_body(scope=5), "scope"),
    "scope with odd characters": (start_body(scope="a/b/\ud800"), "scope"),
    "body a list": ([start_body()], "body"),
    "unknown field": (start_body(evil=1), "evil"),
}


@pytest.mark.parametrize("body,field", BAD_STARTS.values(), ids=BAD_STARTS.keys())
def test_a_bad_start_is_a_400_naming_the_field(service, body, field):
    before = snapshot(service.store)
    refused(call(service, "POST", "/api/v1/runs", body), 400, field)
    assert snapshot(service.store) == before


def test_a_good_start_still_opens_a_run(service):
    status, _, body = call(service, "POST", "/api/v1/runs", start_body(deadline_grace_seconds=0, timeout_seconds=0.5))
    assert status == 201 and body["run"]["suite"] == "good-suite"


# ---------------------------------------------------------------- bodies and queries


def test_malformed_bodies_are_400_json(service):
    before = snapshot(service.store)
    refused(call(service, "POST", "/api/v1/runs", json.dumps(start_body()).encode(),
                 headers={"Content-Encoding": "gzip"}), 400, "body")
    deep = b"[" * 100_000 + b"]" * 100_000
    refused(call(service, "POST", "/api/v1/runs", deep), 400, "body")
    refused(call(service, "POST", "/api/v1/runs", b'{"suite": "s", "timeout_seconds": NaN}'), 400, "body")
    assert snapshot(service.store) == before
    gzipped = gzip.compress(json.dumps(start_body()).encode())
    status, _, _ = call(service, "POST", "/api/v1/runs", gzipped, headers={"Content-Encoding": "gzip"})
    assert status == 201  # a body that really is gzipped is still fine


def test_too_many_events_is_a_clean_413(service):
    token = token_for(service, "many")
    run_id = open_run(service, token, "many")
    before = snapshot(service.store)
    events = [event(f"{run_id}/c{i}", run_id, f"c{i}") for i in range(10_001)]
    refused(call(service, "POST", f"/api/v1/runs/{run_id}/cases", {"events": events}, token), 413, "events")
    refused(call(service, "POST", f"/api/v1/runs/{run_id}/finish",
                 {"status": "completed", "case_events": events}, token), 413, "case_events")
    assert snapshot(service.store) == before


BAD_FINISHES = {
    "unsaved a list": ({"status": "failed", "unsaved_cases": [1, 2]}, "unsaved_cases"),
    "unsaved a string": ({"status": "failed", "unsaved_cases": "x"}, "unsaved_cases"),
    "unsaved error a number": ({"status": "failed", "unsaved_cases": {"RUN/c1": 5}}, "unsaved_cases"),
    "cause a number": ({"status": "failed", "cause": 5}, "cause"),
    "error a list": ({"status": "failed", "cause": "manual", "error": [1]}, "error"),
    "error huge": ({"status": "failed", "cause": "manual", "error": "e" * 1_100_000}, "error"),
    "status missing": ({}, "status"),
    "status running": ({"status": "running"}, "status"),
    "status a list": ({"status": ["failed"]}, "status"),
    "case events an object": ({"status": "completed", "case_events": {"a": 1}}, "case_events"),
    "body a list": ([1], "body"),
    "unknown field": ({"status": "completed", "evil": 1}, "evil"),
}


@pytest.mark.parametrize("body,field", BAD_FINISHES.values(), ids=BAD_FINISHES.keys())
def test_a_bad_finish_is_a_400_naming_the_field(service, body, field):
    token = token_for(service, "fin")
    run_id = open_run(service, token, "fin")
    body = json.loads(json.dumps(body).replace("RUN/", f"{run_id}/"))
    before = snapshot(service.store)
    refused(call(service, "POST", f"/api/v1/runs/{run_id}/finish", body, token), 400, field)
    assert snapshot(service.store) == before


BAD_EVENTS = {
    "name a number": (dict(name=5), "name"),
    "name mismatching the row id": (dict(name="c2"), "row_id"),
    "row id a number": (dict(row_id=5), "row_id"),
    "run id a list": (dict(run_id=["x"]), "run_id"),
    "score a string": (dict(score="x"), "score"),
    "score a bool": (dict(score=True), "score"),
    "passed a string": (dict(passed="yes"), "passed"),
    "duration a string": (dict(duration_ms="1"), "duration_ms"),
    "duration negative": (dict(duration_ms=-1), "duration_ms"),
    "output a number": (dict(output=5), "output"),
    "output 1 MB": (dict(output="o" * 1_000_000), "output"),
    "error an object": (dict(error={"a": 1}), "error"),
    "detail a list": (dict(detail=[1]), "detail"),
    "cause unknown": (dict(cause="because"), "cause"),
    "started_at a number": (dict(started_at=5), "started_at"),
    "completed_at garbage": (dict(completed_at="yesterday"), "completed_at"),
    "started_at past year 9999": (dict(started_at="9999-12-31T23:59:59-23:59"), "started_at"),
    "error a lone surrogate": (dict(error="\ud800"), "error"),
    "event a list": (None, "events[0]"),
}


@pytest.mark.parametrize("change,field", BAD_EVENTS.values(), ids=BAD_EVENTS.keys())
def test_a_bad_case_event_is_a_400_naming_the_field(service, change, field):
    token = token_for(service, "ev")
    run_id = open_run(service, token, "ev")
    ev = [1] if change is None else {**event(f"{run_id}/c1", run_id, "c1"), **change}
    before = snapshot(service.store)
    refused(call(service, "POST", f"/api/v1/runs/{run_id}/cases", {"events": [ev]}, token), 400, field)
    assert snapshot(service.store) == before


@pytest.mark.parametrize("body,field", [
    ([1], "body"), ({"events": {"a": 1}}, "events"), ({"events": "x"}, "events"), ({}, "events"),
    ({"events": [], "evil": 1}, "evil"),
])
def test_a_bad_batch_is_a_400(service, body, field):
    token = token_for(service, "batch")
    run_id = open_run(service, token, "batch")
    refused(call(service, "POST", f"/api/v1/runs/{run_id}/cases", body, token), 400, field)


@pytest.mark.parametrize("query,field", [
    ("limit=-5", "limit"), ("limit=0", "limit"), ("limit=501", "limit"), ("limit=abc", "limit"),
    ("limit=1e3", "limit"), ("status=done", "status"), ("suite=" + "s" * 2000, "suite"),
])
def test_a_bad_list_query_is_a_400_naming_the_field(service, query, field):
    refused(call(service, "GET", f"/api/v1/runs?{query}"), 400, field)


def test_good_list_queries_still_answer(service):
    open_run(service, ADMIN, "listed")
    for query in ("", "?limit=1", "?limit=500", "?status=running&suite=listed"):
        status, _, body = call(service, "GET", f"/api/v1/runs{query}")
        assert status == 200 and len(body["runs"]) == 1, query


@pytest.mark.parametrize("path", ["/api/v1/runs/%ED%A0%80", "/api/v1/runs/a%2Fb/cases", "/api/v1/runs/" + "r" * 300])
def test_a_run_id_no_run_can_have_is_a_json_404(service, path):
    code, ctype, body = call(service, "GET", path)
    assert code == 404 and ctype.startswith("application/json") and "no run" in body["error"]
