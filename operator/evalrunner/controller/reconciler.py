"""What the controller does, called by thin kopf handlers and the scan loop.

Three duties, each idempotent (kopf re-lists everything on restart and on
410 Gone, so every call may be a repeat):

- `ensure_evalrun` (every EvalRun event): the token Secret, then the EvalRun
  is marked for `_reconcile`, which the refresh loop runs: suite ConfigMaps,
  and for each suite the Job of the attempt that should exist now (the first,
  or a retry that resumes the last failed attempt).
- `on_runner_pod`: classify a runner pod's death and terminate its run row
  through the same store transaction as `evalrunner recover`.
- `sweep`: rows whose pod is gone, whose deadline passed, or whose heartbeat
  lapsed with no live pod (this is also the reconcile on operator start).

After each, `_reconcile` rebuilds the EvalRun's status from the rows and posts
Events for what changed, coalesced on the refresh loop.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from .. import log, recovery
from ..models import Cause, EvalRunSpec, EvalRunSuite, LockPolicy, RunStatus
from ..owner import Owner
from ..service.auth import new_token, scope_of
from ..store.duckdb_store import DuckDBStore, lock_domain, utcnow
from ..store.records import RunRequest, RunRow
from . import builders, status
from .classify import Death, classify_pod_death
from .kube import Kube

TERMINATED_BY = "controller"


@dataclass(frozen=True)
class ControllerSettings:
    store_url_for_pods: str
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    scan_interval_s: float = 1.0
    sweep_interval_s: float = 5.0
    heartbeat_timeout_s: float = recovery.DEFAULT_HEARTBEAT_TIMEOUT_S


class Reconciler:
    def __init__(self, store: DuckDBStore, kube: Kube, settings: ControllerSettings, clock=utcnow):
        self.store = store
        self.kube = kube
        self.settings = settings
        self.clock = clock
        self._locks: defaultdict[tuple[str, str], threading.RLock] = defaultdict(threading.RLock)
        self._refusals: dict[tuple[str, str, str], str] = {}  # (namespace, evalrun, suite) -> why
        # Status rebuilds are coalesced: events mark an EvalRun dirty and one loop rebuilds it,
        # so a burst of pod events never queues the (fast) terminations behind (slow) rebuilds.
        self._dirty: set[tuple[str, str]] = set()
        self._dirty_lock = threading.Lock()
        self.log = log.get(component="controller")

    # ------------------------------------------------------------ the EvalRun

    def ensure_evalrun(self, evalrun: dict[str, Any]) -> None:
        ns, name = evalrun["metadata"]["namespace"], evalrun["metadata"]["name"]
        with self._locks[(ns, name)]:
            self._ensure_token(evalrun)
        # The spec, Jobs and status are the refresh loop's: it re-reads the EvalRun, since
        # an event's body may be older than the status already written, and every status
        # patch comes back as an event.
        self.mark_dirty(ns, name)

    def _spec(self, evalrun: dict[str, Any]) -> EvalRunSpec | None:
        try:
            return EvalRunSpec.model_validate(evalrun.get("spec") or {})
        except ValidationError as exc:  # the CRD schema lets through only what pydantic adds on top
            self.kube.post_event(evalrun, "Warning", "InvalidSpec", str(exc)[:1024])
            self.kube.patch_status(evalrun["metadata"]["namespace"], evalrun["metadata"]["name"],
                                   {"phase": "Failed", "observedGeneration": evalrun["metadata"].get("generation")})
            return None

    def _ensure_token(self, evalrun: dict[str, Any]) -> None:
        """Register a token for the EvalRun's scope, then hand it to its runners in a Secret.

        Registering first means every token that ever reached a Secret is known
        to the store, so after a restart the controller never needs to read a
        Secret back (its RBAC has no `get` on Secrets).
        """
        meta = evalrun["metadata"]
        scope = scope_of(meta["namespace"], meta["name"], meta["uid"])
        if self.store.scope_has_token(scope):
            return
        token = new_token()
        self.store.register_token(scope, token)
        self.kube.create_owned(builders.build_token_secret(evalrun, token), evalrun, adopt_blindly=True)

    def _advance_suite(self, evalrun: dict[str, Any], spec: EvalRunSpec, suite: EvalRunSuite,
                       latest: RunRow | None) -> None:
        """Make the Job that should exist now exist: attempt 1, or the retry of `latest` if it failed."""
        meta = evalrun["metadata"]
        if self._refusal(evalrun, suite.name):
            return
        if latest is None:
            attempt, parent = 1, None
            if self.kube.get_job(meta["namespace"], builders.job_name(meta["name"], suite.name, 1)) is None:
                if not self._admit(evalrun, spec, suite):
                    return
        elif status.should_retry(latest, spec.retries):
            attempt, parent = latest.attempt + 1, latest.id
        else:
            return
        configmap = builders.build_suite_configmap(evalrun, suite)
        if configmap is not None:
            self.kube.create_owned(configmap, evalrun)
        case_count = len(suite.cases) if suite.cases else None
        job = builders.build_job(evalrun, suite, attempt, parent, self.settings.store_url_for_pods, spec,
                                 case_count=case_count, case_timeout_seconds=suite.timeout_seconds or 30.0)
        _, created = self.kube.create_owned(job, evalrun)
        if created:
            run_id = builders.run_id_for(meta["uid"], suite.name, attempt)
            if parent:
                self.kube.post_event(evalrun, "Normal", "Retrying",
                                     f"suite {suite.name}: attempt {attempt} (run {run_id}) resumes run {parent}")
            else:
                self.kube.post_event(evalrun, "Normal", "Started", f"suite {suite.name}: Job {job['metadata']['name']} "
                                                                   f"created for run {run_id}")

    def _admit(self, evalrun: dict[str, Any], spec: EvalRunSpec, suite: EvalRunSuite) -> bool:
        """The suite's concurrency policy against live runs of the same suite elsewhere.

        Stale rows were swept first, so they never block. Forbid records a
        refusal in the status; Replace terminates the live runs and deletes their pods.
        """
        meta = evalrun["metadata"]
        self.sweep(suite=suite.name)
        scope = scope_of(meta["namespace"], meta["name"], meta["uid"])
        live = [r for r in self.store.running_runs()
                if r.suite == suite.name and r.scope != scope and lock_domain(r.scope) == lock_domain(scope)]
        policy = builders.lock_policy_for(evalrun, suite)
        if not live or policy is LockPolicy.ALLOW:
            return True
        ids = ", ".join(r.id for r in live)
        if policy is LockPolicy.FORBID:
            message = f"{status.REFUSED_PREFIX} suite {suite.name} is already running ({ids}); concurrencyPolicy Forbid"
            self._refusals[(meta["namespace"], meta["name"], suite.name)] = message
            self.kube.post_event(evalrun, "Warning", "Refused", message)
            log.get(suite=suite.name).warning(log.SUITE_REFUSED, evalrun=meta["name"], live_run_ids=[r.id for r in live])
            return False
        for run in live:
            closed = self.store.terminate_run(run.id, Cause.REPLACED, f"replaced by EvalRun {meta['namespace']}/{meta['name']}",
                                              TERMINATED_BY)
            if closed is not None:
                recovery.log_terminated(closed, TERMINATED_BY)
            if run.owner and run.owner.kind == "pod" and run.owner.namespace and run.owner.pod:
                self.kube.delete_pod(run.owner.namespace, run.owner.pod)
        self.kube.post_event(evalrun, "Normal", "Replaced", f"suite {suite.name}: replaced live run(s) {ids}")
        return True

    def _refusal(self, evalrun: dict[str, Any], suite_name: str) -> str | None:
        meta = evalrun["metadata"]
        key = (meta["namespace"], meta["name"], suite_name)
        if key in self._refusals:
            return self._refusals[key]
        for entry in (evalrun.get("status") or {}).get("suites", []):
            if entry.get("name") == suite_name and str(entry.get("message", "")).startswith(status.REFUSED_PREFIX):
                self._refusals[key] = entry["message"]
                return entry["message"]
        return None

    def _latest_row(self, uid: str, suite: str, retries: int) -> RunRow | None:
        for attempt in range(retries + 1, 0, -1):
            row = self.store.get_run(builders.run_id_for(uid, suite, attempt))
            if row is not None:
                return row
        return None

    # ------------------------------------------------------------ status

    def mark_dirty(self, namespace: str, name: str) -> None:
        with self._dirty_lock:
            self._dirty.add((namespace, name))

    def mark_scope_dirty(self, scope: str | None) -> None:
        """The store service saw a run of this EvalRun start or finish."""
        if scope and scope.count("/") >= 2:
            namespace, name, _uid = scope.split("/", 2)
            self.mark_dirty(namespace, name)

    def refresh_dirty(self) -> int:
        with self._dirty_lock:
            todo, self._dirty = self._dirty, set()
        for namespace, name in todo:
            try:
                self.refresh_status(namespace, name)
            except Exception as exc:  # retried on the next round
                self.mark_dirty(namespace, name)
                self.log.error("controller.refresh_failed", evalrun=f"{namespace}/{name}", error=repr(exc))
        return len(todo)

    def refresh_status(self, namespace: str, name: str) -> None:
        """Re-read the EvalRun and reconcile it (the refresh loop's entry point)."""
        with self._locks[(namespace, name)]:
            evalrun = self.kube.get_evalrun(namespace, name)
            spec = self._spec(evalrun) if evalrun is not None else None
            if spec is not None:
                self._reconcile(evalrun, spec)

    def _reconcile(self, evalrun: dict[str, Any], spec: EvalRunSpec) -> None:
        """Start due attempts, rebuild the status from the rows, post Events for what changed."""
        meta = evalrun["metadata"]
        states = []
        for suite in spec.suites:
            latest = self._latest_row(meta["uid"], suite.name, spec.retries)
            self._advance_suite(evalrun, spec, suite, latest)  # a failed attempt with retries left gets its successor
            attempt = latest.attempt if latest else 1
            states.append(status.SuiteState(suite.name, latest, builders.job_name(meta["name"], suite.name, attempt),
                                            self._refusal(evalrun, suite.name)))
        old = evalrun.get("status") or {}
        new = status.build_status(spec, meta.get("generation"), states, old, self.clock())
        if _comparable(new) != _comparable(old):
            self.kube.patch_status(meta["namespace"], meta["name"], new)
            for kind, reason, message in status.transitions(old, new):
                self.kube.post_event(evalrun, kind, reason, message)

    # ------------------------------------------------------------ runner pods

    def on_runner_pod(self, pod: dict[str, Any], event_type: str | None, nodes: dict[str, Any] | None = None) -> None:
        """Act on a runner pod's death at once; the status follows on the refresh loop."""
        meta = pod.get("metadata") or {}
        run_id = (meta.get("annotations") or {}).get(builders.ANNOTATION_RUN_ID)
        labels = meta.get("labels") or {}
        evalrun_name = (meta.get("annotations") or {}).get(builders.ANNOTATION_EVALRUN) or labels.get(builders.LABEL_EVALRUN)
        if not run_id or not evalrun_name:
            return
        row = self.store.get_run(run_id)
        if row is not None and row.status != RunStatus.RUNNING.value:
            acted = False  # closed already (by its runner, or an earlier event): nothing to classify
        else:
            death = self._classify(pod, deleted=event_type == "DELETED", nodes=nodes)
            acted = death is not None and self._act_on_death(pod, run_id, evalrun_name, death, row)
        if event_type is not None or acted:
            self.mark_dirty(meta["namespace"], evalrun_name)

    def _classify(self, pod: dict[str, Any], deleted: bool, nodes: dict[str, Any] | None = None) -> Death | None:
        spec = pod.get("spec") or {}
        node_name = spec.get("nodeName")
        if nodes is not None and node_name in nodes:
            node = nodes[node_name]
        else:
            node = self.kube.get_node(node_name) if node_name else None
            if nodes is not None and node_name:
                nodes[node_name] = node
        dying = deleted or (pod.get("metadata") or {}).get("deletionTimestamp") or \
            (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded")
        job_name = (pod["metadata"].get("labels") or {}).get("job-name") or \
            (pod["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name")
        job = self.kube.get_job(pod["metadata"]["namespace"], job_name) if dying and job_name else None
        return classify_pod_death(pod, node, job, self.clock(), self._start_timeout(pod),
                                  deleted=deleted, node_gone=bool(node_name) and node is None)

    def _start_timeout(self, pod: dict[str, Any]) -> float:
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        try:
            return float(annotations.get(builders.ANNOTATION_START_TIMEOUT, 120))
        except ValueError:
            return 120.0

    def _act_on_death(self, pod: dict[str, Any], run_id: str, evalrun_name: str, death: Death,
                      row: RunRow | None) -> bool:
        """Terminate the pod's running `row` (or record a run that never opened); True when a row changed."""
        ns = pod["metadata"]["namespace"]
        if row is not None:  # the hot path: no API call before the row is closed
            closed = recovery.terminate_for_owner_death(
                self.store, run_id, death.cause, death.reason, TERMINATED_BY, death.summary)
            evalrun = self.kube.get_evalrun(ns, evalrun_name) if closed is not None else None
        else:
            # The runner never opened its run: record the attempt as failed so it is seen and retried.
            if not (death.terminal or death.cause is Cause.NEVER_STARTED):
                return False
            evalrun = self.kube.get_evalrun(ns, evalrun_name)
            if evalrun is None:
                return False
            closed = self.store.record_failed_start(
                self._request_for(evalrun, pod, run_id), death.cause.value, death.reason, TERMINATED_BY)
            if closed is not None:
                recovery.log_terminated(closed, TERMINATED_BY)
            if death.cause is Cause.NEVER_STARTED:
                job_name = (pod["metadata"].get("labels") or {}).get("job-name")
                if job_name:
                    self.kube.delete_job(ns, job_name)  # so it cannot start late and open a zombie run
        if closed is None:
            return False
        if evalrun is not None:
            self._post_terminated(evalrun, closed, death.reason)
        return True

    def _post_terminated(self, evalrun: dict[str, Any], closed: RunRow, reason: str | None) -> None:
        how = " (from the runner's summary)" if closed.terminated_by and "summary" in closed.terminated_by else ""
        self.kube.post_event(
            evalrun, "Warning" if closed.status == RunStatus.FAILED.value else "Normal", "RunTerminated",
            f"run {closed.id} {closed.status}{how}: " + " ".join(filter(None, (closed.cause, reason))))

    def _request_for(self, evalrun: dict[str, Any], pod: dict[str, Any], run_id: str) -> RunRequest:
        meta = evalrun["metadata"]
        annotations = pod["metadata"].get("annotations") or {}
        suite_name = (pod["metadata"].get("labels") or {}).get(builders.LABEL_SUITE, "?")
        spec = self._spec(evalrun)
        suite = spec.suite(suite_name) if spec else None
        return RunRequest(
            suite=suite_name,
            case_names=tuple(c.id for c in (suite.cases or [])) if suite else (),
            timeout_seconds=(suite.timeout_seconds or 30.0) if suite else 30.0,
            owner=Owner(kind="pod", namespace=pod["metadata"]["namespace"], pod=pod["metadata"]["name"],
                        pod_uid=pod["metadata"].get("uid")),
            parent_run_id=annotations.get(builders.ANNOTATION_PARENT_RUN_ID),
            run_id=run_id,
            scope=scope_of(meta["namespace"], meta["name"], meta["uid"]),
        )

    # ------------------------------------------------------------ periodic work

    def scan_pods(self) -> None:
        """Classify every runner pod against the clock: never-started pods and lost nodes send no event."""
        nodes: dict[str, Any] = {}  # one lookup per node per scan
        for pod in self.kube.runner_pods(self.settings.namespaces):
            try:
                self.on_runner_pod(pod, None, nodes)
            except Exception as exc:  # one bad pod must not stop the scan of the others
                self.log.error("controller.scan_failed", pod=pod["metadata"].get("name"), error=repr(exc))

    def sweep(self, suite: str | None = None) -> list[RunRow]:
        """Terminate running rows (of one suite, if given) whose pod is gone, deadline passed or heartbeat lapsed."""
        now = self.clock()
        closed = []
        for run in self.store.running_runs():
            if suite is not None and run.suite != suite:
                continue
            if self.settings.namespaces and run.owner and run.owner.kind == "pod" \
                    and run.owner.namespace not in self.settings.namespaces:
                continue  # another controller's (or nobody's) business
            death = self._row_verdict(run, now)
            if death is None:
                continue
            row = recovery.terminate_for_owner_death(self.store, run.id, death.cause, death.reason, "sweeper",
                                                     death.summary)
            if row is not None:
                closed.append(row)
                self._after_sweep(run, row)
        return closed

    def _row_verdict(self, run: RunRow, now: datetime) -> Death | None:
        owner = run.owner
        if owner is None or owner.kind != "pod":
            orphan = recovery.classify_orphan(run, now, recovery.local_liveness, self.settings.heartbeat_timeout_s)
            return Death(orphan.cause, orphan.reason, terminal=True) if orphan else None
        pod = self.kube.get_pod(owner.namespace, owner.pod) if owner.namespace and owner.pod else None
        if pod is None or (owner.pod_uid and pod["metadata"].get("uid") != owner.pod_uid):
            return Death(Cause.POD_DELETED, f"pod {owner.namespace}/{owner.pod} no longer exists", terminal=True)
        # The pod exists: judge it as its watch event would. A pod that died while no controller
        # watched (a restart) must not wait for a watch event or the heartbeat lease, since a
        # concurrency policy's admission sweeps first and a stale row must never block it.
        if (death := self._classify(pod, deleted=False)) is not None:
            return death
        if run.deadline_at is not None and now > run.deadline_at:
            return Death(Cause.DEADLINE_EXCEEDED, f"still running past its deadline {run.deadline_at.isoformat()}",
                         terminal=True)
        pod_live = (pod.get("status") or {}).get("phase") in ("Pending", "Running") and \
            not pod["metadata"].get("deletionTimestamp")
        lapsed = run.heartbeat_at is not None and now - run.heartbeat_at > timedelta(seconds=self.settings.heartbeat_timeout_s)
        if lapsed and not pod_live:
            age = (now - run.heartbeat_at).total_seconds()
            return Death(Cause.HEARTBEAT_LOST, f"no heartbeat for {age:.0f}s and no live pod", terminal=True)
        return None

    def _after_sweep(self, run: RunRow, closed: RunRow) -> None:
        if run.owner is None or run.owner.kind != "pod" or not run.scope:
            return
        ns, name, _uid = (run.scope.split("/") + ["", "", ""])[:3]
        evalrun = self.kube.get_evalrun(ns, name)
        if evalrun is not None:
            self._post_terminated(evalrun, closed, closed.error)
            self.mark_dirty(ns, name)


def _comparable(status_obj: dict[str, Any]) -> dict[str, Any]:
    """Status without the timestamps that change on every rebuild."""
    out = {k: v for k, v in status_obj.items() if k not in ("startedAt",)}
    out["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status_obj.get("conditions", [])]
    return out
