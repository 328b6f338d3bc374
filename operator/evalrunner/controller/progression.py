"""An EvalRun's progression: admit, start, retry; then its status, rebuilt from the rows.

The decisions are pure: `wanted_attempt` says which attempt of a suite should
exist now, from its latest row; `attempt_step` says what to do about that
attempt, from its Job. `Progression.reconcile` reads the world, applies each
suite's step and rebuilds the status (`status.build_status`), patching only
what changed. Every reconcile may be a repeat (kopf re-lists everything on a
restart): child names are fixed, so a second create is a 409, and run ids are
a function of (EvalRun uid, suite, attempt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError

from .. import admission, log, recovery
from ..models import MAX_RETRIES, Cause, EvalRunSpec, EvalRunSuite
from ..owner import Owner
from ..scope import Scope, lock_domain
from ..store.duckdb_store import DuckDBStore, utcnow
from ..store.records import RunRow
from . import builders, status
from .children import RunnerJob
from .deaths import Deaths, failed_start_request, suite_in
from .kube import Kube
from .queue import ReconcileQueue
from .sweep import Sweeper

TERMINATED_BY = "controller"


# ---------------------------------------------------------------- the decisions


@dataclass(frozen=True)
class Attempt:
    number: int
    parent_run_id: str | None  # the failed attempt it resumes


@dataclass(frozen=True)
class Start:
    """Create the attempt's Job (admitting the suite first, for attempt 1)."""

    attempt: Attempt


@dataclass(frozen=True)
class CloseLost:
    """The attempt's Job finished, but its runner never opened the run: record the attempt as failed."""

    attempt: Attempt
    job: RunnerJob


@dataclass(frozen=True)
class Wait:
    """The attempt's pod is on its way (or being torn down); its events will say more."""


Step = Start | CloseLost | Wait


def wanted_attempt(latest: RunRow | None, retries: int) -> Attempt | None:
    """The attempt that should exist now and has no row yet: the first, or the retry of a failed one."""
    if latest is None:
        return Attempt(1, None)
    if status.should_retry(latest, retries):
        return Attempt(latest.attempt + 1, latest.id)
    return None  # running, completed, or failed for good


def attempt_step(attempt: Attempt, job: RunnerJob | None) -> Step:
    if job is None:
        return Start(attempt)
    if job.finished:
        return CloseLost(attempt, job)
    return Wait()


@dataclass(frozen=True)
class LiveAttempt:
    """Another EvalRun's live attempt of the same suite: a running row, or a Job whose runner has not opened one."""

    run_id: str
    scope: Scope | None
    row: RunRow | None
    job: RunnerJob | None


# ---------------------------------------------------------------- applying them


@dataclass(frozen=True)
class ProgressionSettings:
    store_url_for_pods: str
    runner_image: str = builders.DEFAULT_RUNNER_IMAGE  # for EvalRuns that name none
    token_audience: str = builders.DEFAULT_TOKEN_AUDIENCE  # of the store token projected into runner pods


class Progression:
    def __init__(self, store: DuckDBStore, kube: Kube, deaths: Deaths, sweeper: Sweeper, queue: ReconcileQueue,
                 settings: ProgressionSettings, clock: Callable = utcnow):
        self.store = store
        self.kube = kube
        self.deaths = deaths
        self.sweeper = sweeper
        self.queue = queue
        self.settings = settings
        self.clock = clock
        self._refusals: dict[tuple[Scope, str], str] = {}  # (EvalRun, suite) -> why its policy refused it
        self.log = log.get(component="controller")

    def reconcile(self, namespace: str, name: str) -> None:
        """Start due attempts of the EvalRun, then rebuild its status and post Events for what changed."""
        evalrun = self.kube.get_evalrun(namespace, name)
        if evalrun is None:
            return  # deleted: its children are garbage-collected, its rows stay
        spec = self._spec(evalrun)
        if spec is None:
            return
        scope = Scope.of(evalrun)
        finished = status.finished_entries(evalrun)
        for suite in spec.suites:
            if self._refusal(evalrun, scope, suite.name):
                continue
            latest = self._latest_row(scope, suite.name)
            if latest is None and suite.name in finished:
                continue  # it ran; retention deleted its rows since
            attempt = wanted_attempt(latest, spec.retries)
            if attempt is None:
                continue
            job = self.kube.get_job(namespace, builders.job_name(name, suite.name, attempt.number))
            step = attempt_step(attempt, RunnerJob.of(job) if job else None)
            if isinstance(step, Start):
                self._start(evalrun, spec, suite, step.attempt)
            elif isinstance(step, CloseLost):
                self._close_lost(evalrun, suite, step)
        self._publish_status(evalrun, spec, scope)

    def forget(self, scope: Scope) -> None:
        """The EvalRun is deleted: drop what was remembered of it (a new one of the same name is another EvalRun)."""
        self._refusals = {key: why for key, why in self._refusals.items() if key[0] != scope}

    # ------------------------------------------------------------ reading the world

    def _spec(self, evalrun: dict[str, Any]) -> EvalRunSpec | None:
        meta = evalrun["metadata"]
        try:
            return EvalRunSpec.model_validate(evalrun.get("spec") or {})
        except ValidationError as exc:  # the CRD schema lets through only what pydantic adds on top
            old = evalrun.get("status") or {}
            new = {"phase": "Failed", "observedGeneration": meta.get("generation")}
            if status.status_patch(old, {**old, **new}) is not None:
                self.kube.patch_status(meta["namespace"], meta["name"], new)
                self.kube.post_event(evalrun, "Warning", "InvalidSpec", str(exc)[:1024])
            return None

    def _latest_row(self, scope: Scope, suite: str) -> RunRow | None:
        """The suite's latest attempt that has a row (by the run ids the controller assigns).

        Only a row of this EvalRun's scope counts: a row of the same id under another
        scope is not this suite's attempt, whoever made it.
        """
        ids = [builders.run_id_for(scope.uid, suite, n) for n in range(1, MAX_RETRIES + 2)]
        return self.store.latest_attempt(ids, scope)

    def _refusal(self, evalrun: dict[str, Any], scope: Scope, suite: str) -> str | None:
        """Why the suite's concurrency policy refused it, remembered or read back from this EvalRun's status."""
        if (scope, suite) in self._refusals:
            return self._refusals[(scope, suite)]
        for entry in (evalrun.get("status") or {}).get("suites", []):
            if entry.get("name") == suite and str(entry.get("message", "")).startswith(status.REFUSED_PREFIX):
                self._refusals[(scope, suite)] = entry["message"]
                return entry["message"]
        return None

    # ------------------------------------------------------------ steps

    def _start(self, evalrun: dict[str, Any], spec: EvalRunSpec, suite: EvalRunSuite, attempt: Attempt) -> None:
        try:  # before admission: a suite that cannot start must not replace another's run
            configmap = builders.build_suite_configmap(evalrun, spec, suite)
        except builders.SuiteTooLarge as exc:
            self._refuse_invalid(evalrun, suite.name, str(exc))
            return
        if attempt.number == 1 and not self._admit(evalrun, spec, suite):
            return
        if configmap is not None:
            self.kube.create_owned(configmap, evalrun)
        job = builders.build_job(evalrun, suite, attempt.number, attempt.parent_run_id,
                                 self.settings.store_url_for_pods, spec,
                                 case_count=len(suite.cases) if suite.cases else None,
                                 case_timeout_seconds=suite.timeout_seconds or 30.0,
                                 default_image=self.settings.runner_image,
                                 token_audience=self.settings.token_audience)
        _, created = self.kube.create_owned(job, evalrun)
        if not created:
            return
        run_id = builders.run_id_for(evalrun["metadata"]["uid"], suite.name, attempt.number)
        if attempt.parent_run_id:
            self.kube.post_event(evalrun, "Normal", "Retrying", f"suite {suite.name}: attempt {attempt.number} "
                                                                f"(run {run_id}) resumes run {attempt.parent_run_id}")
        else:
            self.kube.post_event(evalrun, "Normal", "Started",
                                 f"suite {suite.name}: Job {job['metadata']['name']} created for run {run_id}")

    def _close_lost(self, evalrun: dict[str, Any], suite: EvalRunSuite, step: CloseLost) -> None:
        """A finished Job with no row: its pod tells how it died; with no pod left, the Job does."""
        job = step.job
        pods = self.kube.job_pods(job.namespace, job.name)
        for pod in pods:
            self.deaths.on_pod(pod, None)
        if pods:
            return
        if job.deadline_exceeded:
            cause, reason = Cause.DEADLINE_EXCEEDED, f"Job {job.name} exceeded its deadline before its runner started"
        else:
            cause, reason = Cause.POD_DELETED, (f"the pod of Job {job.name} is gone and its runner never opened "
                                                f"its run (the Job failed)")
        request = failed_start_request(Scope.of(evalrun), suite, suite.name, job.run_id, step.attempt.parent_run_id,
                                       Owner(kind="pod", namespace=job.namespace))
        closed = self.store.record_failed_start(request, cause.value, reason, TERMINATED_BY)
        if closed is not None:
            recovery.log_terminated(closed, TERMINATED_BY)
            self.deaths.announce(closed, reason)
            self.queue.mark_scope(closed.scope)  # its retry, if it has one, is the next round's step

    # ------------------------------------------------------------ the suite lock

    def _admit(self, evalrun: dict[str, Any], spec: EvalRunSpec, suite: EvalRunSuite) -> bool:
        """Apply the suite's concurrency policy against other EvalRuns' live attempts of it in this namespace.

        Stale rows are swept first, so they never block. Live attempts are
        running rows and Jobs whose runner has not opened its row yet: two
        EvalRuns created at once see each other's Jobs. Forbid records a
        refusal; Replace closes the live attempts and deletes their Jobs.
        """
        scope = Scope.of(evalrun)
        self.sweeper.sweep(suite=suite.name, namespace=scope.namespace)
        live = self._live_attempts(scope, suite.name)
        decision = admission.decide(spec.policy_for(suite), [a.run_id for a in live])
        if not decision.admit:
            self._refuse(evalrun, scope, suite.name, live)
            return False
        if decision.replace:
            self._replace(evalrun, suite.name, [a for a in live if a.run_id in decision.replace])
        return True

    def _live_attempts(self, scope: Scope, suite: str) -> list[LiveAttempt]:
        jobs = [job for job in map(RunnerJob.of, self.kube.suite_jobs(scope.namespace, suite))
                if job is not None and job.scope != scope]
        job_of_run = {job.run_id: job for job in jobs}
        rows = [r for r in self.store.running_runs()
                if r.suite == suite and r.scope != scope and lock_domain(r.scope) == scope.namespace]
        live = [LiveAttempt(r.id, r.scope, r, job_of_run.get(r.id)) for r in rows]
        seen = {r.id for r in rows}
        for job in jobs:
            if job.run_id not in seen and not job.finished and self.store.get_run(job.run_id) is None:
                live.append(LiveAttempt(job.run_id, job.scope, None, job))
        return live

    def _refuse(self, evalrun: dict[str, Any], scope: Scope, suite: str, live: list[LiveAttempt]) -> None:
        ids = ", ".join(a.run_id for a in live)
        message = f"{status.REFUSED_PREFIX} suite {suite} is already running ({ids}); concurrencyPolicy Forbid"
        self._refusals[(scope, suite)] = message
        self.kube.post_event(evalrun, "Warning", "Refused", message)
        log.get(suite=suite).warning(log.SUITE_REFUSED, evalrun=f"{scope.namespace}/{scope.name}",
                                     live_run_ids=[a.run_id for a in live])

    def _refuse_invalid(self, evalrun: dict[str, Any], suite: str, why: str) -> None:
        """A suite the API server would not let start: failed for good, like a refusal, with why and what to do."""
        message = f"{status.REFUSED_PREFIX} {why}"
        self._refusals[(Scope.of(evalrun), suite)] = message
        self.kube.post_event(evalrun, "Warning", "InvalidSpec", message)

    def _replace(self, evalrun: dict[str, Any], suite: str, live: list[LiveAttempt]) -> None:
        meta = evalrun["metadata"]
        why = f"replaced by EvalRun {meta['namespace']}/{meta['name']}"
        for attempt in live:
            closed = self._close_replaced(attempt, suite, why)
            if closed is not None:
                recovery.log_terminated(closed, TERMINATED_BY)
                self.deaths.announce(closed, why)
            if attempt.job is not None:
                self.kube.delete_job(attempt.job.namespace, attempt.job.name)
            elif attempt.row is not None and attempt.row.owner and attempt.row.owner.kind == "pod" \
                    and attempt.row.owner.namespace and attempt.row.owner.pod:
                self.kube.delete_pod(attempt.row.owner.namespace, attempt.row.owner.pod)
            self.queue.mark_scope(attempt.scope)
        self.kube.post_event(evalrun, "Normal", "Replaced",
                             f"suite {suite}: replaced live run(s) {', '.join(a.run_id for a in live)}")

    def _close_replaced(self, attempt: LiveAttempt, suite: str, why: str) -> RunRow | None:
        if attempt.row is None and attempt.job is not None and attempt.scope is not None:
            other = self.kube.get_evalrun(*attempt.scope.evalrun)
            request = failed_start_request(attempt.scope, suite_in(other, suite), suite, attempt.run_id,
                                           attempt.job.parent_run_id, Owner(kind="pod", namespace=attempt.job.namespace))
            closed = self.store.record_failed_start(request, Cause.REPLACED.value, why, TERMINATED_BY)
            if closed is not None:
                return closed
            # Its runner opened the run meanwhile: close that instead.
        return self.store.terminate_run(attempt.run_id, Cause.REPLACED, why, TERMINATED_BY)

    # ------------------------------------------------------------ status

    def _publish_status(self, evalrun: dict[str, Any], spec: EvalRunSpec, scope: Scope) -> None:
        meta = evalrun["metadata"]
        states = []
        finished = status.finished_entries(evalrun)
        for suite in spec.suites:
            latest = self._latest_row(scope, suite.name)
            attempt = latest.attempt if latest else 1
            states.append(status.SuiteState(suite.name, latest, builders.job_name(meta["name"], suite.name, attempt),
                                            self._refusal(evalrun, scope, suite.name),
                                            expired=finished.get(suite.name) if latest is None else None))
        old = evalrun.get("status") or {}
        new = status.build_status(spec, meta.get("generation"), states, old, self.clock())
        patch = status.status_patch(old, new)
        if patch is None:
            return
        self.kube.patch_status(meta["namespace"], meta["name"], patch)
        self.log.info("controller.status_patched", evalrun=f"{meta['namespace']}/{meta['name']}",
                      phase=new["phase"], keys=sorted(patch))
        for kind, reason, message in status.transitions(old, new):
            self.kube.post_event(evalrun, kind, reason, message)
