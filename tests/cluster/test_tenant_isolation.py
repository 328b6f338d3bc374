"""Two tenants on the real control plane: one runner's token against the other's runs.

Two EvalRuns in two namespaces, one controller serving both. The attacker's
token is the one its runner pod holds: a service-account token for the store's
audience, issued by the API server bound to that pod (the TokenRequest a
kubelet makes, here made directly, as anyone who can read the pod's token file
has it). Every write it tries against the other tenant's run is refused, its
token stops working once its pod is deleted, and the other tenant's rows are
unchanged afterwards.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from operator_support import (RUN_ID, ControllerProcess, EvalRuns, create_namespace, evalrun_manifest,
                              slow_suite, smoke_suite, wait_for)

pytestmark = pytest.mark.cluster

AUDIENCE = "evalrunner-store"  # the controller's default --token-audience


def pod_token(api_client: Any, pod: Any, audience: str = AUDIENCE) -> str:
    """The token the kubelet projects into the pod: bound to it, for the store's audience."""
    from kubernetes import client

    request = {"spec": {"audiences": [audience], "expirationSeconds": 3600, "boundObjectRef": {
        "apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid}}}
    account = pod.spec.service_account_name or "default"
    return client.CoreV1Api(api_client).create_namespaced_service_account_token(
        account, pod.metadata.namespace, request).status.token


def call(url: str, method: str, path: str, body: Any, token: str) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}/api/v1{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def case_event(run_id: str, name: str) -> dict:
    return {"row_id": f"{run_id}/{name}", "run_id": run_id, "name": name, "status": "completed", "output": "PWNED",
            "passed": True, "score": 1.0, "started_at": "2026-12-01T12:00:00+00:00",
            "completed_at": "2026-12-01T12:00:01+00:00"}


@pytest.fixture
def tenants(cluster, evalrun_crd, namespace, tmp_path):
    api = cluster.api_client()
    other = create_namespace(api, f"{namespace[:50]}-b")
    proc = ControllerProcess(cluster.kubeconfig, [namespace, other], tmp_path).start()
    yield proc, EvalRuns(api, namespace), EvalRuns(api, other), api
    proc.stop()
    from kubernetes import client

    client.CoreV1Api(api).delete_namespace(other)
    print("\n".join(line for line in proc.logs().splitlines()[-60:] if "error" in line or "Traceback" in line))
    api.close()


def test_a_runners_token_reaches_its_own_run_and_nothing_of_another_tenant(tenants):
    controller, team_a, team_b, api = tenants
    team_a.create(evalrun_manifest("attacker", [slow_suite("slow", cases=40, seconds=0.5)]))
    team_b.create(evalrun_manifest("victim", [smoke_suite("smoke")]))
    victim = team_b.wait_phase("victim", ("Succeeded", "Failed"))
    victim_run = victim["suites"][0]["runId"]
    pod = team_a.running_pod("attacker", "slow")
    own_run = pod.metadata.annotations[RUN_ID]
    wait_for("the attacker's runner to open its run", lambda: controller.run(own_run))
    token = pod_token(api, pod)
    before = (controller.run(victim_run), controller.cases(victim_run))
    owner = {"kind": "pod", "namespace": pod.metadata.namespace, "pod": pod.metadata.name, "pod_uid": pod.metadata.uid}
    start = {"suite": "smoke", "case_names": ["c0"], "timeout_seconds": 5, "owner": owner}

    attacks = {
        "cases": ("POST", f"/runs/{victim_run}/cases", {"events": [case_event(victim_run, "add")]}),
        "finish": ("POST", f"/runs/{victim_run}/finish", {"status": "failed", "cause": "manual"}),
        "heartbeat": ("POST", f"/runs/{victim_run}/heartbeat", {}),
        "read": ("GET", f"/runs/{victim_run}/cases", None),
        "start with its run id": ("POST", "/runs", {**start, "run_id": victim_run}),
        "resume it": ("POST", "/runs", {**start, "parent_run_id": victim_run}),
        "Replace": ("POST", "/runs", {**start, "run_id": victim_run, "lock_policy": "Replace"}),
    }
    answers = {name: call(controller.url, method, path, body, token)
               for name, (method, path, body) in attacks.items()}
    assert {name: status for name, (status, _) in answers.items()} == {name: 403 for name in attacks}, answers
    assert (controller.run(victim_run), controller.cases(victim_run)) == before, "the victim's rows changed"

    # Its own run, it may write: the token is real, the refusals above are the scope's.
    assert call(controller.url, "POST", f"/runs/{own_run}/heartbeat", {}, token) == (200, {"alive": True})
    # A token the API server did not issue, or issued for another audience, is no token at all.
    assert call(controller.url, "POST", f"/runs/{own_run}/heartbeat", {}, token[:-4] + "AAAA")[0] == 401
    assert call(controller.url, "POST", f"/runs/{own_run}/heartbeat", {},
                pod_token(api, pod, "https://kubernetes.default.svc"))[0] == 401

    from kubernetes import client

    client.CoreV1Api(api).delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
    wait_for("the pod to be gone", lambda: team_a.pod(pod.metadata.name) is None)
    status, body = call(controller.url, "POST", f"/runs/{own_run}/heartbeat", {}, token)
    assert status == 401, body
    row = wait_for("the controller to close the deleted pod's run",
                   lambda: (r := controller.run(own_run))["status"] != "running" and r, timeout=30)
    assert row["cause"] == "pod_deleted"
    assert (controller.run(victim_run), controller.cases(victim_run)) == before
    with urllib.request.urlopen(f"{controller.url}/metrics", timeout=5) as resp:
        assert "PWNED" not in resp.read().decode()
