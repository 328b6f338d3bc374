"""Churn on the real control plane: no row is left running, whatever happens at once.

Many EvalRuns share a suite under Replace and another under Forbid, each with
a suite of its own; while they run, runner pods are deleted mid-run, EvalRuns
are deleted, and the controller is SIGKILLed and restarted. Afterwards every
EvalRun is terminal, no `eval_runs` or `eval_cases` row is `running`, and
every failed run carries the cause of what happened to it: a deletion is
`pod_deleted` (or `shutdown_requested` when the runner recorded its own
SIGTERM first), a replacement `replaced`, never a crash's `error`.
"""

from __future__ import annotations

import json
import random
import time

import duckdb
import pytest

from evalrunner.controller.builders import fit_name
from operator_support import ControllerProcess, evalrun_manifest, slow_suite, wait_for

pytestmark = pytest.mark.cluster

EVALRUNS = 12
LONG_NAME = "churn-" + "x" * 194  # 200 characters: labels are cut at 63, the pods' annotation is not
DELETION_CAUSES = {"pod_deleted", "shutdown_requested"}


def names() -> list[str]:
    return [LONG_NAME if i == 5 else f"churn-{i:02d}" for i in range(EVALRUNS)]


def manifest(i: int, name: str) -> dict:
    # Many short cases, several at a time: the runner posts a batch every 50 ms while a Replace closes its run.
    suites = [slow_suite("shared-replace", cases=80, seconds=0.12, concurrency=6, concurrencyPolicy="Replace"),
              slow_suite(f"own-{i:02d}", cases=24, seconds=0.2, concurrency=2)]
    if i % 2 == 0:
        suites.append(slow_suite("shared-forbid", cases=10, seconds=0.3, concurrencyPolicy="Forbid"))
    return evalrun_manifest(name, suites, retries=1)


def running_pods(evalruns, name: str) -> list:
    pods = evalruns.core.list_namespaced_pod(evalruns.namespace, label_selector="app.kubernetes.io/managed-by="
                                             "evalrunner-controller").items
    label = fit_name(name)  # the EvalRun's label (cut at 63 characters); its annotation has it in full
    return [p for p in pods if p.metadata.labels.get("evals.workshop.dev/evalrun") == label
            and p.metadata.annotations.get("evals.workshop.dev/evalrun-name", name) == name
            and p.status.phase == "Running" and not p.metadata.deletion_timestamp]


def pods_mid_run(evalruns, controller, name: str) -> list:
    """The EvalRun's Running pods whose runner has opened its run and completed a case, once there is one."""
    def probe():
        mid = [p for p in running_pods(evalruns, name)
               if (run := controller.run(p.metadata.annotations["evals.workshop.dev/run-id"]))
               and run["status"] == "running" and controller.completed_cases(run["id"])]
        return mid or None
    try:
        return wait_for(f"a pod of {name} mid-run", probe, timeout=8, interval=0.1)
    except AssertionError:
        return []  # all of it finished or was replaced first


def _runner_log(cluster, namespace: str, owner: dict | None) -> str:
    """The last lines the runner of a failed run wrote, to say why when the test fails."""
    if not owner or not owner.get("pod"):
        return ""
    return "\n".join(cluster.pod_log(namespace, owner["pod"]).splitlines()[-5:])


def test_churn_leaves_no_row_running_and_every_cause_classified(cluster, evalrun_crd, evalruns, namespace, tmp_path):
    rng = random.Random(9)
    controller = ControllerProcess(cluster.kubeconfig, namespace, tmp_path).start()
    deleted_pods: dict[str, str] = {}  # run id -> pod name, of pods this test deleted mid-run
    deleted_evalruns: set[str] = set()
    all_names = names()
    try:
        for i, name in enumerate(all_names):
            evalruns.create(manifest(i, name))
            time.sleep(rng.uniform(1.5, 2.5))
            if i % 3 == 2:  # every third EvalRun: its predecessor's runner pods are deleted mid-run
                for pod in pods_mid_run(evalruns, controller, all_names[i - 1]):
                    deleted_pods[pod.metadata.annotations["evals.workshop.dev/run-id"]] = pod.metadata.name
                    evalruns.core.delete_namespaced_pod(pod.metadata.name, namespace)
            if i in (4, 9):  # two EvalRuns deleted while they run; their Jobs and pods go with them
                victim = all_names[i - 2]
                evalruns.custom.delete_namespaced_custom_object(
                    "evals.workshop.dev", "v1alpha1", namespace, "evalruns", victim)
                deleted_evalruns.add(victim)
            if i == 6:  # the controller dies mid-churn and comes back
                controller.stop(sig=9)
                time.sleep(2)
                controller.start()

        survivors = [n for n in all_names if n not in deleted_evalruns]
        phases = {n: evalruns.wait_phase(n, ("Succeeded", "Failed"), timeout=180)["phase"] for n in survivors}
        wait_for("the deleted EvalRuns' pods to be gone", lambda: not any(
            running_pods(evalruns, n) for n in deleted_evalruns), timeout=60)
        # Give the controller a sweep interval to close what the deletions left, then stop it.
        wait_for("no running row", lambda: not controller.api("/runs?status=running&limit=500")["runs"], timeout=60)
    finally:
        controller.stop()

    with duckdb.connect(str(controller.db), read_only=True) as db:
        running_runs = db.execute("SELECT id, suite FROM eval_runs WHERE status = 'running'").fetchall()
        running_cases = db.execute("SELECT id FROM eval_cases WHERE status = 'running'").fetchall()
        failed = dict(db.execute("SELECT id, cause FROM eval_runs WHERE status = 'failed'").fetchall())
        errors = dict(db.execute("SELECT id, error FROM eval_runs WHERE status = 'failed'").fetchall())
        owners = {k: json.loads(v) for k, v in db.execute(
            "SELECT id, owner FROM eval_runs WHERE status = 'failed' AND owner IS NOT NULL").fetchall()}
        total = db.execute("SELECT count(*) FROM eval_runs").fetchone()[0]
        long_runs = db.execute("SELECT count(*) FROM eval_runs WHERE scope LIKE ?", [f"%/{LONG_NAME}/%"]).fetchone()[0]

    assert running_runs == [], running_runs
    assert running_cases == [], running_cases[:10]
    assert set(phases.values()) <= {"Succeeded", "Failed"} and len(phases) == EVALRUNS - 2
    assert total >= EVALRUNS and long_runs >= 1
    assert deleted_pods, "no pod was deleted mid-run: the churn did not happen"
    assert "replaced" in failed.values(), "no run was replaced: the churn did not happen"
    assert "error" not in failed.values(), {k: (v, errors[k], _runner_log(cluster, namespace, owners.get(k)))
                                            for k, v in failed.items() if v == "error"}
    assert None not in failed.values()
    for run_id in deleted_pods:
        if run_id in failed:
            assert failed[run_id] in DELETION_CAUSES | {"replaced"}, (run_id, failed[run_id], errors[run_id])
    unexplained = {k: (v, errors[k], _runner_log(cluster, namespace, owners.get(k))) for k, v in failed.items()
                   if v not in DELETION_CAUSES | {"replaced"}}
    assert unexplained == {}, unexplained
