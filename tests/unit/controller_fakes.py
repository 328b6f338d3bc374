"""Fakes for unit-testing the controller's parts: a Kubernetes API in memory, a fixed clock, a runner.

`FakeKube` implements the methods of `evalrunner.controller.kube.Kube` over
plain dicts, with the API server's semantics the controller relies on: a
create of an existing name is a 409, a status patch is a JSON merge patch
(null removes a key) and the stored status drops nulls, deleting a Job
deletes its pods, and any call can be made to fail with an API error.
The store is a real DuckDB store (in memory); the clock is fixed.
What this cannot show (watches, RBAC, the Job controller, a kubelet) the
cluster tests show against a real control plane.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.rest import ApiException

from evalrunner.controller import builders
from evalrunner.controller.index import ClusterIndex
from evalrunner.controller.wiring import Controller, ControllerSettings
from evalrunner.faults import Faults
from evalrunner.models import RunStatus
from evalrunner.owner import Owner
from evalrunner.scope import Scope
from evalrunner.store import CaseEvent, DuckDBStore, RunRequest
from evalrunner.store.records import RunRow

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NAMESPACE = "team"
STORE_URL = "http://evalrunner.evals.svc:8080"


class Clock:
    def __init__(self, now: datetime = T0):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Event:
    evalrun: str
    type: str
    reason: str
    message: str


@dataclass
class FakeKube:
    clock: Clock
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)  # (kind, ns, name)
    events: list[Event] = field(default_factory=list)
    patches: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    failures: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (verb, kind) -> statuses to raise
    calls: Counter = field(default_factory=Counter)  # (verb, kind) -> requests made
    _uids: Any = field(default_factory=lambda: itertools.count(1))

    # ------------------------------------------------------------ test setup

    def fail_next(self, verb: str, kind: str, status: int = 500, times: int = 1) -> None:
        self.failures.setdefault((verb, kind), []).extend([status] * times)

    def _maybe_fail(self, verb: str, kind: str) -> None:
        self.calls[(verb, kind)] += 1
        pending = self.failures.get((verb, kind))
        if pending:
            raise ApiException(status=pending.pop(0), reason="injected by the test")

    def new_uid(self) -> str:
        return f"{next(self._uids):08d}-0000-4000-8000-{next(self._uids):012d}"

    def add_evalrun(self, name: str, suites: list[dict[str, Any]], namespace: str = NAMESPACE,
                    **spec: Any) -> dict[str, Any]:
        evalrun = {"apiVersion": "evals.workshop.dev/v1alpha1", "kind": "EvalRun",
                   "metadata": {"name": name, "namespace": namespace, "uid": self.new_uid(), "generation": 1},
                   "spec": {"suites": suites, **spec}}
        self.objects[("EvalRun", namespace, name)] = evalrun
        return copy.deepcopy(evalrun)

    def edit_spec(self, namespace: str, name: str, **spec: Any) -> None:
        evalrun = self.objects[("EvalRun", namespace, name)]
        evalrun["spec"].update(spec)
        evalrun["metadata"]["generation"] += 1

    def delete_evalrun(self, namespace: str, name: str) -> dict[str, Any]:
        """Delete it and garbage-collect its children, as owner references make the API server do."""
        evalrun = self.objects.pop(("EvalRun", namespace, name))
        uid = evalrun["metadata"]["uid"]
        for key, obj in list(self.objects.items()):
            if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or []):
                self._remove(key)
        return evalrun

    def pod_of(self, job: dict[str, Any], phase: str = "Running", state: dict[str, Any] | None = None,
               node: str | None = "node-0", **metadata: Any) -> dict[str, Any]:
        """The pod the Job controller would make from `job`'s template, in the given state."""
        meta = job["metadata"]
        template = job["spec"]["template"]["metadata"]
        name = f"{meta['name']}-{next(self._uids):05d}"
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": meta["namespace"], "uid": self.new_uid(),
                         "creationTimestamp": ts(self.clock.now),
                         "labels": {**template["labels"], "batch.kubernetes.io/job-name": meta["name"],
                                    "job-name": meta["name"]},
                         "annotations": dict(template["annotations"]),
                         "ownerReferences": [{"kind": "Job", "name": meta["name"], "uid": meta["uid"],
                                              "controller": True}],
                         **metadata},
            "spec": {**copy.deepcopy(job["spec"]["template"]["spec"]), **({"nodeName": node} if node else {})},
            "status": {"phase": phase},
        }
        if state is not None:
            pod["status"]["containerStatuses"] = [{"name": "runner", "state": state, "restartCount": 0}]
        self.objects[("Pod", meta["namespace"], name)] = pod
        return copy.deepcopy(pod)

    def set_pod(self, pod: dict[str, Any]) -> None:
        self.objects[("Pod", pod["metadata"]["namespace"], pod["metadata"]["name"])] = copy.deepcopy(pod)

    def finish_job(self, namespace: str, name: str, condition: str = "Failed",
                   reason: str = "BackoffLimitExceeded") -> None:
        job = self.objects[("Job", namespace, name)]
        job.setdefault("status", {})["conditions"] = [{"type": condition, "status": "True", "reason": reason}]

    def add_node(self, name: str = "node-0", ready: str = "True") -> None:
        self.objects[("Node", "", name)] = {"metadata": {"name": name}, "status": {"conditions": [
            {"type": "Ready", "status": ready, "lastTransitionTime": ts(self.clock.now)}]}}

    def jobs(self, namespace: str = NAMESPACE) -> dict[str, dict[str, Any]]:
        return {k[2]: v for k, v in self.objects.items() if k[0] == "Job" and k[1] == namespace}

    def evalrun(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        return copy.deepcopy(self.objects[("EvalRun", namespace, name)])

    def status(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        return self.evalrun(name, namespace).get("status") or {}

    def suite_status(self, name: str, suite: str) -> dict[str, Any]:
        return next((s for s in self.status(name).get("suites", []) if s["name"] == suite), {})

    def reasons(self, evalrun: str) -> list[str]:
        return [e.reason for e in self.events if e.evalrun == evalrun]

    # ------------------------------------------------------------ the Kube interface

    def create_owned(self, obj: dict[str, Any], evalrun: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        self._maybe_fail("create", kind)
        key = (kind, ns, name)
        if key not in self.objects:
            stored = copy.deepcopy(obj)
            stored["metadata"]["uid"] = self.new_uid()
            stored["metadata"]["creationTimestamp"] = ts(self.clock.now)
            self.objects[key] = stored
            return copy.deepcopy(stored), True
        existing = self.objects[key]
        if not builders.owned_by(existing, evalrun):
            raise RuntimeError(f"{kind} {ns}/{name} exists and belongs to another object")
        return copy.deepcopy(existing), False

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get("Pod", namespace, name)

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get("Job", namespace, name)

    def get_node(self, name: str) -> dict[str, Any] | None:
        return self._get("Node", "", name)

    def get_evalrun(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get("EvalRun", namespace, name)

    def runner_pods(self, namespaces: tuple[str, ...]) -> list[dict[str, Any]]:
        self._maybe_fail("list", "Pod")
        return [copy.deepcopy(o) for (kind, ns, _), o in self.objects.items()
                if kind == "Pod" and (not namespaces or ns in namespaces)]

    def suite_jobs(self, namespace: str, suite: str) -> list[dict[str, Any]]:
        self._maybe_fail("list", "Job")
        return [copy.deepcopy(o) for (kind, ns, _), o in self.objects.items()
                if kind == "Job" and ns == namespace and o["metadata"]["labels"].get(builders.LABEL_SUITE) == suite]

    def job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        self._maybe_fail("list", "Pod")
        return [copy.deepcopy(o) for (kind, ns, _), o in self.objects.items()
                if kind == "Pod" and ns == namespace
                and o["metadata"]["labels"].get("batch.kubernetes.io/job-name") == job_name]

    def delete_job(self, namespace: str, name: str) -> None:
        self._maybe_fail("delete", "Job")
        if self.objects.pop(("Job", namespace, name), None) is not None:
            for pod in self.job_pods(namespace, name):  # propagation: the garbage collector removes its pods
                self._remove(("Pod", namespace, pod["metadata"]["name"]))

    def delete_pod(self, namespace: str, name: str) -> None:
        self._maybe_fail("delete", "Pod")
        self.objects.pop(("Pod", namespace, name), None)

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self._maybe_fail("patch", "EvalRun")
        evalrun = self.objects.get(("EvalRun", namespace, name))
        if evalrun is None:
            return
        self.patches.append((namespace, name, copy.deepcopy(patch)))
        evalrun["status"] = _merge_patch(evalrun.get("status") or {}, patch)

    def post_event(self, evalrun: dict[str, Any], kind: str, reason: str, message: str) -> None:
        self.events.append(Event(evalrun["metadata"]["name"], kind, reason, message))

    # ------------------------------------------------------------ plumbing

    def _get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self._maybe_fail("get", kind)
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def _remove(self, key: tuple[str, str, str]) -> None:
        self.objects.pop(key, None)


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies a merge patch; the stored object keeps no nulls."""
    if not isinstance(patch, dict):
        return _prune(copy.deepcopy(patch))
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _prune(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _prune(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


# ---------------------------------------------------------------- the world a test builds


@dataclass
class World:
    """A controller with its fakes: what each test builds first."""

    clock: Clock
    kube: FakeKube
    store: DuckDBStore
    controller: Controller

    @classmethod
    def build(cls, namespaces: tuple[str, ...] = (), indexed: bool = False) -> World:
        """With `indexed`, the parts read pods, Jobs and nodes through an index that `sync_index` feeds."""
        clock = Clock()
        kube = FakeKube(clock)
        kube.add_node()
        store = DuckDBStore.open(":memory:", clock=clock, faults=Faults(""))
        controller = Controller(store, kube, ControllerSettings(STORE_URL, namespaces=namespaces), clock=clock,
                                index=ClusterIndex() if indexed else None,
                                monotonic=lambda: clock.now.timestamp())
        return cls(clock, kube, store, controller)

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------ driving the controller

    def sync_index(self, resource_version: str | None = None) -> None:
        """What the informers' listings would give: the fake API's pods, Jobs and nodes, now (at that version)."""
        index = self.controller.index
        for kind, plural in (("Pod", "pods"), ("Job", "jobs"), ("Node", "nodes")):
            index.replace(plural, [copy.deepcopy(o) for (k, _, _), o in self.kube.objects.items() if k == kind],
                          resource_version)

    def watch_event(self, event_type: str, obj: dict[str, Any]) -> None:
        """A pod's watch event, as its informer delivers it: into the index, then to the controller."""
        self.controller.index.apply("pods", event_type, obj)
        self.controller.on_runner_pod_event(obj, event_type)

    def created(self, evalrun: dict[str, Any]) -> None:
        """The EvalRun's ADDED event, then a refresh round."""
        self.controller.on_evalrun_event(evalrun, "ADDED")
        self.controller.refresh()

    def settle(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            if not self.controller.refresh():
                return

    def job(self, evalrun: str, suite: str, attempt: int = 1) -> dict[str, Any] | None:
        return self.kube.get_job(NAMESPACE, builders.job_name(evalrun, suite, attempt))

    # ------------------------------------------------------------ what a runner pod does

    def runner_opens(self, pod: dict[str, Any], cases: tuple[str, ...] = ("a", "b")) -> RunRow:
        """The pod's runner opens its run through the store, as the store service would for its token."""
        meta = pod["metadata"]
        annotations = meta["annotations"]
        evalrun = self.kube.get_evalrun(meta["namespace"], annotations[builders.ANNOTATION_EVALRUN])
        request = RunRequest(
            suite=meta["labels"][builders.LABEL_SUITE], case_names=cases, timeout_seconds=30,
            owner=Owner(kind="pod", namespace=meta["namespace"], pod=meta["name"], pod_uid=meta["uid"]),
            parent_run_id=annotations.get(builders.ANNOTATION_PARENT_RUN_ID),
            run_id=annotations[builders.ANNOTATION_RUN_ID], scope=Scope.of(evalrun), admitted=True)
        run = self.store.start_run(request).run
        self.controller.on_run_changed(run.scope)
        return run

    def runner_reports(self, run: RunRow, completed: tuple[str, ...] = (), running: tuple[str, ...] = ()) -> None:
        events = [CaseEvent(f"{run.id}/{n}", run.id, n, RunStatus.COMPLETED.value, self.clock.now, self.clock.now,
                            passed=True, score=1.0) for n in completed]
        events += [CaseEvent(f"{run.id}/{n}", run.id, n, RunStatus.RUNNING.value, self.clock.now) for n in running]
        self.store.save_cases(events)

    def runner_finishes(self, run: RunRow) -> None:
        self.store.finish_run(run.id, RunStatus.COMPLETED)
        self.controller.on_run_changed(run.scope)

    def started_pod(self, evalrun: str, suite: str, attempt: int = 1) -> tuple[dict[str, Any], RunRow]:
        """A Running pod of the suite's attempt whose runner has opened its run."""
        pod = self.kube.pod_of(self.job(evalrun, suite, attempt), "Running",
                               {"running": {"startedAt": ts(self.clock.now)}})
        return pod, self.runner_opens(pod)


def suite(name: str, cases: int = 2, **extra: Any) -> dict[str, Any]:
    return {"name": name, "timeoutSeconds": 10, "target": {"python": {"callable": "targets:echo"}},
            "cases": [{"id": f"c{i}", "input": "x", "expected": "x"} for i in range(cases)], **extra}


def terminated(exit_code: int, at: datetime, reason: str = "Error") -> dict[str, Any]:
    return {"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": ts(at - timedelta(seconds=5)),
                           "finishedAt": ts(at)}}
