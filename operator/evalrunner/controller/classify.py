"""Why did a runner pod die? A pure function from (pod, node, Job) to one `Cause`.

The controller calls `classify_pod_death` on every event of a runner pod (and
when it re-lists). `None` means the pod may still be fine; a `Death` names
the cause that the run's row gets if it is still `running`. Terminating the
row is a compare-and-set fenced by the attempt, so acting on a death that the
runner also noticed, or on a pod whose process still runs on a partitioned
node, cannot overwrite a state the runner wrote.

The order of the checks is the precedence when a pod shows several signs:

1. the runner container's `terminated.reason == "OOMKilled"` -> oom_killed.
   Exit code 137 alone only says SIGKILL; the kernel's OOM kill is what the
   reason records.
2. the Job's deadline (Job condition `Failed`/`DeadlineExceeded`, pod reason
   `DeadlineExceeded`, or a pod that began to die at or after its Job's
   `startTime + activeDeadlineSeconds`, before the condition shows)
   -> deadline_exceeded. The Job controller deletes the pod, so this must win
   over pod_deleted and over the SIGTERM/SIGKILL exit it causes.
3. disruption: the `DisruptionTarget` condition or pod reason `Evicted`
   -> evicted (eviction API, preemption, kubelet termination), or
   node_lost for `DeletionByTaintManager`/`DeletionByPodGC`.
4. the node: NotReady/Unknown, or gone, while the pod has not finished
   -> node_lost.
5. deletion (`deletionTimestamp`, or the DELETED watch event) of a pod whose
   runner had not already finished -> pod_deleted. A runner that exited by a
   signal (SIGTERM, or SIGKILL at the end of the grace period) died of the
   deletion unless it surely exited first: on a pod whose grace period reads
   0 the kubelet's final, forced delete moved `deletionTimestamp` to its own
   time, and within the second of the request the one-second timestamps
   cannot tell.
6. the runner's exit: 137 or signal 9 -> killed; 143 or signal 15 (asked to
   stop, by no deletion we saw) -> shutdown_requested; other non-zero -> error.
   Exit 0 also yields a Death (cause error, `exit_code` 0): the runner
   closes its run before it exits 0, so if the row is still `running` the
   runner's final write was lost; the controller completes the row from
   `summary` when there is one, and otherwise fails it with this cause.
7. a running container with `restartCount > 0` -> container_restarted (the
   process that owned the row is gone).
8. never started: `Failed` without the runner ever running (kubelet
   admission), or `Pending` beyond `start_timeout_s` with an image or
   container-config error or unschedulable -> never_started.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ..models import Cause
from ..summary import RunSummary
from .builders import CONTAINER_NAME

SIGKILL_EXIT = 137
SIGTERM_EXIT = 143
FINISHED_PHASES = ("Succeeded", "Failed")
# Waiting reasons that do not resolve by themselves (a slow pull shows
# ContainerCreating, which may legitimately last).
NOT_STARTING_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
NODE_LOST_DISRUPTIONS = frozenset({"DeletionByTaintManager", "DeletionByPodGC"})
SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV", 15: "SIGTERM"}

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Death:
    """How a runner pod ended, or is ending.

    `reason` is one line for the row's error, the Event and the EvalRun
    status. `terminal` means the pod has finished (or its object is gone), so
    it will report nothing more; when False the pod is still being torn down
    or is stuck, and the controller should delete its Job (the attempt fence
    keeps a still-running process from writing). `summary` is the runner's
    own account, from its termination message, when it left one.
    """

    cause: Cause
    reason: str
    terminal: bool
    summary: RunSummary | None = None
    exit_code: int | None = None


def classify_pod_death(
    pod: Obj,
    node: Obj | None = None,
    job: Obj | None = None,
    now: datetime | None = None,
    start_timeout_s: float = 120,
    *,
    deleted: bool = False,
    node_gone: bool = False,
) -> Death | None:
    """The cause of a runner pod's death, or None while it may still be fine.

    `node` is the pod's Node when the caller looked it up; pass
    `node_gone=True` when the pod names a node that no longer exists (None
    alone means "not looked up"). `deleted` is true for a DELETED watch event.
    `now` is injectable for tests.
    """
    now = now or datetime.now(UTC)
    status = pod.get("status") or {}
    container = runner_container_status(pod)
    terminated = _state(container, "terminated")
    finished = status.get("phase") in FINISHED_PHASES or bool(terminated)

    exit_code = terminated.get("exitCode") if terminated else None

    def death(cause: Cause, reason: str) -> Death:
        return Death(cause, reason, finished or deleted, runner_summary(container), exit_code)

    if terminated and terminated.get("reason") == "OOMKilled":
        return death(Cause.OOM_KILLED, _oom_reason(pod, exit_code))

    if reason := _deadline_exceeded(pod, job, _dying_since(pod, terminated, now, deleted)):
        return death(Cause.DEADLINE_EXCEEDED, reason)

    if disruption := _disruption(pod):
        return death(*disruption)

    if not finished and (reason := _node_lost(pod, node, node_gone)):
        return death(Cause.NODE_LOST, reason)

    if (deleted or _deleting(pod)) and not _finished_before_deletion(pod, terminated):
        return death(Cause.POD_DELETED, "pod deleted while the runner was running")

    if terminated:
        return death(*_exit_cause(terminated))

    if (restarts := (container or {}).get("restartCount") or 0) > 0:
        return death(Cause.CONTAINER_RESTARTED, _restart_reason(container, restarts))

    if status.get("phase") == "Failed":
        # Failed with no runner exit: the kubelet refused the pod (OutOfcpu, NodeAffinity, ...).
        detail = ": ".join(part for part in (status.get("reason"), status.get("message")) if part) or "Failed"
        return death(Cause.NEVER_STARTED, f"pod failed before the runner started: {detail}")

    if status.get("phase") in (None, "Pending") and (reason := _not_starting(pod, container, now, start_timeout_s)):
        return death(Cause.NEVER_STARTED, reason)

    return None


# ---------------------------------------------------------------- pieces


def runner_container_status(pod: Obj) -> Obj | None:
    """The status of the runner container (by name, else the first container)."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    named = [s for s in statuses if s.get("name") == CONTAINER_NAME]
    return (named or statuses or [None])[0]


def runner_summary(container: Obj | None) -> RunSummary | None:
    """The RunSummary the runner left as its termination message (this or the previous container)."""
    for state_key in ("state", "lastState"):
        terminated = ((container or {}).get(state_key) or {}).get("terminated") or {}
        message = terminated.get("message")
        if message and (summary := RunSummary.from_json(message.strip())):
            return summary
    return None


def _state(container: Obj | None, name: str) -> Obj:
    return ((container or {}).get("state") or {}).get(name) or {}


def _deleting(pod: Obj) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def _condition(obj: Obj | None, kind: str) -> Obj | None:
    for condition in ((obj or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return None


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _oom_reason(pod: Obj, exit_code: int | None) -> str:
    limit = None
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == CONTAINER_NAME:
            limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    suffix = f" of {limit}" if limit else ""
    return f"runner OOMKilled (exit {exit_code}): it exceeded its memory limit{suffix}"


def _dying_since(pod: Obj, terminated: Obj, now: datetime, deleted: bool) -> datetime | None:
    """When the pod began to die: its deletion request or its runner's exit, whichever came first.

    None for a pod that is neither deleting nor finished. Judged by these
    times, not by `now`, so a re-list long after a death classifies it the same.
    """
    meta = pod.get("metadata") or {}
    times = [parse_time(terminated.get("finishedAt")) if terminated else None]
    if deletion := parse_time(meta.get("deletionTimestamp")):
        times.append(deletion - timedelta(seconds=meta.get("deletionGracePeriodSeconds") or 0))
    known = [t for t in times if t is not None]
    if known:
        return min(known)
    return now if deleted else None


def _deadline_exceeded(pod: Obj, job: Obj | None, dying_since: datetime | None) -> str | None:
    failed = _condition(job, "Failed")
    if failed and failed.get("status") == "True" and failed.get("reason") == "DeadlineExceeded":
        return f"Job deadline exceeded: {failed.get('message') or 'activeDeadlineSeconds reached'}"
    status = pod.get("status") or {}
    if status.get("reason") == "DeadlineExceeded":
        return f"pod deadline exceeded: {status.get('message') or 'activeDeadlineSeconds reached'}"
    # The Job controller deletes the pod before (or as) the Job's condition
    # appears; a pod that began to die at or after its Job's deadline died of it.
    deadline_s = ((job or {}).get("spec") or {}).get("activeDeadlineSeconds")
    started = parse_time(((job or {}).get("status") or {}).get("startTime"))
    if (
        dying_since is not None
        and deadline_s is not None
        and started is not None
        and dying_since >= started + timedelta(seconds=deadline_s)
    ):
        return f"Job deadline exceeded: activeDeadlineSeconds={deadline_s} since {started.isoformat()}"
    return None


def _disruption(pod: Obj) -> tuple[Cause, str] | None:
    condition = _condition(pod, "DisruptionTarget")
    if condition and condition.get("status") == "True":
        why = condition.get("reason") or "DisruptionTarget"
        detail = f"{why}: {condition.get('message')}" if condition.get("message") else why
        if why in NODE_LOST_DISRUPTIONS:
            return Cause.NODE_LOST, f"pod removed from a lost node: {detail}"
        return Cause.EVICTED, f"pod evicted: {detail}"
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        return Cause.EVICTED, f"pod evicted: {status.get('message') or 'Evicted'}"
    if status.get("reason") == "NodeLost" or status.get("phase") == "Unknown":
        detail = status.get("message") or status.get("reason") or "phase Unknown"
        return Cause.NODE_LOST, f"pod lost with its node: {detail}"
    return None


def _node_lost(pod: Obj, node: Obj | None, node_gone: bool) -> str | None:
    node_name = (pod.get("spec") or {}).get("nodeName")
    if not node_name:
        return None
    if node_gone:
        return f"node {node_name} is gone"
    if node is None:
        return None
    ready = _condition(node, "Ready")
    if ready is None or ready.get("status") == "True":
        return None
    since = f" since {ready['lastTransitionTime']}" if ready.get("lastTransitionTime") else ""
    state = "NotReady" if ready.get("status") == "False" else "unreachable (Ready Unknown)"
    return f"node {node_name} is {state}{since}"


def _finished_before_deletion(pod: Obj, terminated: Obj) -> bool:
    """Whether the runner had already exited when someone asked to delete the pod.

    A pod deleted after its runner died (TTL, garbage collection of a
    finished Job) died of whatever ended the runner, not of the deletion.
    """
    if not terminated:
        return False
    meta = pod.get("metadata") or {}
    deletion = parse_time(meta.get("deletionTimestamp"))
    if deletion is None:
        # A DELETED event without a deletion time: the runner's exit is all we know.
        return (pod.get("status") or {}).get("phase") in FINISHED_PHASES
    grace = meta.get("deletionGracePeriodSeconds") or 0
    finished_at = parse_time(terminated.get("finishedAt"))
    requested = deletion - timedelta(seconds=grace)
    if finished_at is None:
        return False
    if _stopped_by_signal(terminated):
        # Stopped by a signal: the deletion's doing unless it surely came first. Not on a pod whose
        # grace reads 0 (the kubelet's final forced delete hides when the deletion was asked for),
        # nor in the same second as the request (API timestamps have one-second resolution).
        return grace != 0 and finished_at < requested
    return finished_at <= requested


def _stopped_by_signal(terminated: Obj) -> bool:
    return terminated.get("exitCode") in (SIGKILL_EXIT, SIGTERM_EXIT) or terminated.get("signal") in (9, 15)


def _exit_cause(terminated: Obj) -> tuple[Cause, str]:
    code = terminated.get("exitCode")
    signal = terminated.get("signal")
    label = terminated.get("reason") or "Terminated"
    if code == SIGKILL_EXIT or signal == 9:
        return Cause.KILLED, f"runner killed by SIGKILL (exit {code}, {label}), not by the OOM killer"
    if code == SIGTERM_EXIT or signal == 15:
        return Cause.SHUTDOWN_REQUESTED, f"runner stopped by SIGTERM (exit {code}, {label})"
    if code == 0:
        return Cause.ERROR_EXIT, "runner exited 0 without closing its run"
    return Cause.ERROR_EXIT, f"runner exited with code {code}{_signal_note(code, signal)} ({label})"


def _signal_note(code: int | None, signal: int | None) -> str:
    number = signal or (code - 128 if code is not None and 128 < code < 160 else None)
    if number is None:
        return ""
    return f", signal {SIGNAL_NAMES.get(number, number)}"


def _restart_reason(container: Obj, restarts: int) -> str:
    last = ((container.get("lastState") or {}).get("terminated")) or {}
    if last:
        return (
            f"runner container restarted (restartCount={restarts}; previous exit "
            f"{last.get('exitCode')} {last.get('reason') or ''})".replace(" )", ")")
        )
    return f"runner container restarted (restartCount={restarts})"


def _not_starting(pod: Obj, container: Obj | None, now: datetime, start_timeout_s: float) -> str | None:
    created = parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
    if created is None or (now - created).total_seconds() < start_timeout_s:
        return None
    waited = int((now - created).total_seconds())
    waiting = _state(container, "waiting")
    if waiting.get("reason") in NOT_STARTING_REASONS:
        detail = f": {waiting['message']}" if waiting.get("message") else ""
        return f"runner not started after {waited}s: {waiting['reason']}{detail}"
    scheduled = _condition(pod, "PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        detail = f": {scheduled['message']}" if scheduled.get("message") else ""
        return f"pod unschedulable for {waited}s{detail}"
    return None
