"""The operator on the real control plane, with real runner processes and the real store.

Each test starts `evalrunner controller` for its own namespace, applies
EvalRuns through the API server, breaks things the way they break in
production (SIGKILL, pod deletion, eviction, ...), and asserts on rows (via
the store API), the EvalRun status, Events and the controller's log.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from operator_support import evalrun_manifest, slow_suite, smoke_suite, wait_for

pytestmark = pytest.mark.cluster


def test_two_suites_reach_succeeded_and_rows_status_and_events_agree(controller, evalruns):
    evalruns.create(evalrun_manifest("nightly", [smoke_suite("smoke"), slow_suite("slow", cases=3, seconds=0.2)]))
    status = evalruns.wait_phase("nightly", ("Succeeded", "Failed"))

    assert status["phase"] == "Succeeded", status
    assert status["progress"] == "2/2"
    by_name = {s["name"]: s for s in status["suites"]}
    smoke, slow = by_name["smoke"], by_name["slow"]
    assert (smoke["passed"], smoke["failed"], smoke["errored"]) == (2, 1, 0)
    assert (slow["passed"], slow["failed"], slow["errored"]) == (3, 0, 0), controller.cases(slow["runId"])
    assert (status["passed"], status["failed"], status["errored"]) == (5, 1, 0)

    for suite in (smoke, slow):
        row = controller.run(suite["runId"])
        assert row["status"] == "completed" and row["attempt"] == 1
        assert (row["passed"], row["failed"], row["errored"]) == (suite["passed"], suite["failed"], suite["errored"])
        assert row["owner"]["kind"] == "pod" and row["owner"]["namespace"] == evalruns.namespace
        assert {c["status"] for c in controller.cases(row["id"])} == {"completed"}

    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Complete"]["status"] == "True" and conditions["Failed"]["status"] == "False"
    assert conditions["CasesPassed"]["status"] == "False"  # one case scored as failing
    reasons = [reason for reason, _ in evalruns.events("nightly")]
    assert reasons.count("Started") == 2 and reasons.count("SuiteCompleted") == 2 and "Succeeded" in reasons


def test_sigkill_of_the_runner_terminates_the_row_as_killed(cluster, controller, evalruns):
    evalruns.create(evalrun_manifest("kill", [slow_suite("slow", cases=20, seconds=0.5)]))
    pod = evalruns.running_pod("kill", "slow")
    run_id = pod.metadata.annotations["evals.workshop.dev/run-id"]
    wait_for("two completed cases", lambda: sum(c["status"] == "completed" for c in controller.cases(run_id)) >= 2
             if controller.run(run_id) else False)
    completed_before = {c["id"] for c in controller.cases(run_id) if c["status"] == "completed"}

    os.killpg(cluster.pod_pid(evalruns.namespace, pod.metadata.name), signal.SIGKILL)
    killed_at = time.monotonic()
    row = wait_for("the row to terminate", lambda: (r := controller.run(run_id))["status"] != "running" and r,
                   timeout=20, interval=0.05)
    assert time.monotonic() - killed_at < 5
    assert (row["status"], row["cause"], row["terminated_by"]) == ("failed", "killed", "controller")

    cases = {c["id"]: c for c in controller.cases(run_id)}
    assert all(cases[cid]["status"] == "completed" for cid in completed_before), "a completed case row was lost"
    assert "running" not in {c["status"] for c in cases.values()}
    suite = wait_for("status to say so", lambda: (s := evalruns.suite("kill", "slow")).get("cause") == "killed" and s)
    assert suite["phase"] == "Failed"
    assert any(r == "RunTerminated" and "killed" in m for r, m in evalruns.events("kill"))
    logged = [e for e in controller.events("eval.run_terminated") if e["run_id"] == run_id]
    assert logged and logged[0]["cause"] == "killed"
