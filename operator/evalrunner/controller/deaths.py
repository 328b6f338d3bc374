"""A runner pod changed: if it died, close its run with the classified cause.

The hot path of the operator (runbook case 3, automatic): a pod event comes
in, `classify.classify_pod_death` names the cause, and the run row is closed
through the same store transaction as `evalrunner recover`, before any other
API call. A pod that dies before its runner opened its run gets a row born
`failed`, so the attempt is seen (and retried) like any other.
"""

from __future__ import annotations

from typing import Any, Callable

from .. import log, recovery
from ..models import Cause, EvalRunSpec, EvalRunSuite, RunStatus
from ..owner import Owner
from ..scope import Scope
from ..store.duckdb_store import DuckDBStore, utcnow
from ..store.records import RunRequest, RunRow
from ..timing import START_TIMEOUT_S
from . import status
from .children import RunnerPod
from .classify import Death, classify_pod_death
from .kube import Kube
from .queue import ReconcileQueue

TERMINATED_BY = "controller"
Nodes = dict[str, Any]  # node name -> Node (or None when gone), one lookup per node per scan


Announce = Callable[[RunRow, "str | None"], None]  # posts a closed run's RunTerminated Event


class Deaths:
    def __init__(self, store: DuckDBStore, kube: Kube, queue: ReconcileQueue, clock: Callable = utcnow,
                 announce: Announce | None = None):
        self.store = store
        self.kube = kube
        self.queue = queue
        self.clock = clock
        self.announce: Announce = announce or (lambda closed, reason: announce_termination(kube, closed, reason))
        self.log = log.get(component="controller")

    def on_pod(self, pod: dict[str, Any], event_type: str | None, nodes: Nodes | None = None) -> None:
        """A runner pod's event (`event_type` None: seen by a scan). Idempotent: a closed row stays closed."""
        ref = RunnerPod.of(pod)
        if ref is None:
            return
        row = self.store.get_run(ref.run_id)
        acted = False
        if row is None or row.status == RunStatus.RUNNING.value:
            death = self.death_of(pod, deleted=event_type == "DELETED", nodes=nodes)
            if death is not None:
                acted = self._act(ref, death, row)
        if event_type is not None or acted:
            self.queue.mark(ref.namespace, ref.evalrun)

    def on_listed(self, pods: list[dict[str, Any]]) -> None:
        """A fresh listing of runner pods (a restart, a relist): `on_pod` for each, but one store read for all.

        A restarted controller lists thousands of pods, most of them finished
        with their rows closed. A row read per pod costs milliseconds, and new
        deaths wait in the watch behind the listing; so the rows' statuses are
        read at once, and only pods whose row is running or missing go on.
        """
        refs = [(pod, RunnerPod.of(pod)) for pod in pods]
        statuses = self.store.run_statuses([ref.run_id for _, ref in refs if ref is not None])
        for pod, ref in refs:
            if ref is None:
                continue
            if statuses.get(ref.run_id, RunStatus.RUNNING.value) == RunStatus.RUNNING.value:
                self.on_pod(pod, "ADDED")  # reads its row again, under the same rules as any event
            else:
                self.queue.mark(ref.namespace, ref.evalrun)  # closed: as its ADDED event would, status only

    def scan(self, namespaces: tuple[str, ...]) -> None:
        """Classify every live runner pod against the clock: one stuck Pending or on a lost node sends no event.

        A finished pod's events said all there is to say of it. Pods are judged
        first, and only a dead one costs a store read; with the index, nothing
        here asks the API, however many pods there are.
        """
        nodes: Nodes = {}
        for pod in self.kube.runner_pods(namespaces):
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            try:
                if self.death_of(pod, nodes=nodes) is not None:
                    self.on_pod(pod, None, nodes)
            except Exception as exc:  # one bad pod must not stop the scan of the others
                self.log.error("controller.scan_failed", pod=(pod.get("metadata") or {}).get("name"),
                               error=f"{type(exc).__name__}: {exc}")

    def death_of(self, pod: dict[str, Any], deleted: bool = False, nodes: Nodes | None = None) -> Death | None:
        """The pod's death, with its node and (for a dying pod) its Job looked up; None while it may be fine."""
        ref = RunnerPod.of(pod)
        node_name = (pod.get("spec") or {}).get("nodeName")
        node = self._node(node_name, nodes) if node_name else None
        dying = deleted or bool((pod.get("metadata") or {}).get("deletionTimestamp")) or \
            (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded")
        job = self.kube.get_job(ref.namespace, ref.job_name) if dying and ref and ref.job_name else None
        return classify_pod_death(pod, node, job, self.clock(), ref.start_timeout_s if ref else START_TIMEOUT_S,
                                  deleted=deleted, node_gone=bool(node_name) and node is None)

    def _node(self, name: str, nodes: Nodes | None) -> dict[str, Any] | None:
        if nodes is not None and name in nodes:
            return nodes[name]
        node = self.kube.get_node(name)
        if nodes is not None:
            nodes[name] = node
        return node

    def _act(self, ref: RunnerPod, death: Death, row: RunRow | None) -> bool:
        """Close the pod's running row, or record the attempt that never opened one. True when a row changed."""
        if row is not None:  # the hot path: no API call before the row is closed
            closed = recovery.terminate_for_owner_death(
                self.store, ref.run_id, death.cause, death.reason, TERMINATED_BY, death.summary)
        elif death.terminal or death.cause is Cause.NEVER_STARTED:
            closed = self._record_failed_start(ref, death)
        else:
            return False  # still being torn down: its next event (or the scan) records it
        if closed is None:
            return False
        self.announce(closed, death.reason)
        return True

    def _record_failed_start(self, ref: RunnerPod, death: Death) -> RunRow | None:
        evalrun = self.kube.get_evalrun(ref.namespace, ref.evalrun)
        if evalrun is None:
            return None  # the EvalRun is gone: its Jobs and pods are garbage-collected, no status to show
        owner = Owner(kind="pod", namespace=ref.namespace, pod=ref.name or None, pod_uid=ref.uid)
        request = failed_start_request(Scope.of(evalrun), suite_in(evalrun, ref.suite), ref.suite, ref.run_id,
                                       ref.parent_run_id, owner)
        closed = self.store.record_failed_start(request, death.cause.value, death.reason, TERMINATED_BY)
        if closed is not None:
            recovery.log_terminated(closed, TERMINATED_BY)
        if death.cause is Cause.NEVER_STARTED and ref.job_name:
            self.kube.delete_job(ref.namespace, ref.job_name)  # so it cannot start late and open a zombie run
        return closed


def failed_start_request(scope: Scope, suite: EvalRunSuite | None, suite_name: str | None, run_id: str,
                         parent_run_id: str | None, owner: Owner) -> RunRequest:
    """The row of an attempt whose runner never opened it, from what its EvalRun's spec says of the suite."""
    return RunRequest(
        suite=suite_name or "?",
        case_names=tuple(c.id for c in (suite.cases or [])) if suite else (),
        timeout_seconds=(suite.timeout_seconds or 30.0) if suite else 30.0,
        owner=owner,
        parent_run_id=parent_run_id,
        run_id=run_id,
        scope=scope,
    )


def suite_in(evalrun: dict[str, Any] | None, name: str | None) -> EvalRunSuite | None:
    """The named suite of an EvalRun's spec, or None (no such EvalRun or suite, or an invalid spec)."""
    if evalrun is None or name is None:
        return None
    try:
        return EvalRunSpec.model_validate(evalrun.get("spec") or {}).suite(name)
    except (ValueError, StopIteration):
        return None


def announce_termination(kube: Kube, closed: RunRow, reason: str | None) -> None:
    """A `RunTerminated` Event on the run's EvalRun (found by the row's scope, so the full name).

    A courtesy after the fact: the row is closed already, so an API server that
    fails or hangs costs the Event (logged), never the rest of a sweep.
    """
    if closed.scope is None:
        return
    try:
        evalrun = kube.get_evalrun(*closed.scope.evalrun)
        if evalrun is not None and evalrun["metadata"].get("uid") == closed.scope.uid:
            kube.post_event(evalrun, *status.termination_event(closed, reason))
    except Exception as exc:
        log.get(component="controller").warning("controller.event_not_posted", run_id=closed.id, reason="RunTerminated",
                                                error=f"{type(exc).__name__}: {exc}"[:300])
