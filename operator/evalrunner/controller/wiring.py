"""The controller's parts, wired together: what the kopf handlers and the loops of `main` call.

- `deaths.Deaths`: a runner pod died -> close its row (the hot path);
- `sweep.Sweeper`: running rows against the pods that exist (what the watch missed);
- `progression.Progression`: an EvalRun -> admit, start, retry, and its status;
- `queue.ReconcileQueue`: which EvalRuns the refresh loop reconciles next;
- `index.ClusterIndex`: runner pods, Jobs and nodes as the informers last saw
  them; the parts read them through `IndexedKube`, so they ask the API only
  for what the index does not hold.

Each part takes its collaborators (store, Kubernetes client, queue, clock) as
arguments, so a unit test builds it with fakes; this class only connects them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from .. import log
from ..scope import Scope
from ..store.duckdb_store import DuckDBStore, utcnow
from ..timing import HEARTBEAT_LEASE_S, JOB_TTL_S, SCAN_INTERVAL_S, SWEEP_INTERVAL_S
from .builders import DEFAULT_RUNNER_IMAGE, DEFAULT_TOKEN_AUDIENCE
from .children import RunnerJob
from .deaths import Announce, Deaths
from .index import ClusterIndex, IndexedKube
from .janitor import Janitor
from .kube import Kube
from .progression import Progression, ProgressionSettings
from .queue import ReconcileQueue
from .sweep import Sweeper, SweepSettings


@dataclass(frozen=True)
class ControllerSettings:
    store_url_for_pods: str
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    scan_interval_s: float = SCAN_INTERVAL_S
    sweep_interval_s: float = SWEEP_INTERVAL_S
    heartbeat_lease_s: float = HEARTBEAT_LEASE_S
    job_ttl_s: float | None = JOB_TTL_S  # finished Jobs whose rows are closed are deleted after this; None: kept
    runner_image: str = DEFAULT_RUNNER_IMAGE  # runner pods of EvalRuns that name no image
    token_audience: str = DEFAULT_TOKEN_AUDIENCE  # of the store tokens projected into runner pods


class Controller:
    def __init__(self, store: DuckDBStore, kube: Kube, settings: ControllerSettings, clock: Callable = utcnow,
                 index: ClusterIndex | None = None, progress: Callable[[], None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic, announce: Announce | None = None):
        self.settings = settings
        self.index = index
        self.kube = IndexedKube(kube, index) if index is not None else kube
        self.progress = progress or (lambda: None)  # called as the loops get work done (liveness)
        self.queue = ReconcileQueue(monotonic)
        self.deaths = Deaths(store, self.kube, self.queue, clock, announce)
        self.sweeper = Sweeper(store, self.kube, self.deaths, self.queue,
                               SweepSettings(settings.namespaces, settings.heartbeat_lease_s), clock)
        self.progression = Progression(store, self.kube, self.deaths, self.sweeper, self.queue,
                                       ProgressionSettings(settings.store_url_for_pods, settings.runner_image,
                                                           settings.token_audience), clock)
        self.janitor = Janitor(store, self.kube, settings.job_ttl_s, clock)
        self.log = log.get(component="controller")

    # ------------------------------------------------------------ events

    def on_evalrun_event(self, evalrun: dict[str, Any], event_type: str | None) -> None:
        if event_type == "DELETED":
            self.progression.forget(Scope.of(evalrun))  # its children are garbage-collected; its rows stay
            return
        meta = evalrun["metadata"]
        self.queue.mark(meta["namespace"], meta["name"])

    def on_runner_pod_event(self, pod: dict[str, Any], event_type: str | None) -> None:
        self.deaths.on_pod(pod, event_type)

    def on_runner_pods_listed(self, pods: list[dict[str, Any]]) -> None:
        """The pod informer's listing: each pod as an ADDED event, with the store read in bulk."""
        self.deaths.on_listed(pods)

    def on_node_event(self, node: dict[str, Any], event_type: str | None) -> None:
        """A node changed (NotReady, deleted): judge its runner pods now rather than at the next scan."""
        conditions = (node.get("status") or {}).get("conditions") or []
        ready = next((c.get("status") for c in conditions if c.get("type") == "Ready"), None)
        if event_type != "DELETED" and ready == "True":
            return
        name = (node.get("metadata") or {}).get("name")
        for pod in self.kube.runner_pods(self.settings.namespaces):
            if (pod.get("spec") or {}).get("nodeName") == name and self.deaths.death_of(pod) is not None:
                self.deaths.on_pod(pod, None)

    def on_runner_job_event(self, job: dict[str, Any], event_type: str | None) -> None:
        """A Job changed (finished, say, with its pod gone): its EvalRun may have a next step."""
        ref = RunnerJob.of(job)
        if ref is not None:
            self.queue.mark_scope(ref.scope)

    def on_run_changed(self, scope: Scope | None) -> None:
        """The store service saw a run of this EvalRun start or finish."""
        self.queue.mark_scope(scope)

    # ------------------------------------------------------------ the loops

    def refresh(self) -> int:
        """Reconcile every EvalRun marked since the last call; one that fails is marked again."""
        marked = self.queue.drain()
        for namespace, name in marked:
            try:
                self.progression.reconcile(namespace, name)
            except Exception as exc:  # retried after a backoff that grows while it keeps failing
                delay = self.queue.retry_later((namespace, name))
                self.log.error("controller.reconcile_failed", evalrun=f"{namespace}/{name}",
                               retry_in_s=delay, error=f"{type(exc).__name__}: {exc}")
            else:
                self.queue.succeeded((namespace, name))
            self.progress()
        return len(marked)

    def scan(self) -> None:
        self.deaths.scan(self.settings.namespaces)

    def sweep(self) -> None:
        self.sweeper.sweep()
        self.janitor.collect()
