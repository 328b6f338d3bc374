"""Reading back what `builders` wrote on a runner pod or Job: which run, suite and EvalRun it serves.

The pod template carries the same annotations as its Job, so a pod alone
names its run, the run it resumes and its EvalRun in full (a label value is
cut at 63 characters; the annotation is not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..scope import Scope
from ..timing import START_TIMEOUT_S
from . import builders

FINISHED_JOB_CONDITIONS = ("Complete", "Failed")


@dataclass(frozen=True)
class RunnerPod:
    namespace: str
    name: str
    uid: str | None
    run_id: str
    evalrun: str  # the EvalRun's full name
    suite: str | None
    parent_run_id: str | None
    job_name: str | None
    start_timeout_s: float

    @classmethod
    def of(cls, pod: dict[str, Any]) -> RunnerPod | None:
        """The runner pod's identity, or None for a pod that is not one of ours."""
        meta = pod.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        labels = meta.get("labels") or {}
        run_id = annotations.get(builders.ANNOTATION_RUN_ID)
        evalrun = annotations.get(builders.ANNOTATION_EVALRUN) or labels.get(builders.LABEL_EVALRUN)
        if not run_id or not evalrun or not meta.get("namespace"):
            return None
        try:
            start_timeout = float(annotations.get(builders.ANNOTATION_START_TIMEOUT, START_TIMEOUT_S))
        except ValueError:
            start_timeout = float(START_TIMEOUT_S)
        return cls(
            namespace=meta["namespace"],
            name=meta.get("name", ""),
            uid=meta.get("uid"),
            run_id=run_id,
            evalrun=evalrun,
            suite=labels.get(builders.LABEL_SUITE),
            parent_run_id=annotations.get(builders.ANNOTATION_PARENT_RUN_ID),
            job_name=labels.get("batch.kubernetes.io/job-name") or labels.get("job-name"),
            start_timeout_s=start_timeout,
        )


@dataclass(frozen=True)
class RunnerJob:
    namespace: str
    name: str
    run_id: str
    parent_run_id: str | None
    suite: str | None
    scope: Scope | None  # the EvalRun that owns it
    finished: bool
    deadline_exceeded: bool

    @classmethod
    def of(cls, job: dict[str, Any]) -> RunnerJob | None:
        meta = job.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        run_id = annotations.get(builders.ANNOTATION_RUN_ID)
        if not run_id or not meta.get("namespace"):
            return None
        owner = next((ref for ref in meta.get("ownerReferences") or [] if ref.get("controller")), None)
        evalrun = annotations.get(builders.ANNOTATION_EVALRUN) or (owner or {}).get("name")
        scope = Scope(meta["namespace"], evalrun, owner["uid"]) if owner and evalrun else None
        conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
        return cls(
            namespace=meta["namespace"],
            name=meta.get("name", ""),
            run_id=run_id,
            parent_run_id=annotations.get(builders.ANNOTATION_PARENT_RUN_ID),
            suite=(meta.get("labels") or {}).get(builders.LABEL_SUITE),
            scope=scope,
            finished=any(c.get("type") in FINISHED_JOB_CONDITIONS for c in conditions),
            deadline_exceeded=any(c.get("type") == "Failed" and c.get("reason") == "DeadlineExceeded"
                                  for c in conditions),
        )
