"""A real controller process whose Kubernetes API server hangs: it stays alive and ready, and keeps closing rows.

The API server is a stand-in that accepts connections and never answers (a
real one cannot be made to hang on demand). Runners still report to the
store, so the controller must stay ready; its loops must keep turning, so it
must stay live; restarting it would not bring the API server back.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import timedelta

import pytest
from kube_stub import HungServer

from evalrunner.faults import Faults
from evalrunner.owner import Owner
from evalrunner.scope import Scope
from evalrunner.store import DuckDBStore, RunRequest
from evalrunner.store.duckdb_store import utcnow
from evalrunner.timing import HEARTBEAT_LEASE_S

ADMIN = "outage-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def seed(db: str) -> tuple[list[str], str]:
    """Runs of live-looking pods (heartbeats fresh) and one whose heartbeat lapsed long ago."""
    lapsed_at = utcnow() - timedelta(seconds=HEARTBEAT_LEASE_S * 4)
    fresh, lapsed = [], None
    for i in range(21):
        clock = (lambda: lapsed_at) if i == 20 else utcnow
        store = DuckDBStore.open(db, clock=clock, faults=Faults(""))
        try:
            run = store.start_run(RunRequest(
                suite=f"s{i}", case_names=("a",), timeout_seconds=600, run_id=f"run-{i}", admitted=True,
                owner=Owner(kind="pod", namespace="team", pod=f"pod-{i}", pod_uid=f"uid-{i}"),
                scope=Scope("team", f"er-{i}", f"uid-er-{i}"))).run
        finally:
            store.close()
        if i == 20:
            lapsed = run.id
        else:
            fresh.append(run.id)
    return fresh, lapsed


@pytest.fixture
def hung():
    server = HungServer()
    yield server
    server.close()


def test_a_hung_api_server_leaves_the_controller_live_ready_and_sweeping(hung, tmp_path):
    db = str(tmp_path / "controller.duckdb")
    fresh, lapsed = seed(db)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "hung",
        "clusters": [{"name": "hung", "cluster": {"server": hung.url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "hung", "context": {"cluster": "hung", "user": "u"}}]}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "controller.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evalrunner.cli", "controller", "--db", db, "--kubeconfig", str(kubeconfig),
             "--namespace", "team", "--host", "127.0.0.1", "--port", str(port), "--api-timeout", "1",
             "--scan-interval", "0.2", "--sweep-interval", "0.5", "--log-format", "json"],
            stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ, EVALRUNNER_ADMIN_TOKEN=ADMIN))
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if get(f"{url}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)

        # Long enough for several request timeouts, sweeps and listing retries.
        seen = []
        for _ in range(12):
            live, ready, health = get(f"{url}/livez"), get(f"{url}/readyz"), get(f"{url}/healthz")
            seen.append((live[0], ready[0], health[0]))
            time.sleep(0.5)
        assert set(seen) == {(200, 200, 200)}, (seen, health)
        details = health[1]
        assert details["stalled_loops"] == [] and details["index_synced"] is False, details
        assert max(details["seconds_since_progress"].values()) < 3, details
        assert details["seconds_since_sweep"] is not None and details["seconds_since_sweep"] < 3, details

        # Runners can still write: the store is what readiness is about.
        req = urllib.request.Request(f"{url}/api/v1/runs/{fresh[0]}/heartbeat", method="POST", data=b"{}",
                                     headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        status, lapsed_row = get_run(url, lapsed)
        assert (lapsed_row["status"], lapsed_row["cause"]) == ("failed", "heartbeat_lost"), lapsed_row
        assert all(get_run(url, run_id)[1]["status"] == "running" for run_id in fresh), \
            "a row whose pod could not be looked up was closed without evidence"

        # This host's CLI works on the controller's file through it, as through `evalrunner serve`.
        listed = subprocess.run([sys.executable, "-m", "evalrunner.cli", "--db", db, "runs", "-q", "--limit", "100"],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert set(listed.stdout.split()) == set(fresh) | {lapsed}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "controller.watch_failed" for e in events), "the outage went unreported"


def get_run(url: str, run_id: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/api/v1/runs/{run_id}", headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, json.loads(resp.read())
