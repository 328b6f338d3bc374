"""Execute one suite invocation and make sure its row terminates.

The shape follows the runbook: cases run concurrently and one case can never
cancel its siblings; the run row is closed in a guarded final write that
never masks the original error; SIGTERM/SIGINT close the run as
`shutdown_requested`. Only process death escapes this, and recovery handles
that from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import log, recovery, summary
from ..admission import RunRefused
from ..models import Case, Cause, RunStatus, Suite
from ..owner import Owner, this_process
from ..scorers import aclose_all, build_scorer
from ..store.duckdb_store import utcnow
from ..store.protocol import RunStore
from ..store.records import CaseEvent, RunRequest, RunRow, case_row_id, clip_output, clip_text
from ..targets import build_target
from ..timing import DEADLINE_GRACE_S, FLUSH_INTERVAL_S, HEARTBEAT_INTERVAL_S
from .case import CaseOutcome, execute_case
from .deadlines import Deadlines
from ..store.thread import StoreThread
from .recorder import CaseRecorder
from .signals import shutdown_signals

FINAL_WRITE_ATTEMPTS = 3
YIELD_EVERY_CASES = 10

Progress = Callable[[str, CaseOutcome], None]


@dataclass(frozen=True)
class RunOptions:
    owner: Owner | None = None
    resume_from: str | None = None  # a run id: carry over its completed cases, run the rest
    run_id: str | None = None  # chosen by the caller (the controller names each attempt's run)
    deadline_grace_s: float = DEADLINE_GRACE_S
    flush_interval_s: float = FLUSH_INTERVAL_S
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    persist: bool = True  # False only for benchmarks: case rows are not written
    source: str | None = None
    search_path: tuple[str, ...] = ()
    # Where the summary goes when the final write fails (a spool file, a termination message);
    # returns a description of where it was left, or None if it could not be kept.
    keep_summary: Callable[[summary.RunSummary], str | None] | None = None
    handle_signals: bool = True
    # In a pod, SIGTERM means the platform is stopping us, and the controller knows why
    # (deleted, evicted, deadline). Give it this long to record that precise cause first.
    shutdown_defer_s: float = 0.0


@dataclass(repr=False)
class RunResult:
    run: RunRow
    outcomes: dict[str, CaseOutcome] = field(default_factory=dict)
    carried: tuple[str, ...] = ()
    replaced: tuple[RunRow, ...] = ()
    shutdown_signal: signal.Signals | None = None
    fenced: bool = False

    def __repr__(self) -> str:
        # Short: asyncio.run formats its task's result into a message as it restores SIGINT, and a repr
        # of ten thousand outcomes took a tenth of a second.
        return f"RunResult(run={self.run.id!r}, status={self.run.status!r}, outcomes={len(self.outcomes)})"


class StatusWriteFailed(Exception):
    """The final status write failed (runbook case 2). Carries the original outcome too, and, for the
    reports a caller still owes its user, the row as opened and the summary of what the run did."""

    def __init__(self, run_id: str, intended: str, reason: str | None, original: BaseException | None,
                 write_error: BaseException, run: RunRow | None = None,
                 unwritten: summary.RunSummary | None = None):
        self.run_id, self.intended, self.reason = run_id, intended, reason
        self.original, self.write_error = original, write_error
        self.run, self.unwritten = run, unwritten
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"run {run_id} ended {intended}{why}, but writing that to the database failed: "
            f"{type(write_error).__name__}: {write_error}. "
            "The row stays `running` until the next evalrunner command (or `evalrunner recover`) closes it."
        )


class ResumeError(ValueError):
    pass


async def run_suite(
    suite: Suite, store: RunStore, options: RunOptions = RunOptions(), progress: Progress | None = None
) -> RunResult:
    invoke = build_target(suite.target, search_path=list(options.search_path))
    score_fns = _scorers(suite, options.search_path)
    worker = StoreThread(store)
    try:
        return await _SuiteRun(suite, worker, options, invoke, score_fns, progress).run()
    finally:
        await invoke.aclose()
        await aclose_all(score_fns.values())
        worker.shutdown()


def _scorers(suite: Suite, search_path: tuple[str, ...]) -> dict[str, Any]:
    built: dict[Any, Any] = {}
    out = {}
    for case in suite.cases:
        spec = suite.scorer_for(case)
        if spec not in built:
            built[spec] = build_scorer(spec, search_path=list(search_path))
        out[case.id] = built[spec]
    return out


class _SuiteRun:
    """One invocation's state. A class only to keep the many collaborators in one place."""

    def __init__(self, suite: Suite, worker: StoreThread, options: RunOptions, invoke: Any, score_fns: dict,
                 progress: Progress | None):
        self.suite = suite
        self.worker = worker
        self.store = worker.store
        self.options = options
        self.invoke = invoke
        self.score_fns = score_fns
        self.progress = progress
        self.outcomes: dict[str, CaseOutcome] = {}
        self.final_events: dict[str, CaseEvent] = {}  # case name -> its final row state, for the summary
        self.started_cases = 0
        self.shutdown_signal: signal.Signals | None = None
        self.cases_task: asyncio.Task[None] | None = None
        self.log = log.get(suite=suite.name)

    async def run(self) -> RunResult:
        carried, to_run = await self._plan()
        request = RunRequest(
            suite=self.suite.name,
            case_names=tuple(c.id for c in to_run),
            timeout_seconds=self.suite.timeout_seconds,
            owner=self.options.owner or this_process(),
            lock_policy=self.suite.lock_policy,
            deadline_grace_seconds=self.options.deadline_grace_s,
            parent_run_id=self.options.resume_from,
            carried_case_names=tuple(carried),
            source=self.options.source,
            run_id=self.options.run_id,
        )
        try:
            admission = await self.worker.call(self.store.start_run, request)
        except RunRefused as exc:
            self.log.warning(log.SUITE_REFUSED, live_run_ids=list(exc.live_run_ids), lock_policy=self.suite.lock_policy.value)
            raise
        run = admission.run
        self.log = log.get(run_id=run.id, suite=self.suite.name)
        for old in admission.replaced:
            signalled = recovery.signal_replaced_owner(old)
            log.get(run_id=old.id, suite=old.suite).warning(
                log.RUN_TERMINATED, status=old.status, cause=old.cause, error=old.error,
                terminated_by="admission", replaced_by=run.id, owner_signalled=signalled,
            )
        self.log.info(
            log.SUITE_STARTED, attempt=run.attempt, parent_run_id=run.parent_run_id, cases=len(to_run),
            carried_over=len(carried), concurrency=self.suite.concurrency, deadline_at=run.deadline_at.isoformat()
            if run.deadline_at else None, owner=run.owner.describe() if run.owner else None,
        )

        recorder = CaseRecorder(
            self.worker, run.id, self.suite.name, on_fenced=self._cancel_cases,
            flush_interval_s=self.options.flush_interval_s,
            heartbeat_interval_s=self.options.heartbeat_interval_s, persist=self.options.persist,
        )
        recorder.start()
        status, cause, error, original = RunStatus.COMPLETED, None, None, None
        self.cases_task = asyncio.create_task(self._run_cases(run.id, to_run, recorder))
        with shutdown_signals(self._on_signal) if self.options.handle_signals else contextlib.nullcontext():
            try:
                await self.cases_task
            except asyncio.CancelledError:
                if self.shutdown_signal is None and not recorder.fenced:
                    raise  # cancelled from outside: not ours to absorb
                status, cause = RunStatus.FAILED, Cause.SHUTDOWN_REQUESTED
                error = f"shutdown requested ({self.shutdown_signal.name})" if self.shutdown_signal else None
            except Exception as exc:  # a bug in the runner itself; the row must still terminate
                status, cause, error, original = RunStatus.FAILED, Cause.RUNNER_ERROR, repr(exc), exc
            finally:
                await recorder.close()

            if self.shutdown_signal is not None and not recorder.fenced and self.options.shutdown_defer_s > 0:
                await self._defer_to_controller(run.id, recorder)
            if recorder.fenced:
                final = await self.worker.call(self.store.get_run, run.id)
                return self._result(final or run, carried, admission.replaced, fenced=True)
            final = await self._write_final(run, status, cause, error, original, recorder)
        return self._result(final, carried, admission.replaced)

    async def _defer_to_controller(self, run_id: str, recorder: CaseRecorder) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + self.options.shutdown_defer_s
        while loop.time() < until:
            try:
                if not await self.worker.call(self.store.heartbeat, run_id):
                    recorder.fenced = True  # closed by the controller with the precise cause
                    return
            except Exception:  # the store is unreachable; our own write below will say so
                return
            await asyncio.sleep(0.2)

    def _result(self, run: RunRow, carried: list[str], replaced: tuple[RunRow, ...], fenced: bool = False) -> RunResult:
        return RunResult(run, dict(self.outcomes), tuple(carried), replaced, self.shutdown_signal, fenced)

    async def _plan(self) -> tuple[list[str], list[Case]]:
        """Which cases to carry over from the run being resumed, and which to run."""
        parent_id = self.options.resume_from
        if not parent_id:
            return [], list(self.suite.cases)
        parent = await self.worker.call(self.store.get_run, parent_id)
        if parent is None:
            raise ResumeError(f"cannot resume: no run with id {parent_id!r}")
        if parent.suite != self.suite.name:
            raise ResumeError(f"cannot resume run {parent_id}: it belongs to suite {parent.suite!r}, not {self.suite.name!r}")
        if parent.status == RunStatus.RUNNING.value:
            raise ResumeError(f"cannot resume run {parent_id}: it is still running ({parent.owner.describe() if parent.owner else 'unknown owner'})")
        done = set(await self.worker.call(self.store.completed_case_names, parent_id))
        carried = [c.id for c in self.suite.cases if c.id in done]
        return carried, [c for c in self.suite.cases if c.id not in done]

    async def _run_cases(self, run_id: str, cases: list[Case], recorder: CaseRecorder) -> None:
        """Run the cases with `concurrency` workers that take them in order.

        A fixed pool rather than a task per case: ten thousand cases cost
        ten thousand task creations and semaphore waits otherwise, several
        times what a no-op case itself costs.
        """
        pending = iter(cases)
        unexpected: list[Exception] = []
        deadlines = Deadlines()
        log_cases = log.per_case_events()

        async def one(case: Case) -> None:
            self.started_cases += 1
            row_id = case_row_id(run_id, case.id)
            started = utcnow()
            recorder.started(row_id, run_id, case.id, started)
            outcome = await execute_case(case, self.invoke, self.score_fns[case.id], self.suite.timeout_seconds,
                                         deadlines)
            self.outcomes[case.id] = outcome
            final = CaseEvent(
                row_id, run_id, case.id, outcome.status.value, started, utcnow(), clip_text(outcome.error),
                outcome.cause.value if outcome.cause else None, outcome.passed, outcome.score,
                clip_output(outcome.output), clip_text(outcome.detail), outcome.duration_ms,
                outcome.usage.prompt_tokens, outcome.usage.completion_tokens, outcome.usage.total_tokens,
            )
            self.final_events[case.id] = final
            recorder.record(final)
            if log_cases:
                event = log.CASE_COMPLETED if outcome.status is RunStatus.COMPLETED else log.CASE_FAILED
                self.log.info(event, case_id=row_id, case=case.id, verdict=outcome.verdict, score=outcome.score,
                              cause=outcome.cause.value if outcome.cause else None, error=outcome.error,
                              duration_ms=round(outcome.duration_ms, 2))
            if self.progress:
                self.progress(case.id, outcome)

        async def worker() -> None:
            for done, case in enumerate(pending, 1):
                try:
                    await one(case)
                except Exception as exc:  # one case's unexpected exception cannot stop its siblings
                    unexpected.append(exc)
                if done % YIELD_EVERY_CASES == 0:
                    # A target that never suspends would hold the event loop for the whole run: no group
                    # commit, no heartbeat, no signal handling until the last case. Let them run.
                    await asyncio.sleep(0)

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.suite.concurrency, len(cases)))))
        finally:
            await deadlines.aclose()
        if unexpected:
            raise unexpected[0]

    async def _write_final(self, run: RunRow, status: RunStatus, cause: Cause | None, error: str | None,
                           original: BaseException | None, recorder: CaseRecorder) -> RunRow:
        """The guarded final write: retried briefly, and its failure never hides the original error.

        It carries the case results whose saves failed, so they land with the
        close; if it fails, the summary left for recovery carries all of them.
        """
        cause_value = cause.value if cause else None
        last_error: BaseException | None = None
        for attempt in range(FINAL_WRITE_ATTEMPTS):
            try:
                # The reasons go along too: a store too old to take the events still fails those rows
                # as `case_save_failed` rather than leave them running.
                final = await self.worker.call(
                    self.store.finish_run, run.id, status, cause_value, error, dict(recorder.unsaved),
                    case_events=recorder.unsaved_events(),
                )
                break
            except Exception as exc:
                last_error = exc
                if attempt + 1 < FINAL_WRITE_ATTEMPTS:
                    await asyncio.sleep(0.1 * 3**attempt)
        else:
            assert last_error is not None
            unwritten = summary.RunSummary(
                run.id, self.suite.name, status.value, cause_value, error, *_counts(self.outcomes),
                write_error=f"{type(last_error).__name__}: {last_error}",
                cases=tuple(summary.CaseResult.from_event(ev) for ev in self.final_events.values()),
            )
            kept = self.options.keep_summary(unwritten) if self.options.keep_summary else None
            self.log.error(
                log.SUITE_STATUS_WRITE_FAILED, intended_status=status.value, cause=cause_value,
                original_error=repr(original) if original else error, summary_kept_at=kept,
                exc_info=last_error,
            )
            reason = f"{cause_value}: {error}" if cause_value else error
            raise StatusWriteFailed(run.id, status.value, reason, original, last_error, run=run,
                                    unwritten=unwritten) from last_error

        if final is None:
            final = await self.worker.call(self.store.get_run, run.id) or run
            # An attempt that reported an error may still have committed (a checkpoint failing after the
            # commit); the retry then finds our own close. Anyone else's close stands, and fences us.
            ours = final.terminated_by == "runner" and final.status == status.value and final.cause == cause_value
            if not ours:
                self.log.warning(log.RUN_FENCED, reason="run was already terminal at the final write",
                                 status=final.status, cause=final.cause)
                return final
        fields = dict(status=final.status, cause=final.cause, error=final.error, passed=final.passed,
                      failed=final.failed, errored=final.errored, attempt=final.attempt)
        if final.status == RunStatus.COMPLETED.value:
            self.log.info(log.SUITE_COMPLETED, **fields)
        else:
            self.log.error(log.SUITE_FAILED, **fields)
        return final

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.shutdown_signal is not None:
            self.log.warning(log.SHUTDOWN_REQUESTED, signal=sig.name, note="already shutting down")
            return
        self.shutdown_signal = sig
        self.log.warning(log.SHUTDOWN_REQUESTED, signal=sig.name, in_flight=self._in_flight())
        self._cancel_cases()

    def _cancel_cases(self) -> None:
        if self.cases_task is not None and not self.cases_task.done():
            self.cases_task.cancel()

    def _in_flight(self) -> int:
        return self.started_cases - len(self.outcomes)


def _counts(outcomes: dict[str, CaseOutcome]) -> tuple[int, int, int]:
    passed = sum(1 for o in outcomes.values() if o.verdict == "pass")
    failed = sum(1 for o in outcomes.values() if o.verdict == "fail")
    errored = sum(1 for o in outcomes.values() if o.verdict == "error")
    return passed, failed, errored
