"""Running rows against the pods that exist: what the pod watch missed.

A pod that died while no controller watched (a restart, an outage), a pod
that vanished without an event we saw, a row whose deadline passed, a row
whose heartbeat lapsed with no live pod: each is closed here, on start
before anything else and then every few seconds. The verdict is
`recovery.orphan_verdict`, the same one the local sweeper makes; this module
only says what the cluster shows of each row's owner. The sweep also repairs
case rows left running under closed runs (manual SQL, for one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import log, recovery
from ..owner import local_liveness
from ..scope import lock_domain
from ..store.duckdb_store import DuckDBStore, utcnow
from ..store.records import RunRow
from ..timing import HEARTBEAT_LEASE_S
from .deaths import Deaths
from .kube import Kube
from .queue import ReconcileQueue

TERMINATED_BY = "sweeper"


@dataclass(frozen=True)
class SweepSettings:
    namespaces: tuple[str, ...] = ()  # the controller's; empty: every namespace
    heartbeat_lease_s: float = HEARTBEAT_LEASE_S


class Sweeper:
    def __init__(self, store: DuckDBStore, kube: Kube, deaths: Deaths, queue: ReconcileQueue,
                 settings: SweepSettings = SweepSettings(), clock: Callable = utcnow):
        self.store = store
        self.kube = kube
        self.deaths = deaths
        self.queue = queue
        self.settings = settings
        self.clock = clock
        self.log = log.get(component="controller")

    def sweep(self, suite: str | None = None, namespace: str | None = None) -> recovery.SweepResult:
        """Close every orphaned running row (of one suite in one namespace, if given); repair stranded cases."""
        now = self.clock()
        closed = []
        for run in self.store.running_runs():
            if suite is not None and (run.suite != suite or lock_domain(run.scope) != namespace):
                continue
            if not self._ours(run):
                continue
            orphan = recovery.orphan_verdict(run, now, self.owner_state(run), self.settings.heartbeat_lease_s)
            if orphan is None:
                continue
            row = recovery.terminate_for_owner_death(
                self.store, run.id, orphan.cause, orphan.reason, TERMINATED_BY, orphan.summary)
            if row is not None:
                closed.append(row)
                self.deaths.announce(row, row.error)
                self.queue.mark_scope(row.scope)
        repaired = recovery.repair_stranded_cases(self.store, TERMINATED_BY) if suite is None else []
        for stranded in repaired:
            row = self.store.get_run(stranded.run_id)
            self.queue.mark_scope(row.scope if row else None)
        return recovery.SweepResult(closed, repaired)

    def owner_state(self, run: RunRow) -> recovery.OwnerState:
        """What the cluster shows of the row's owner: its pod gone, dead of a classified cause, alive, or unclear."""
        owner = run.owner
        if owner is None or owner.kind != "pod":
            return recovery.process_owner_state(owner, local_liveness)
        if not (owner.namespace and owner.pod):
            return recovery.UNKNOWN
        index = getattr(self.kube, "index", None)
        if index is not None and not index.synced("pods"):
            # The pod watch is down (the API server is away): no read per row, which would cost a
            # timeout each. The heartbeat lease and the deadline still decide.
            return recovery.UNKNOWN
        pod = self.kube.get_pod(owner.namespace, owner.pod)  # from the index; asks the API only if it lacks it
        if pod is None or (owner.pod_uid and (pod.get("metadata") or {}).get("uid") != owner.pod_uid):
            return recovery.OwnerState.dead(
                recovery.Cause.POD_DELETED, f"pod {owner.namespace}/{owner.pod} no longer exists")
        # The pod exists: judge it as its watch event would. A pod that died while no controller
        # watched must not wait for the heartbeat lease, since a concurrency policy's admission
        # sweeps first and a stale row must never block it.
        death = self.deaths.death_of(pod)
        if death is not None:
            return recovery.OwnerState.dead(death.cause, death.reason, death.summary)
        live = (pod.get("status") or {}).get("phase") in ("Pending", "Running") and \
            not (pod.get("metadata") or {}).get("deletionTimestamp")
        return recovery.ALIVE if live else recovery.UNKNOWN

    def _ours(self, run: RunRow) -> bool:
        """A pod-owned row outside the watched namespaces is another controller's (or nobody's) business."""
        owner = run.owner
        return not (self.settings.namespaces and owner and owner.kind == "pod"
                    and owner.namespace not in self.settings.namespaces)
