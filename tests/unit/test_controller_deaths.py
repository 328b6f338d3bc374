"""Runner pod deaths -> closed rows, with a fake Kubernetes API, a real in-memory store and a fixed clock."""

from __future__ import annotations

from datetime import timedelta

from controller_fakes import NAMESPACE, suite, terminated, ts

from evalrunner.controller import builders


def dead(pod: dict, exit_code: int, at, **metadata) -> dict:
    return {**pod, "metadata": {**pod["metadata"], **metadata},
            "status": {"phase": "Failed", "containerStatuses": [
                {"name": "runner", "state": terminated(exit_code, at), "restartCount": 0}]}}


def test_a_killed_runner_closes_its_row_and_cases_at_once(world):
    world.created(world.kube.add_evalrun("er", [suite("s", cases=3)]))
    pod, run = world.started_pod("er", "s")
    world.runner_reports(run, completed=("c0",), running=("c1", "c2"))
    world.controller.on_runner_pod_event(dead(pod, 137, world.clock.now), "MODIFIED")

    row = world.store.get_run(run.id)
    assert (row.status, row.cause, row.terminated_by) == ("failed", "killed", "controller")
    assert {c.name: (c.status, c.cause) for c in world.store.cases(run.id)} == {
        "c0": ("completed", None), "c1": ("failed", "killed"), "c2": ("failed", "killed")}
    assert [(e.reason, run.id in e.message and "killed" in e.message) for e in world.kube.events
            if e.reason == "RunTerminated"] == [("RunTerminated", True)]
    world.settle()
    assert world.kube.suite_status("er", "s")["cause"] == "killed"


def test_a_pod_deletion_seen_only_in_its_last_event_is_pod_deleted(world):
    """Item 3: `kubectl delete pod`; the runner exited 143; the controller saw just the DELETED event,
    whose deletion time is that of the kubelet's final forced delete."""
    world.created(world.kube.add_evalrun("er", [suite("s")], retries=1))
    pod, run = world.started_pod("er", "s")
    gone = dead(pod, 143, world.clock.now - timedelta(seconds=0.5), deletionTimestamp=ts(world.clock.now),
                deletionGracePeriodSeconds=0)
    world.kube.delete_pod(NAMESPACE, pod["metadata"]["name"])
    world.controller.on_runner_pod_event(gone, "DELETED")
    row = world.store.get_run(run.id)
    assert (row.status, row.cause) == ("failed", "pod_deleted"), row.error


def test_a_runner_of_a_200_character_evalrun_that_dies_before_opening_its_row(world):
    """Item 5: the pod names its EvalRun in full, so the attempt is recorded and the status shows it."""
    name = "e" * 200
    world.created(world.kube.add_evalrun(name, [suite("s")]))
    job = world.job(name, "s")
    assert job["metadata"]["labels"][builders.LABEL_EVALRUN] != name  # the label had to be cut
    pod = world.kube.pod_of(job, "Failed", terminated(1, world.clock.now))
    world.controller.on_runner_pod_event(pod, "MODIFIED")
    run_id = job["metadata"]["annotations"][builders.ANNOTATION_RUN_ID]
    row = world.store.get_run(run_id)
    assert row is not None and (row.status, row.cause) == ("failed", "error")
    assert row.scope.name == name
    world.settle()
    entry = world.kube.suite_status(name, "s")
    assert (entry["phase"], entry["cause"], entry["runId"]) == ("Failed", "error", run_id)
    assert world.kube.status(name)["phase"] == "Failed"


def test_a_pod_that_never_starts_fails_its_attempt_and_loses_its_job(world):
    world.created(world.kube.add_evalrun("er", [suite("s")], startTimeoutSeconds=5))
    job = world.job("er", "s")
    pod = world.kube.pod_of(job, "Pending", {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}})
    world.controller.scan()
    assert world.store.get_run(job["metadata"]["annotations"][builders.ANNOTATION_RUN_ID]) is None  # too young
    world.clock.advance(6)
    world.controller.scan()
    row = world.store.get_run(job["metadata"]["annotations"][builders.ANNOTATION_RUN_ID])
    assert (row.status, row.cause) == ("failed", "never_started") and "ImagePullBackOff" in row.error
    assert world.job("er", "s") is None, "a Job left behind could start late and open a zombie run"
    assert world.kube.get_pod(NAMESPACE, pod["metadata"]["name"]) is None


def test_a_closed_row_is_never_reclassified(world):
    world.created(world.kube.add_evalrun("er", [suite("s")]))
    pod, run = world.started_pod("er", "s")
    world.runner_finishes(run)
    world.controller.on_runner_pod_event(dead(pod, 137, world.clock.now), "MODIFIED")
    row = world.store.get_run(run.id)
    assert (row.status, row.cause, row.terminated_by) == ("completed", None, "runner")
    assert "RunTerminated" not in world.kube.reasons("er")


def test_a_runner_that_lost_its_final_write_is_completed_from_its_summary(world):
    """Runbook case 2 in a pod: the runner left its summary as the termination message."""
    from evalrunner.summary import RunSummary

    world.created(world.kube.add_evalrun("er", [suite("s")]))
    pod, run = world.started_pod("er", "s")
    world.runner_reports(run, completed=("c0", "c1"))
    message = RunSummary(run.id, "s", "completed", None, None, 2, 0, 0, write_error="IOException: disk full").to_json()
    exited = dead(pod, 0, world.clock.now)
    exited["status"]["phase"] = "Succeeded"
    exited["status"]["containerStatuses"][0]["state"]["terminated"].update(message=message, reason="Completed")
    world.controller.on_runner_pod_event(exited, "MODIFIED")
    row = world.store.get_run(run.id)
    assert (row.status, row.passed, row.terminated_by) == ("completed", 2, "controller (runner summary)")
