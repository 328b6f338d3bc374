"""kwok on the test control plane: fake nodes, and the Stages that end runner pods by outcome.

tools/kwok/stages.yaml ends a pod whose `evals.workshop.dev/suite` label names
an outcome the way a kubelet would report it; these tests check that the API
server, the Job controller and the controller's classifier all read each
ending as intended, so that benchmarks on kwok nodes (bench/scale.py)
exercise the same code paths as real pods.
"""

from __future__ import annotations

import sys
import threading
import uuid
from pathlib import Path

import pytest
from kubernetes import client, watch
from operator_support import wait_for

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "kwok"))

import kwok
from evalrunner.controller.classify import classify_pod_death
from evalrunner.models import Cause

pytestmark = pytest.mark.cluster

# outcome -> (pod phase, container exit code, container reason, pod reason, the Job's final condition, cause)
EXPECTED = {
    "succeeded": ("Succeeded", 0, "Completed", None, "Complete", None),
    "failed": ("Failed", 1, "Error", None, "Failed", Cause.ERROR_EXIT),
    "oomkilled": ("Failed", 137, "OOMKilled", None, "Failed", Cause.OOM_KILLED),
    "evicted": ("Failed", 137, "Error", "Evicted", "Failed", Cause.EVICTED),
    "deleted": (None, None, None, None, "Failed", Cause.POD_DELETED),
}


@pytest.fixture(scope="module")
def fake_nodes(cluster):
    if cluster.state_dir is None:
        pytest.skip("kwok is started against the tools/k8s cluster's state directory (not EVALRUNNER_KUBECONFIG)")
    try:
        kwok.check_binary()
    except kwok.KwokError as e:
        pytest.fail(str(e), pytrace=False)
    kw = kwok.Kwok(cluster.state_dir, exit_after=1.0).start()
    try:
        names = kw.create_nodes(2, prefix=f"kwok-{uuid.uuid4().hex[:6]}")  # tainted: other tests' pods stay away
        kw.wait_nodes_ready(names, timeout=30)
        yield kw, names
    finally:
        kw.stop()
    assert kw.leftovers() == [], "kwok's stop left these behind"


def test_fake_nodes_register_ready_with_a_lease(cluster, fake_nodes):
    _, names = fake_nodes
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        leases = client.CoordinationV1Api(api)
        for name in names:
            node = core.read_node(name)
            assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
            assert node.metadata.annotations[kwok.NODE_ANNOTATION] == "fake"
            # Only kwok's own taint, once the node lifecycle controller has lifted `not-ready` (it does so
            # shortly after the node turns Ready, not at the same moment).
            wait_for(f"node {name} tainted with kwok's taint alone",
                     lambda name=name: [(t.key, t.effect) for t in core.read_node(name).spec.taints or []]
                     == [(kwok.TAINT["key"], "NoSchedule")], timeout=30)
            assert node.status.node_info.kubelet_version.startswith("kwok-")
            lease = wait_for(f"the Lease of {name}", lambda name=name: _lease(leases, name), timeout=15)
            assert lease.spec.renew_time is not None


def _lease(leases, name):
    try:
        return leases.read_namespaced_lease(name, "kube-node-lease")
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def _job(outcome: str) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"kwok-{outcome}"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {kwok.SUITE_LABEL: outcome},
                             "annotations": {kwok.EXIT_AFTER_ANNOTATION: "1s"}},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": kwok.NODE_SELECTOR,
                    "tolerations": [kwok.TOLERATION],
                    "containers": [{"name": "runner", "image": "evalrunner:never-pulled", "command": ["false"]}],
                },
            },
        },
    }


def test_each_outcome_ends_its_pod_and_job_as_a_kubelet_would(cluster, fake_nodes, namespace):
    with cluster.api_client() as api:
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        last: dict[str, dict] = {}  # outcome -> the pod as last seen (the DELETED event's object for `deleted`)
        deleted: set[str] = set()
        running: set[str] = set()
        w = watch.Watch()

        stopped = threading.Event()

        def follow() -> None:
            try:
                for event in w.stream(core.list_namespaced_pod, namespace, timeout_seconds=60):
                    pod = api.sanitize_for_serialization(event["object"])
                    outcome = pod["metadata"]["labels"].get(kwok.SUITE_LABEL)
                    last[outcome] = pod
                    if (pod.get("status") or {}).get("phase") == "Running":
                        running.add(outcome)
                    if event["type"] == "DELETED":
                        deleted.add(outcome)
            except Exception:
                if not stopped.is_set():  # an error while the test still listens is the test's failure
                    raise

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        for outcome in EXPECTED:
            batch.create_namespaced_job(namespace, _job(outcome))

        def job_condition(outcome: str) -> str | None:
            status = batch.read_namespaced_job_status(f"kwok-{outcome}", namespace).status
            done = [c.type for c in status.conditions or [] if c.type in ("Complete", "Failed") and c.status == "True"]
            return done[0] if done else None

        try:
            conditions = wait_for("every Job to finish", lambda: (c := {o: job_condition(o) for o in EXPECTED})
                                  and all(c.values()) and c, timeout=30)
            wait_for("the deleted pod's DELETED event", lambda: "deleted" in deleted, timeout=15)
        finally:
            stopped.set()
            w.stop()

        assert running == set(EXPECTED), "every pod ran before it ended"
        for outcome, (phase, code, reason, pod_reason, job_condition_, cause) in EXPECTED.items():
            assert conditions[outcome] == job_condition_, outcome
            pod = last[outcome]
            death = classify_pod_death(pod, deleted=outcome in deleted)
            if outcome == "deleted":
                assert death is not None and death.cause is cause and death.terminal
                continue
            status = pod["status"]
            terminated = status["containerStatuses"][0]["state"]["terminated"]
            assert (status["phase"], terminated["exitCode"], terminated["reason"], status.get("reason")) == (
                phase, code, reason, pod_reason), outcome
            assert terminated["finishedAt"], outcome
            if cause is None:  # exit 0: the controller completes the row from the runner's own write
                assert death is not None and death.exit_code == 0
            else:
                assert death is not None and death.cause is cause and death.terminal, (outcome, death)
