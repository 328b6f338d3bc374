"""classify_pod_death: one test per cause, the "still fine" cases, precedence, and the runner's summary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from evalrunner.controller.classify import Death, classify_pod_death, parse_time
from evalrunner.models import Cause
from evalrunner.summary import RunSummary

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def ts(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(
    phase: str = "Running",
    state: dict[str, Any] | None = None,
    *,
    age_s: float = 30,
    node: str | None = "node-0",
    restarts: int = 0,
    last_state: dict[str, Any] | None = None,
    reason: str | None = None,
    message: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
    deletion_ago_s: float | None = None,
    grace_s: int = 30,
    memory_limit: str | None = None,
) -> dict[str, Any]:
    container_spec: dict[str, Any] = {"name": "runner", "image": "evalrunner:0.1.0"}
    if memory_limit:
        container_spec["resources"] = {"limits": {"memory": memory_limit}}
    metadata: dict[str, Any] = {"name": "nightly-qa-1-abcde", "namespace": "evals", "creationTimestamp": ts(age_s)}
    if deletion_ago_s is not None:
        # deletionTimestamp is the request time plus the grace period
        metadata["deletionTimestamp"] = ts(deletion_ago_s - grace_s)
        metadata["deletionGracePeriodSeconds"] = grace_s
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if state is not None:
        status["containerStatuses"] = [
            {"name": "runner", "state": state, "lastState": last_state or {}, "restartCount": restarts}
        ]
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    spec: dict[str, Any] = {"containers": [container_spec]}
    if node:
        spec["nodeName"] = node
    return {"metadata": metadata, "spec": spec, "status": status}


RUNNING = {"running": {"startedAt": ts(20)}}


def terminated(exit_code: int, reason: str = "Error", finished_ago_s: float = 1, **extra: Any) -> dict[str, Any]:
    return {
        "terminated": {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": ts(20),
            "finishedAt": ts(finished_ago_s),
            **extra,
        }
    }


def node(ready: str = "True") -> dict[str, Any]:
    return {
        "metadata": {"name": "node-0"},
        "status": {"conditions": [{"type": "Ready", "status": ready, "lastTransitionTime": ts(45)}]},
    }


def job(*, failed_reason: str | None = None, deadline_s: int | None = None, started_ago_s: float = 100) -> dict:
    out: dict[str, Any] = {"spec": {}, "status": {"startTime": ts(started_ago_s), "conditions": []}}
    if deadline_s is not None:
        out["spec"]["activeDeadlineSeconds"] = deadline_s
    if failed_reason:
        out["status"]["conditions"].append(
            {"type": "Failed", "status": "True", "reason": failed_reason, "message": "Job was active too long"}
        )
    return out


def classify(p: dict[str, Any], **kw: Any) -> Death | None:
    return classify_pod_death(p, now=NOW, **kw)


def summary(**overrides: Any) -> RunSummary:
    fields = dict(run_id="0f4c2a9e1b2c-qa-a1", suite="qa", status="completed", cause=None, error=None,
                  passed=3, failed=1, errored=0)
    return RunSummary(**{**fields, **overrides})


# ---------------------------------------------------------------- still fine


@pytest.mark.parametrize(
    "p",
    [
        pod("Pending", None, age_s=5),
        pod("Pending", {"waiting": {"reason": "ContainerCreating"}}, age_s=5),
        pod("Pending", {"waiting": {"reason": "ImagePullBackOff"}}, age_s=60),  # within the start timeout
        pod("Pending", {"waiting": {"reason": "ContainerCreating"}}, age_s=600),  # a slow pull is not a failure
        pod("Pending", None, node=None, age_s=60, conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]),
        pod("Running", RUNNING),
    ],
    ids=["new", "creating", "pull-backoff-young", "slow-pull", "unschedulable-young", "running"],
)
def test_a_pod_that_may_still_be_fine_is_not_dead(p):
    assert classify(p, node=node("True")) is None


def test_no_node_lookup_is_not_a_lost_node():
    assert classify(pod("Running", RUNNING)) is None


# ---------------------------------------------------------------- one test per cause


def test_oom_killed():
    death = classify(pod("Failed", terminated(137, "OOMKilled"), memory_limit="64Mi"))
    assert death.cause is Cause.OOM_KILLED
    assert death.terminal and death.exit_code == 137
    assert "64Mi" in death.reason


def test_exit_137_without_oom_reason_is_killed():
    death = classify(pod("Failed", terminated(137, "Error")))
    assert death.cause is Cause.KILLED
    assert "SIGKILL" in death.reason and "not by the OOM killer" in death.reason


def test_signal_9_is_killed():
    assert classify(pod("Failed", terminated(0, "Error", signal=9))).cause is Cause.KILLED


@pytest.mark.parametrize(("code", "fragment"), [(1, "code 1 (Error)"), (2, "code 2"), (134, "signal SIGABRT")])
def test_non_zero_exit_is_error(code, fragment):
    death = classify(pod("Failed", terminated(code)))
    assert death.cause is Cause.ERROR_EXIT
    assert death.cause.value == "error"
    assert fragment in death.reason
    assert death.exit_code == code


def test_clean_exit_is_a_death_only_if_the_row_is_still_running():
    death = classify(pod("Succeeded", terminated(0, "Completed")))
    assert death.cause is Cause.ERROR_EXIT
    assert death.exit_code == 0 and death.terminal
    assert "exited 0 without closing its run" in death.reason


def test_container_restarted():
    last = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    death = classify(pod("Running", RUNNING, restarts=1, last_state=last), node=node())
    assert death.cause is Cause.CONTAINER_RESTARTED
    assert not death.terminal
    assert "restartCount=1" in death.reason and "OOMKilled" in death.reason


@pytest.mark.parametrize("reason", ["EvictionByEvictionAPI", "PreemptionByScheduler", "TerminationByKubelet"])
def test_disruption_target_is_evicted(reason):
    condition = {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": "m"}
    death = classify(pod("Running", RUNNING, conditions=[condition], deletion_ago_s=1), node=node())
    assert death.cause is Cause.EVICTED
    assert reason in death.reason
    assert not death.terminal  # still terminating


def test_kubelet_eviction_reason_is_evicted():
    death = classify(pod("Failed", terminated(137), reason="Evicted", message="The node was low on resource: memory."))
    assert death.cause is Cause.EVICTED
    assert "low on resource" in death.reason


def test_taint_manager_deletion_is_node_lost():
    condition = {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}
    death = classify(pod("Running", RUNNING, conditions=[condition], deletion_ago_s=1))
    assert death.cause is Cause.NODE_LOST


@pytest.mark.parametrize("ready", ["False", "Unknown"])
def test_node_not_ready_is_node_lost(ready):
    death = classify(pod("Running", RUNNING), node=node(ready))
    assert death.cause is Cause.NODE_LOST
    assert "node-0" in death.reason
    assert not death.terminal  # the process may still run behind a partition


def test_node_gone_is_node_lost():
    death = classify(pod("Running", RUNNING), node_gone=True)
    assert death.cause is Cause.NODE_LOST
    assert "gone" in death.reason


def test_pod_phase_unknown_is_node_lost():
    assert classify(pod("Unknown", RUNNING)).cause is Cause.NODE_LOST


def test_finished_pod_on_a_lost_node_keeps_its_exit_cause():
    assert classify(pod("Failed", terminated(1)), node=node("Unknown")).cause is Cause.ERROR_EXIT


def test_deleting_a_running_pod_is_pod_deleted():
    death = classify(pod("Running", RUNNING, deletion_ago_s=1), node=node())
    assert death.cause is Cause.POD_DELETED
    assert not death.terminal


def test_deleted_event_is_pod_deleted_and_terminal():
    death = classify(pod("Running", RUNNING, deletion_ago_s=1), node=node(), deleted=True)
    assert death.cause is Cause.POD_DELETED
    assert death.terminal


def test_runner_killed_by_the_deletion_is_pod_deleted_not_killed():
    # deletion requested 10 s ago; SIGTERM, then SIGKILL after the grace period
    p = pod("Failed", terminated(137, finished_ago_s=2), deletion_ago_s=10)
    assert classify(p, deleted=True).cause is Cause.POD_DELETED


def forcibly_deleted(p: dict[str, Any], ago_s: float) -> dict[str, Any]:
    """The pod as its last (DELETED) event shows it: the kubelet's final delete with grace 0 moved
    deletionTimestamp to its own time and the grace period to 0, hiding when the deletion was asked for."""
    p["metadata"]["deletionTimestamp"] = ts(ago_s)
    p["metadata"]["deletionGracePeriodSeconds"] = 0
    return p


@pytest.mark.parametrize("code", [143, 137])
def test_runner_stopped_by_a_deletion_is_pod_deleted_in_the_last_event_too(code):
    # kubectl delete pod: SIGTERM (the runner exits 143, or is SIGKILLed at the end of the grace
    # period), then the kubelet removes the object. A controller that sees only the DELETED event
    # (kopf keeps the latest event of a busy object) must still call it a deletion, never an error.
    p = forcibly_deleted(pod("Failed", terminated(code, finished_ago_s=1.2)), ago_s=1)
    death = classify(p, deleted=True)
    assert death.cause is Cause.POD_DELETED, death
    assert death.terminal


def test_a_runner_stopped_in_the_second_its_deletion_was_asked_for_died_of_it():
    # API timestamps have one-second resolution: asked at 10.2 s, exited (SIGTERM) at 10.8 s, both read "10".
    p = pod("Failed", terminated(143, finished_ago_s=40), deletion_ago_s=40)
    assert classify(p, deleted=True).cause is Cause.POD_DELETED
    # A runner that exited by itself in that second finished first.
    p = pod("Failed", terminated(1, finished_ago_s=40), deletion_ago_s=40)
    assert classify(p, deleted=True).cause is Cause.ERROR_EXIT


def test_sigterm_exit_without_a_deletion_is_a_shutdown_not_an_error():
    death = classify(pod("Failed", terminated(143)))
    assert death.cause is Cause.SHUTDOWN_REQUESTED
    assert "SIGTERM" in death.reason


def test_pod_deleted_after_its_runner_died_keeps_the_exit_cause():
    # the runner failed 60 s ago; a TTL or GC deletion came later
    p = pod("Failed", terminated(137, finished_ago_s=60), deletion_ago_s=5)
    assert classify(p, deleted=True).cause is Cause.KILLED
    p = pod("Failed", terminated(1, finished_ago_s=60))
    assert classify(p, deleted=True).cause is Cause.ERROR_EXIT
    # force-deleted long after the runner exited by itself: still the exit's cause
    p = forcibly_deleted(pod("Failed", terminated(1, finished_ago_s=60)), ago_s=1)
    assert classify(p, deleted=True).cause is Cause.ERROR_EXIT


def test_job_deadline_exceeded():
    p = pod("Failed", terminated(143, finished_ago_s=1), deletion_ago_s=3)
    death = classify(p, job=job(failed_reason="DeadlineExceeded"))
    assert death.cause is Cause.DEADLINE_EXCEEDED
    assert "deadline" in death.reason


def test_job_deadline_wins_over_pod_deleted_before_the_condition_appears():
    # the Job controller deleted the pod; the Job's Failed condition is not there yet
    p = pod("Running", RUNNING, deletion_ago_s=1)
    assert classify(p, node=node(), job=job(deadline_s=90, started_ago_s=100)).cause is Cause.DEADLINE_EXCEEDED
    # before the deadline, a deletion is just a deletion
    assert classify(p, node=node(), job=job(deadline_s=900, started_ago_s=100)).cause is Cause.POD_DELETED


def test_a_death_before_the_deadline_is_not_the_deadline_even_when_classified_later():
    # a re-list an hour after the runner failed; the Job's deadline has long passed by now
    p = pod("Failed", terminated(1, finished_ago_s=3600), age_s=3700)
    assert classify(p, job=job(deadline_s=150, started_ago_s=3650)).cause is Cause.ERROR_EXIT
    p = pod("Failed", terminated(1, finished_ago_s=3600), age_s=3700, deletion_ago_s=60)
    assert classify(p, deleted=True, job=job(deadline_s=150, started_ago_s=3650)).cause is Cause.ERROR_EXIT


def test_pod_deadline_reason_is_deadline_exceeded():
    p = pod("Failed", terminated(137), reason="DeadlineExceeded", message="Pod was active too long")
    assert classify(p).cause is Cause.DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    "reason", ["ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError"]
)
def test_not_started_beyond_the_start_timeout_is_never_started(reason):
    p = pod("Pending", {"waiting": {"reason": reason, "message": "detail"}}, age_s=130)
    death = classify(p, start_timeout_s=120)
    assert death.cause is Cause.NEVER_STARTED
    assert reason in death.reason and "detail" in death.reason
    assert not death.terminal
    assert classify(p, start_timeout_s=300) is None


def test_unschedulable_beyond_the_start_timeout_is_never_started():
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}
    death = classify(pod("Pending", None, node=None, age_s=121, conditions=[condition]))
    assert death.cause is Cause.NEVER_STARTED
    assert "unschedulable" in death.reason and "0/1 nodes" in death.reason


def test_kubelet_rejection_is_never_started():
    death = classify(pod("Failed", None, reason="OutOfcpu", message="Node didn't have enough resource: cpu"))
    assert death.cause is Cause.NEVER_STARTED
    assert "OutOfcpu" in death.reason


# ---------------------------------------------------------------- precedence


def test_oom_wins_over_137_deletion_and_deadline():
    p = pod("Failed", terminated(137, "OOMKilled"), deletion_ago_s=1)
    assert classify(p, deleted=True, job=job(failed_reason="DeadlineExceeded")).cause is Cause.OOM_KILLED


def test_eviction_wins_over_deletion_and_exit_code():
    condition = {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
    p = pod("Failed", terminated(143, finished_ago_s=1), conditions=[condition], deletion_ago_s=5)
    assert classify(p, deleted=True).cause is Cause.EVICTED


def test_lost_node_wins_over_deletion():
    assert classify(pod("Running", RUNNING, deletion_ago_s=1), node=node("Unknown")).cause is Cause.NODE_LOST


def test_pending_pod_deleted_is_pod_deleted():
    assert classify(pod("Pending", None, age_s=5, deletion_ago_s=1)).cause is Cause.POD_DELETED


# ---------------------------------------------------------------- the runner's summary


def test_summary_is_read_from_the_termination_message():
    written = summary(status="failed", cause="status_write_failed", write_error="store unreachable")
    death = classify(pod("Failed", terminated(3, message=written.to_json() + "\n")))
    assert death.summary == written
    assert death.cause is Cause.ERROR_EXIT


def test_summary_survives_with_any_cause():
    message = summary().to_json()
    p = pod("Failed", terminated(137, message=message), deletion_ago_s=10)
    death = classify(p, deleted=True)
    assert death.cause is Cause.POD_DELETED
    assert death.summary == summary()


def test_summary_from_the_previous_container_after_a_restart():
    last = {"terminated": {"exitCode": 1, "reason": "Error", "message": summary().to_json()}}
    death = classify(pod("Running", RUNNING, restarts=1, last_state=last), node=node())
    assert death.summary == summary()


@pytest.mark.parametrize(
    "message",
    [
        '{"event": "eval.suite_failed", "run_id": "x", "level": "error"}',  # a JSON log line (FallbackToLogsOnError)
        "Traceback (most recent call last):\n  ...",
        "",
    ],
)
def test_anything_else_in_the_message_is_no_summary(message):
    death = classify(pod("Failed", terminated(1, message=message)))
    assert death.summary is None
    assert death.cause is Cause.ERROR_EXIT


def test_parse_time():
    assert parse_time("2026-03-01T12:00:00Z") == NOW
    assert parse_time(None) is None
    assert parse_time("not a time") is None
