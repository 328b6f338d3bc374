"""Every way a runner pod dies, on the real control plane, each ending in its own classified cause.

One test per cause a runner pod can die of (oom_killed, error, pod_deleted,
evicted, node_lost, deadline_exceeded, never_started, container_restarted),
then an operator restart, the runner-summary fallback (runbook case 2),
retries that resume, and each concurrency policy. Real runner processes are
killed for real where a process can die that way (SIGKILL, the kernel's OOM
killer under a cgroup memory limit, an abrupt exit, the Job deadline);
states no process on the simulated node produces (eviction, a lost node, a
container restart) are driven through the API as the cluster itself would
write them.

Each death test asserts the same contract (`assert_terminated`): the row is
terminal within a few seconds of the pod's terminal status (or of the API
action), with the right cause; no completed case row is lost and none is
left running; the EvalRun's suite status shows the cause; a `RunTerminated`
Event says so; and the controller logged `eval.run_terminated`.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime

import pytest

from operator_support import (
    RUN_ID,
    ControllerProcess,
    evalrun_manifest,
    slow_suite,
    target_suite,
    wait_for,
)

pytestmark = pytest.mark.cluster

# "Within a few seconds": the controller reacts to a pod event at once and
# scans every 0.5 s here; the slack is for a loaded test machine.
TERMINAL_WITHIN_S = 3.0


def assert_terminated(controller, evalruns, evalrun: str, suite: str, run_id: str, cause: str,
                      completed_before: set[str], *, latency_s: float | None = None) -> dict:
    row = controller.run(run_id)
    assert (row["status"], row["cause"]) == ("failed", cause), row
    if latency_s is not None:
        assert latency_s < TERMINAL_WITHIN_S, f"row terminal {latency_s:.2f}s after the pod's death"
    cases = {c["name"]: c for c in controller.cases(run_id)}
    assert all(cases[name]["status"] == "completed" for name in completed_before), "a completed case row was lost"
    assert "running" not in {c["status"] for c in cases.values()}, cases
    entry = wait_for(f"the status of suite {suite} to show {cause}",
                     lambda: (s := evalruns.suite(evalrun, suite)).get("cause") == cause and s, timeout=10)
    assert entry["runId"] == run_id and entry["phase"] == "Failed", entry
    wait_for(f"a RunTerminated Event naming {cause}",
             lambda: [m for r, m in evalruns.events(evalrun) if r == "RunTerminated" and run_id in m and cause in m],
             timeout=10)
    logged = wait_for("eval.run_terminated in the controller log",
                      lambda: [e for e in controller.events("eval.run_terminated") if e["run_id"] == run_id],
                      timeout=10)
    assert logged[0]["cause"] == cause and logged[0]["status"] == "failed", logged
    return row


def started(controller, evalruns, evalrun: str, suite: str, completed: int = 2):
    """The Running pod of the suite's first attempt, its run id, and the cases completed so far."""
    pod = evalruns.running_pod(evalrun, suite)
    run_id = pod.metadata.annotations[RUN_ID]
    done = controller.wait_completed(run_id, completed) if completed else set()
    return pod, run_id, done


# ---------------------------------------------------------------- one test per cause


def test_oom_kill_under_the_memory_limit_is_oom_killed(controller, evalruns):
    # c0 and c1 finish at once; c2 allocates 300 MB under a 64 MiB cgroup limit.
    evalruns.create(evalrun_manifest("oom", [target_suite("hog", "hog", [0, 0, 300])],
                                     resources={"limits": {"memory": "64Mi"}}))
    pod = evalruns.any_pod("oom", "hog")
    run_id = pod.metadata.annotations[RUN_ID]
    dead = evalruns.wait_pod_phase(pod.metadata.name, ("Failed",))
    died_at = time.monotonic()
    terminated = dead.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (137, "OOMKilled"), terminated
    _, at = controller.wait_terminal(run_id)

    assert_terminated(controller, evalruns, "oom", "hog", run_id, "oom_killed", {"c0", "c1"}, latency_s=at - died_at)
    case = {c["name"]: c for c in controller.cases(run_id)}["c2"]
    assert (case["status"], case["cause"]) == ("failed", "oom_killed")


def test_abrupt_non_zero_exit_is_error(controller, evalruns):
    evalruns.create(evalrun_manifest("crash", [target_suite("crash", "crash", [0, 0, 1, 0])]))
    pod = evalruns.any_pod("crash", "crash")
    run_id = pod.metadata.annotations[RUN_ID]
    dead = evalruns.wait_pod_phase(pod.metadata.name, ("Failed",))
    died_at = time.monotonic()
    assert dead.status.container_statuses[0].state.terminated.exit_code == 1
    _, at = controller.wait_terminal(run_id)

    row = assert_terminated(controller, evalruns, "crash", "crash", run_id, "error", {"c0", "c1"},
                            latency_s=at - died_at)
    assert "exited with code 1" in row["error"]
    assert controller.run(run_id)["passed"] == 2


def test_pod_deleted_through_the_api_is_pod_deleted(controller, evalruns):
    evalruns.create(evalrun_manifest("del", [slow_suite("slow", cases=20, seconds=0.5)]))
    pod, run_id, done = started(controller, evalruns, "del", "slow")

    evalruns.core.delete_namespaced_pod(pod.metadata.name, evalruns.namespace)
    deleted_at = time.monotonic()
    _, at = controller.wait_terminal(run_id)

    # The runner got SIGTERM and deferred its own shutdown_requested write; the controller's cause stands.
    row = assert_terminated(controller, evalruns, "del", "slow", run_id, "pod_deleted", done, latency_s=at - deleted_at)
    assert row["terminated_by"] == "controller"
    wait_for("the pod to be gone", lambda: evalruns.pod(pod.metadata.name) is None, timeout=30)
    assert controller.run(run_id)["cause"] == "pod_deleted", "the runner's late write overwrote the cause"


def test_eviction_through_the_eviction_api_is_evicted(controller, evalruns):
    evalruns.create(evalrun_manifest("evict", [slow_suite("slow", cases=20, seconds=0.5)]))
    pod, run_id, done = started(controller, evalruns, "evict", "slow")

    evalruns.core.create_namespaced_pod_eviction(pod.metadata.name, evalruns.namespace, {
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": pod.metadata.name, "namespace": evalruns.namespace}})
    evicted_at = time.monotonic()
    _, at = controller.wait_terminal(run_id)

    row = assert_terminated(controller, evalruns, "evict", "slow", run_id, "evicted", done, latency_s=at - evicted_at)
    assert "EvictionByEvictionAPI" in row["error"], row["error"]
    wait_for("the pod to be gone", lambda: evalruns.pod(pod.metadata.name) is None, timeout=30)
    assert controller.run(run_id)["cause"] == "evicted"


def _node_ready(core, node: str) -> bool:
    n = core.read_node(node)
    ready = next(c for c in n.status.conditions if c.type == "Ready")
    unreachable = [t for t in n.spec.taints or [] if t.key.startswith("node.kubernetes.io/")]
    return ready.status == "True" and not unreachable


def test_node_ready_unknown_is_node_lost(cluster, controller, evalruns):
    evalruns.create(evalrun_manifest("node", [slow_suite("slow", cases=20, seconds=0.5)]))
    pod, run_id, done = started(controller, evalruns, "node", "slow")

    # Freeze the agent's heartbeats (its pods keep running), so its 10 s status post cannot undo
    # the patch before the controller's scan sees it; then write what the node-lifecycle controller
    # writes when a kubelet stops posting (it would, after its 20 s grace period).
    cluster.node_pause()
    try:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        evalruns.core.patch_node_status(cluster.node_name, {"status": {"conditions": [{
            "type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
            "message": "Kubelet stopped posting node status.", "lastHeartbeatTime": now, "lastTransitionTime": now}]}})
        lost_at = time.monotonic()
        _, at = controller.wait_terminal(run_id)
        row = assert_terminated(controller, evalruns, "node", "slow", run_id, "node_lost", done,
                                latency_s=at - lost_at)
        assert f"node {cluster.node_name} is unreachable" in row["error"], row["error"]
    finally:
        cluster.node_resume()  # the agent posts Ready at once; later tests need the node
        wait_for("the node to be Ready again", lambda: _node_ready(evalruns.core, cluster.node_name), timeout=40)
    # The runner process outlived the verdict; its writes were fenced and it stopped on its own.
    evalruns.wait_pod_phase(pod.metadata.name, ("Failed", "Succeeded"))
    assert controller.run(run_id)["cause"] == "node_lost"


def test_job_deadline_is_deadline_exceeded(controller, evalruns):
    # c0 completes in 0.8 s; c1-c3 hang until their 1 s timeout. The run needs its start-up + 3.8 s,
    # the Job's activeDeadlineSeconds is 1 s x 4 cases + 0 grace, counted from before the pod exists.
    evalruns.create(evalrun_manifest("late", [target_suite("slow", "slow", [0.8, 30, 30, 30], "done", timeout=1)],
                                     deadlineGraceSeconds=0))
    pod = evalruns.running_pod("late", "slow")
    run_id = pod.metadata.annotations[RUN_ID]
    job = evalruns.job("late-slow-1")
    assert job.spec.active_deadline_seconds == 4
    dying_at = evalruns.wait_pod_dying(pod.metadata.name, timeout=30)
    _, at = controller.wait_terminal(run_id)

    row = assert_terminated(controller, evalruns, "late", "slow", run_id, "deadline_exceeded", {"c0"},
                            latency_s=at - dying_at)
    assert "deadline" in row["error"].lower()
    timed_out = [c for c in controller.cases(run_id) if c["cause"] == "case_timeout"]
    assert timed_out, "the cases that timed out before the deadline were lost"


def test_unschedulable_pod_beyond_its_start_timeout_is_never_started(controller, evalruns):
    evalruns.create(evalrun_manifest("big", [slow_suite("slow", cases=2, seconds=0.1)],
                                     resources={"requests": {"memory": "1000Gi"}}, startTimeoutSeconds=3))
    pod = evalruns.any_pod("big", "slow")
    run_id = pod.metadata.annotations[RUN_ID]
    assert pod.status.phase == "Pending"
    created = pod.metadata.creation_timestamp
    row = wait_for("the attempt's row", lambda: controller.run(run_id), timeout=20, interval=0.05)
    waited = (datetime.now(UTC) - created).total_seconds()
    assert 3 <= waited < 3 + TERMINAL_WITHIN_S + 1, waited  # creationTimestamp has 1 s resolution

    assert_terminated(controller, evalruns, "big", "slow", run_id, "never_started", set())
    assert row["attempt"] == 1 and row["passed"] == 0 and "unschedulable" in row["error"], row
    # The Job is deleted so that it cannot start late and open a zombie run.
    wait_for("the Job to be deleted", lambda: evalruns.job("big-slow-1") is None, timeout=20)
    assert evalruns.status("big")["phase"] == "Failed"


def test_container_restart_is_container_restarted(controller, evalruns):
    evalruns.create(evalrun_manifest("restart", [slow_suite("slow", cases=20, seconds=0.5)]))
    pod, run_id, done = started(controller, evalruns, "restart", "slow")

    # What a kubelet reports after restarting the container in place.
    current = evalruns.core.api_client.sanitize_for_serialization(
        evalruns.core.read_namespaced_pod(pod.metadata.name, evalruns.namespace))
    statuses = current["status"]["containerStatuses"]
    statuses[0]["restartCount"] = 1
    evalruns.core.patch_namespaced_pod_status(pod.metadata.name, evalruns.namespace,
                                              {"status": {"containerStatuses": statuses}})
    restarted_at = time.monotonic()
    _, at = controller.wait_terminal(run_id)

    row = assert_terminated(controller, evalruns, "restart", "slow", run_id, "container_restarted", done,
                            latency_s=at - restarted_at)
    assert "restartCount=1" in row["error"], row["error"]


# ---------------------------------------------------------------- operator restart


def test_runner_killed_while_the_operator_is_down_is_terminated_on_restart(cluster, controller, evalruns, tmp_path):
    evalruns.create(evalrun_manifest("down", [slow_suite("slow", cases=20, seconds=0.5)]))
    pod, run_id, done = started(controller, evalruns, "down", "slow")

    controller.stop()
    os.killpg(cluster.pod_pid(evalruns.namespace, pod.metadata.name), signal.SIGKILL)
    evalruns.wait_pod_phase(pod.metadata.name, ("Failed",))

    controller.start()
    restarted_at = time.monotonic()
    _, at = controller.wait_terminal(run_id)
    assert_terminated(controller, evalruns, "down", "slow", run_id, "killed", done, latency_s=at - restarted_at)

    # A second operator on the same database: the DuckDB lock is the leader lock. It exits at once,
    # naming the holder.
    (tmp_path / "second").mkdir()
    second = ControllerProcess(cluster.kubeconfig, evalruns.namespace, tmp_path / "second", db=controller.db)
    began = time.monotonic()
    second.start(wait=False)
    code = second.proc.wait(timeout=20)
    assert code != 0 and time.monotonic() - began < 10
    assert f"in use by process {controller.proc.pid}" in second.logs(), second.logs()[-2000:]
    assert controller.healthy()


# ---------------------------------------------------------------- runbook case 2


def test_failed_final_write_is_completed_from_the_runner_summary(controller, evalruns):
    evalruns.create(evalrun_manifest("case2", [slow_suite("slow", cases=3, seconds=0.1)],
                                     env=[{"name": "EVALRUNNER_FAULTS", "value": "suite_status_write=*"}]))
    pod = evalruns.any_pod("case2", "slow")
    run_id = pod.metadata.annotations[RUN_ID]
    dead = evalruns.wait_pod_phase(pod.metadata.name, ("Failed",))
    died_at = time.monotonic()
    terminated = dead.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 3, terminated  # the run could not be recorded
    assert run_id in (terminated.message or ""), terminated.message  # the summary, as the termination message
    row, at = controller.wait_terminal(run_id)
    assert at - died_at < TERMINAL_WITHIN_S

    assert row["status"] == "completed" and row["cause"] is None, row
    assert "runner summary" in row["terminated_by"], row
    assert (row["passed"], row["failed"], row["errored"]) == (3, 0, 0)
    assert {c["status"] for c in controller.cases(run_id)} == {"completed"}
    assert evalruns.wait_phase("case2", ("Succeeded", "Failed"), timeout=10)["phase"] == "Succeeded"
    wait_for("a RunTerminated Event from the summary",
             lambda: [m for r, m in evalruns.events("case2") if r == "RunTerminated" and run_id in m
                      and "from the runner's summary" in m], timeout=10)
    logged = [e for e in controller.events("eval.run_terminated") if e["run_id"] == run_id]
    assert logged and logged[0]["status"] == "completed" and "runner summary" in logged[0]["terminated_by"]


# ---------------------------------------------------------------- retries and concurrency policies


def test_retry_resumes_from_the_completed_cases(cluster, controller, evalruns):
    evalruns.create(evalrun_manifest("retry", [slow_suite("slow", cases=8, seconds=0.3)], retries=1))
    pod, first_id, done = started(controller, evalruns, "retry", "slow")
    os.killpg(cluster.pod_pid(evalruns.namespace, pod.metadata.name), signal.SIGKILL)
    controller.wait_terminal(first_id)
    done = controller.completed_cases(first_id)  # a case may have completed just before the kill
    assert len(done) >= 2

    status = evalruns.wait_phase("retry", ("Succeeded", "Failed"), timeout=60)
    assert status["phase"] == "Succeeded", status
    entry = status["suites"][0]
    assert entry["attempt"] == 2 and entry["runId"] != first_id and entry["passed"] == 8, entry
    first, second = controller.run(first_id), controller.run(entry["runId"])
    assert (first["status"], first["cause"]) == ("failed", "killed")
    assert (second["status"], second["attempt"], second["parent_run_id"]) == ("completed", 2, first_id)
    cases = {c["name"]: c for c in controller.cases(second["id"])}
    assert len(cases) == 8 and {c["status"] for c in cases.values()} == {"completed"}
    carried = {name for name, c in cases.items() if c["carried_from"]}
    assert carried == done, (carried, done)
    originals = {c["name"]: c for c in controller.cases(first_id)}
    for name in carried:  # carried over from attempt 1, not re-run: the same start time
        assert cases[name]["carried_from"] == originals[name]["id"]
        assert cases[name]["started_at"] == originals[name]["started_at"]
    reasons = [r for r, _ in evalruns.events("retry")]
    assert "Retrying" in reasons and "RunTerminated" in reasons


def _first_running(controller, evalruns, name: str) -> str:
    _, run_id, _ = started(controller, evalruns, name, "shared", completed=1)
    return run_id


def test_forbid_refuses_a_second_run_of_a_live_suite(controller, evalruns):
    evalruns.create(evalrun_manifest("first", [slow_suite("shared", cases=6, seconds=0.5)]))
    first_id = _first_running(controller, evalruns, "first")
    evalruns.create(evalrun_manifest("second", [slow_suite("shared", cases=2, seconds=0.1)],
                                     concurrencyPolicy="Forbid"))

    status = evalruns.wait_phase("second", ("Failed", "Succeeded"), timeout=20)
    entry = status["suites"][0]
    assert status["phase"] == "Failed" and entry["message"].startswith("refused:") and first_id in entry["message"]
    assert "runId" not in entry and evalruns.job("second-shared-1") is None
    assert any(r == "Refused" and "Forbid" in m for r, m in evalruns.events("second"))
    assert evalruns.wait_phase("first", ("Failed", "Succeeded"), timeout=30)["phase"] == "Succeeded"
    assert controller.run(first_id)["status"] == "completed"


def test_replace_terminates_the_live_run_and_deletes_its_pod(controller, evalruns):
    evalruns.create(evalrun_manifest("first", [slow_suite("shared", cases=20, seconds=0.5)]))
    pod, first_id, done = started(controller, evalruns, "first", "shared", completed=1)
    evalruns.create(evalrun_manifest("second", [slow_suite("shared", cases=2, seconds=0.1)],
                                     concurrencyPolicy="Replace"))

    row, _ = controller.wait_terminal(first_id, timeout=20)
    assert (row["status"], row["cause"]) == ("failed", "replaced") and "second" in row["error"], row
    assert done <= controller.completed_cases(first_id)
    wait_for("the replaced run's pod to be gone", lambda: evalruns.pod(pod.metadata.name) is None, timeout=30)
    first = evalruns.wait_phase("first", ("Failed", "Succeeded"), timeout=20)
    assert first["phase"] == "Failed" and first["suites"][0]["cause"] == "replaced"
    second = evalruns.wait_phase("second", ("Failed", "Succeeded"), timeout=30)
    assert second["phase"] == "Succeeded", second
    assert any(r == "Replaced" and first_id in m for r, m in evalruns.events("second"))
    assert controller.run(first_id)["cause"] == "replaced"  # the replaced runner's late writes were fenced


def test_allow_runs_both(controller, evalruns):
    evalruns.create(evalrun_manifest("first", [slow_suite("shared", cases=12, seconds=0.3)],
                                     concurrencyPolicy="Allow"))
    first_id = _first_running(controller, evalruns, "first")
    evalruns.create(evalrun_manifest("second", [slow_suite("shared", cases=3, seconds=0.1)],
                                     concurrencyPolicy="Allow"))

    second = evalruns.wait_phase("second", ("Failed", "Succeeded"), timeout=30)
    assert second["phase"] == "Succeeded", second
    assert evalruns.wait_phase("first", ("Failed", "Succeeded"), timeout=30)["phase"] == "Succeeded"
    first_row, second_row = controller.run(first_id), controller.run(second["suites"][0]["runId"])
    assert second_row["started_at"] < first_row["completed_at"], "the two runs should have overlapped"
    assert not any(r in ("Refused", "Replaced") for r, _ in evalruns.events("second"))


def test_a_stale_row_never_blocks_a_forbid_run(cluster, controller, evalruns):
    evalruns.create(evalrun_manifest("first", [slow_suite("shared", cases=20, seconds=0.5)]))
    pod, first_id, _ = started(controller, evalruns, "first", "shared", completed=1)
    controller.stop()
    os.killpg(cluster.pod_pid(evalruns.namespace, pod.metadata.name), signal.SIGKILL)
    evalruns.wait_pod_phase(pod.metadata.name, ("Failed",))

    controller.start()
    evalruns.create(evalrun_manifest("second", [slow_suite("shared", cases=2, seconds=0.1)],
                                     concurrencyPolicy="Forbid"))
    second = evalruns.wait_phase("second", ("Failed", "Succeeded"), timeout=30)
    assert second["phase"] == "Succeeded", second
    assert (controller.run(first_id)["status"], controller.run(first_id)["cause"]) == ("failed", "killed")
    assert not any(r == "Refused" for r, _ in evalruns.events("second"))


# ---------------------------------------------------------------- what a restart must pick up


def test_a_pod_deleted_while_pending_with_the_controller_down_gets_a_new_attempt(controller, evalruns):
    """No row, no pod, a Failed Job: on restart the suite gets its next attempt instead of staying Pending."""
    evalruns.create(evalrun_manifest("pend", [slow_suite("slow", cases=2, seconds=0.1)], retries=1,
                                     resources={"requests": {"memory": "1000Gi"}}))  # unschedulable: Pending
    pod = evalruns.any_pod("pend", "slow")
    run_id = pod.metadata.annotations[RUN_ID]
    controller.stop()
    evalruns.core.delete_namespaced_pod(pod.metadata.name, evalruns.namespace)
    wait_for("the Job to count the vanished pod as failed", lambda: any(
        c.type == "Failed" and c.status == "True" for c in (evalruns.job("pend-slow-1").status.conditions or [])),
        timeout=30)

    controller.start()
    row = wait_for("the vanished attempt's row", lambda: controller.run(run_id), timeout=20, interval=0.1)
    assert (row["status"], row["cause"]) == ("failed", "pod_deleted"), row
    wait_for("attempt 2's Job", lambda: evalruns.job("pend-slow-2"), timeout=20)
    entry = wait_for("the status to show attempt 1's cause",
                     lambda: (s := evalruns.suite("pend", "slow")).get("cause") == "pod_deleted" and s, timeout=20)
    assert entry["phase"] == "Running", entry  # retrying (attempt 2 is unschedulable too, and still Pending)


def test_status_keeps_no_stale_field_and_is_not_rewritten_when_nothing_changed(controller, evalruns):
    evalruns.create(evalrun_manifest("tidy", [slow_suite("first", cases=2, seconds=0.1)]))
    assert evalruns.wait_phase("tidy", ("Succeeded", "Failed"))["phase"] == "Succeeded"
    assert "completedAt" in evalruns.status("tidy")

    def patches() -> int:
        return sum(1 for e in controller.events("controller.status_patched") if e["evalrun"].endswith("/tidy"))

    settled = wait_for("the status to settle", lambda: (n := patches()) == patches() and n, timeout=10)
    for i in range(3):  # events that change nothing the status says: no patch
        evalruns.custom.patch_namespaced_custom_object(
            "evals.workshop.dev", "v1alpha1", evalruns.namespace, "evalruns", "tidy",
            {"metadata": {"annotations": {"touched": str(i)}}})
    time.sleep(2)  # several refresh rounds
    assert patches() == settled, "a patch that changes nothing was sent"

    body = evalruns.get("tidy")
    body["spec"]["suites"].append(slow_suite("added", cases=2, seconds=0.1))
    evalruns.custom.replace_namespaced_custom_object(
        "evals.workshop.dev", "v1alpha1", evalruns.namespace, "evalruns", "tidy", body)
    running = wait_for("the added suite to reopen the EvalRun",
                       lambda: (st := evalruns.status("tidy")).get("observedGeneration") == 2 and st, timeout=20)
    assert running["phase"] in ("Pending", "Running") and "completedAt" not in running, running
    done = evalruns.wait_phase("tidy", ("Succeeded", "Failed"))
    assert done["phase"] == "Succeeded" and done["progress"] == "2/2", done
