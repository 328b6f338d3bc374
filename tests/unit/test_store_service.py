"""The store service over real HTTP on 127.0.0.1, backed by a real DuckDB file.

The runner talks to it through HttpStore exactly as a Job pod does.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from service_support import ServiceThread

from evalrunner.admission import RunRefused
from evalrunner.faults import Faults
from evalrunner.models import LockPolicy, RunStatus
from evalrunner.owner import this_process
from evalrunner.runner import RunOptions, StatusWriteFailed, run_suite
from evalrunner.scope import Scope
from evalrunner.service.auth import new_token
from evalrunner.store import DuckDBStore, RunRequest
from evalrunner.store.http_client import HttpStore, StoreServiceError
from evalrunner.suites import load_suite
from evalrunner.summary import RunSummary

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "suites"
ADMIN = "admin-token-for-tests"


@pytest.fixture
def service(tmp_path):
    store = DuckDBStore.open(tmp_path / "service.duckdb", faults=Faults(""))
    svc = ServiceThread(store, ADMIN, max_body_bytes=1024 * 1024)
    svc.url = svc.origin
    yield svc
    svc.stop()
    store.close()


def token_for(service: ServiceThread, name: str) -> tuple[str, str]:
    token, scope = new_token(), Scope("team-a", name, f"uid-{name}")
    service.store.register_token(scope, token)
    return token, scope


def raw(service: ServiceThread, method: str, path: str, body: bytes | None = None, token: str | None = None):
    req = urllib.request.Request(f"{service.url}{path}", data=body, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_runner_reports_through_the_service(service):
    token, scope = token_for(service, "nightly")
    suite = load_suite(EXAMPLES / "mixed.yaml")
    client = HttpStore(service.url, token)
    result = asyncio.run(run_suite(suite, client, RunOptions(handle_signals=False, search_path=(str(EXAMPLES),))))

    row = service.store.get_run(result.run.id)
    assert row.status == "completed" and row.scope == scope
    assert (row.passed, row.failed, row.errored) == (2, 2, 2)
    cases = {c.name: c for c in service.store.cases(row.id)}
    assert len(cases) == 6 and cases["times-out"].cause == "case_timeout"


def test_tokens_401_without_and_403_for_another_evalruns_run(service):
    mine, _ = token_for(service, "mine")
    theirs, _ = token_for(service, "theirs")
    run = HttpStore(service.url, mine).start_run(
        RunRequest(suite="s", case_names=("a",), timeout_seconds=1, owner=this_process())).run

    status, body = raw(service, "POST", f"/api/v1/runs/{run.id}/heartbeat", b"{}")
    assert status == 401 and "bearer token" in body["error"]
    status, body = raw(service, "POST", f"/api/v1/runs/{run.id}/heartbeat", b"{}", token="not-a-token")
    assert status == 401
    status, body = raw(service, "POST", f"/api/v1/runs/{run.id}/finish", b'{"status": "failed"}', token=theirs)
    assert status == 403 and "another EvalRun" in body["error"]
    assert service.store.get_run(run.id).status == "running"  # nothing was written by the foreign token
    with pytest.raises(StoreServiceError) as exc:
        HttpStore(service.url, theirs).heartbeat(run.id)
    assert exc.value.status == 403


def test_retried_requests_are_idempotent(service):
    token, _ = token_for(service, "retry")
    client = HttpStore(service.url, token)
    request = RunRequest(suite="s", case_names=("a",), timeout_seconds=1, owner=this_process(), run_id="fixed-id-1")
    first = client.start_run(request).run
    again = client.start_run(request).run  # the response was lost; the runner retries
    assert first.id == again.id == "fixed-id-1"
    assert service.store.count_runs() == 1

    from evalrunner.store import CaseEvent
    from evalrunner.store.duckdb_store import utcnow

    event = CaseEvent("fixed-id-1/a", "fixed-id-1", "a", "completed", utcnow(), utcnow(), passed=True, score=1.0)
    client.save_cases([event])
    client.save_cases([event])
    assert len(service.store.cases("fixed-id-1")) == 1

    done = client.finish_run("fixed-id-1", RunStatus.COMPLETED)
    replay = client.finish_run("fixed-id-1", RunStatus.COMPLETED)
    assert done.status == replay.status == "completed" and done.completed_at == replay.completed_at

    other_owner = RunRequest(suite="s", case_names=("a",), timeout_seconds=1,
                             owner=type(this_process())(kind="pod", namespace="x", pod="impostor"), run_id="fixed-id-1")
    with pytest.raises(StoreServiceError) as exc:
        client.start_run(other_owner)
    assert exc.value.status == 409


def test_lock_policy_refusal_crosses_the_wire(service):
    client = HttpStore(service.url, ADMIN)
    client.start_run(RunRequest(suite="shared", case_names=("a",), timeout_seconds=1, owner=this_process()))
    with pytest.raises(RunRefused) as exc:
        client.start_run(RunRequest(suite="shared", case_names=("a",), timeout_seconds=1, owner=this_process()))
    assert exc.value.suite == "shared" and len(exc.value.live_run_ids) == 1


def test_a_runner_token_never_decides_the_lock_policy(service):
    """The controller applied the policy before it made the pod: a runner's start is recorded, not refused,
    and a runner asking for Replace closes nobody's run."""
    first = HttpStore(service.url, token_for(service, "first")[0])
    second = HttpStore(service.url, token_for(service, "second")[0])
    live = first.start_run(RunRequest(suite="locked", case_names=("a",), timeout_seconds=1, owner=this_process(),
                                      lock_policy=LockPolicy.FORBID)).run
    admitted = second.start_run(RunRequest(suite="locked", case_names=("a",), timeout_seconds=1,
                                           owner=this_process(), lock_policy=LockPolicy.REPLACE))
    assert admitted.replaced == () and admitted.run.lock_policy == "Replace"
    assert service.store.get_run(live.id).status == "running"


def test_oversized_and_malformed_bodies_get_clear_errors_and_lose_nothing(service):
    token, _ = token_for(service, "big")
    client = HttpStore(service.url, token)
    run = client.start_run(RunRequest(suite="s", case_names=("a",), timeout_seconds=1, owner=this_process())).run

    huge = json.dumps({"events": [{"row_id": "x", "output": "y" * (2 * 1024 * 1024)}]}).encode()
    status, body = raw(service, "POST", f"/api/v1/runs/{run.id}/cases", huge, token=token)
    assert status == 413
    assert "too large" in body["error"] and "limit is 1048576 bytes" in body["error"]

    status, body = raw(service, "POST", f"/api/v1/runs/{run.id}/cases", b"{not json", token=token)
    assert status == 400 and "not valid JSON" in body["error"]
    bad = json.dumps({"events": [{"row_id": f"{run.id}/a", "run_id": run.id, "name": "a", "status": "done",
                                  "started_at": "2026-01-01T00:00:00+00:00"}]}).encode()
    status, body = raw(service, "POST", f"/api/v1/runs/{run.id}/cases", bad, token=token)
    assert status == 400 and body["error"].startswith("events[0].status")
    status, body = raw(service, "POST", "/api/v1/runs", b'{"suite": "s"}', token=token)
    assert status == 400 and "case_names: required field is missing" in body["error"]

    assert service.store.get_run(run.id).status == "running"
    status, body = raw(service, "GET", "/healthz")
    assert status == 200 and body["ok"]


def test_runner_final_write_fault_leaves_the_summary_and_the_row_running(service):
    """EVALRUNNER_FAULTS in a runner pod fails its own final write (runbook case 2), not the service's."""
    token, _ = token_for(service, "case2")
    suite = load_suite(EXAMPLES / "smoke.yaml")
    kept: list[RunSummary] = []
    client = HttpStore(service.url, token, faults=Faults("suite_status_write=*"))
    options = RunOptions(handle_signals=False, search_path=(str(EXAMPLES),),
                         keep_summary=lambda s: kept.append(s) or "memory")
    with pytest.raises(StatusWriteFailed):
        asyncio.run(run_suite(suite, client, options))

    assert len(kept) == 1 and kept[0].status == "completed" and "injected fault" in kept[0].write_error
    row = service.store.get_run(kept[0].run_id)
    assert row.status == "running"  # left for the controller to complete from the summary
    assert {c.status for c in service.store.cases(row.id)} == {"completed"}


def test_a_case_whose_exception_text_is_huge_fails_alone_with_its_text_clipped(tmp_path):
    """The store API refuses error texts over 1 MiB; the runner clips them, so one huge exception
    message fails its own case, not the batch it rides in (and then the whole run)."""
    (tmp_path / "huge_targets.py").write_text(
        "def answer(x):\n"
        "    if x == 'boom':\n"
        "        raise ValueError('x' * 2_000_000)\n"
        "    return x\n")
    suite_file = tmp_path / "huge.yaml"
    suite_file.write_text(
        "name: huge\ntarget: {python: {callable: 'huge_targets:answer'}}\n"
        "cases:\n  - {id: ok, input: fine, expected: fine}\n  - {id: boom, input: boom, expected: x}\n")
    store = DuckDBStore.open(tmp_path / "huge.duckdb", faults=Faults(""))
    service = ServiceThread(store, ADMIN)  # the service's default body limit (8 MiB)
    service.url = service.origin
    try:
        token, _ = token_for(service, "huge")
        result = asyncio.run(run_suite(load_suite(suite_file), HttpStore(service.url, token),
                                       RunOptions(handle_signals=False, search_path=(str(tmp_path),))))
        row = store.get_run(result.run.id)
        cases = {c.name: c for c in store.cases(row.id)}
    finally:
        service.stop()
        store.close()
    assert row.status == "completed"
    assert cases["ok"].status == "completed" and cases["ok"].passed
    assert cases["boom"].cause == "case_raised", cases["boom"]
    assert "truncated, 2000" in cases["boom"].error and len(cases["boom"].error) <= 1024 * 1024
