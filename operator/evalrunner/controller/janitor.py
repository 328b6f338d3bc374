"""Finished runner Jobs are deleted once their rows are closed, so what the API server holds stays bounded.

Kubernetes keeps a finished Job and its pod until someone deletes them;
left alone, every run of a night adds two objects that every listing
carries forever. A Job's own `ttlSecondsAfterFinished` would delete it
whatever its row says, and a pod gone before the controller saw it die
would turn an OOM kill into a plain `pod_deleted`. So the controller deletes
a finished Job itself, `job_ttl_s` after it finished, and only once its run
row is terminal. The rows, which are the record, stay.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Callable

from .. import log
from ..models import RunStatus
from ..store.duckdb_store import DuckDBStore, utcnow
from .children import FINISHED_JOB_CONDITIONS, RunnerJob
from .classify import parse_time


def finished_at(job: dict[str, Any]) -> datetime | None:
    """When the Job finished: its Complete/Failed condition's transition (or completionTime); None if running."""
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") in FINISHED_JOB_CONDITIONS and condition.get("status") == "True":
            return parse_time(condition.get("lastTransitionTime") or status.get("completionTime"))
    return None


class Janitor:
    def __init__(self, store: DuckDBStore, kube: Any, job_ttl_s: float | None, clock: Callable = utcnow):
        self.store = store
        self.kube = kube
        self.job_ttl_s = job_ttl_s
        self.clock = clock
        self.log = log.get(component="controller")

    def collect(self, namespaces: tuple[str, ...] = ()) -> list[str]:
        """Delete the finished Jobs past their time whose rows are closed; returns their names."""
        if self.job_ttl_s is None or not hasattr(self.kube, "index"):
            return []  # without the index, finding them would cost a listing each round
        cutoff = self.clock() - timedelta(seconds=self.job_ttl_s)
        deleted = []
        for job in self.kube.index.all("jobs", namespaces):
            ended = finished_at(job)
            ref = RunnerJob.of(job)
            if ended is None or ended > cutoff or ref is None:
                continue
            row = self.store.get_run(ref.run_id)
            if row is None or row.status == RunStatus.RUNNING.value:
                continue  # its row is not closed yet: the sweep or the progression will see to it first
            self.kube.delete_job(ref.namespace, ref.name)
            deleted.append(f"{ref.namespace}/{ref.name}")
        if deleted:
            self.log.info("controller.jobs_deleted", count=len(deleted), jobs=deleted[:20], ttl_s=self.job_ttl_s)
        return deleted
