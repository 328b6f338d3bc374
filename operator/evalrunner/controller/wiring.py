"""The controller's parts, wired together: what the kopf handlers and the loops of `main` call.

- `deaths.Deaths`: a runner pod died -> close its row (the hot path);
- `sweep.Sweeper`: running rows against the pods that exist (what the watch missed);
- `progression.Progression`: an EvalRun -> admit, start, retry, and its status;
- `queue.ReconcileQueue`: which EvalRuns the refresh loop reconciles next.

Each part takes its collaborators (store, Kubernetes client, queue, clock) as
arguments, so a unit test builds it with fakes; this class only connects them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .. import log
from ..scope import Scope
from ..store.duckdb_store import DuckDBStore, utcnow
from ..timing import HEARTBEAT_LEASE_S, SCAN_INTERVAL_S, SWEEP_INTERVAL_S
from .children import RunnerJob
from .deaths import Deaths
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


class Controller:
    def __init__(self, store: DuckDBStore, kube: Kube, settings: ControllerSettings, clock: Callable = utcnow):
        self.settings = settings
        self.kube = kube
        self.queue = ReconcileQueue()
        self.deaths = Deaths(store, kube, self.queue, clock)
        self.sweeper = Sweeper(store, kube, self.deaths, self.queue,
                               SweepSettings(settings.namespaces, settings.heartbeat_lease_s), clock)
        self.progression = Progression(store, kube, self.deaths, self.sweeper, self.queue,
                                       ProgressionSettings(settings.store_url_for_pods), clock)
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
            except Exception as exc:  # retried on the next round
                self.queue.mark(namespace, name)
                self.log.error("controller.reconcile_failed", evalrun=f"{namespace}/{name}",
                               error=f"{type(exc).__name__}: {exc}")
        return len(marked)

    def scan(self) -> None:
        self.deaths.scan(self.settings.namespaces)

    def sweep(self) -> None:
        self.sweeper.sweep()
