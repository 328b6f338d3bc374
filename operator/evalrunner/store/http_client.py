"""The runner's store when a store service owns the database (cluster mode).

Same interface as DuckDBStore (store.protocol.RunStore), spoken over the
service's versioned HTTP API with a bearer token. Every call is idempotent,
so transport failures are retried; a start without a run id gets one here,
before the first try, so a retried start cannot open two runs.

Retries (`retry.py`, shared with the model calls): 408, 429 and 5xx replies
(a busy service answers 503 with `Retry-After`) and connection errors are
tried again after the wait the reply asks for, else exponential backoff
with jitter, for at most `retry_for_s` in all; then the call fails.

A batch of case results refused as too large (413) is split in halves, each
sent on its own (and split again if need be); a single case event still
refused fails that case alone (`case_save_failed`), never its batch. The
final write does the same with the case results it carries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence

from .. import admission, retry
from ..faults import Faults
from ..models import Cause, RunStatus
from . import wire
from .duckdb_store import new_run_id, utcnow
from .errors import StoreError
from .records import Admission, CaseEvent, CaseRow, RunRequest, RunRow, SaveReport, StrandedCases

# Every call is idempotent, so a server-side failure (a transient DuckDB conflict, a restarting
# controller behind its Service, a full queue) is retried too: retry.is_retryable_status.
# The store answers in milliseconds, so the backoff starts lower than a model call's.
BACKOFF = retry.Backoff(base_s=0.1, max_s=2.0)


class StoreServiceError(StoreError):
    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


class _RetryableReply(retry.Retryable):
    def __init__(self, message: str, retry_after_s: float | None, status: int):
        super().__init__(message, retry_after_s)
        self.status = status


class TokenFile:
    """A bearer token kept in a file that may be replaced (the kubelet swaps a symlink): read on change."""

    def __init__(self, path: str):
        self.path = path
        self._seen: tuple[float, int] | None = None
        self._token = ""

    def read(self) -> str:
        try:
            st = os.stat(self.path)
            if (st.st_mtime, st.st_ino) != self._seen:
                with open(self.path, encoding="utf-8") as f:
                    self._token = f.read().strip()
                self._seen = (st.st_mtime, st.st_ino)
        except OSError as exc:
            raise StoreServiceError(f"cannot read the store token file {self.path}: {exc}") from None
        return self._token


class HttpStore:
    def __init__(self, base_url: str, token: str | None, timeout_s: float = 10.0, retry_for_s: float = 20.0,
                 faults: Faults | None = None, backoff: retry.Backoff = BACKOFF,
                 sleep: Callable[[float], None] = time.sleep, token_file: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.path = self.base_url  # for messages; there is no local file
        self.token = token
        # A runner pod's token is a file the kubelet rotates: read it again whenever it changed.
        self._token_file = TokenFile(token_file) if token_file else None
        self.timeout_s = timeout_s
        self.retry_for_s = retry_for_s
        # The runner's own writes fail here under EVALRUNNER_FAULTS, as DuckDBStore's do locally
        # (the service's process does not see the runner pod's environment).
        self.faults = faults if faults is not None else Faults.from_env()
        self.backoff = backoff
        self.sleep = sleep
        self.retries = 0  # calls tried again, since this client was made (for tests and the benchmark)

    # ------------------------------------------------------------ RunStore

    def start_run(self, request: RunRequest) -> Admission:
        if request.run_id is None:
            request = dataclasses.replace(request, run_id=new_run_id(utcnow()))
        data = self._call("POST", "/runs", wire.run_request_to_json(request))
        return wire.admission_from_json(data)

    def get_run(self, run_id: str) -> RunRow | None:
        try:
            return wire.run_row_from_json(self._call("GET", f"/runs/{run_id}"))
        except StoreServiceError as exc:
            if exc.status == 404:
                return None
            raise

    def completed_case_names(self, run_id: str) -> list[str]:
        return list(self._call("GET", f"/runs/{run_id}/completed-cases")["names"])

    def save_cases(self, events: Sequence[CaseEvent]) -> SaveReport:
        if not events:
            return SaveReport()
        latest = list({ev.row_id: ev for ev in events}.values())
        body = {"events": [wire.case_event_to_json(ev) for ev in latest]}
        try:
            return wire.save_report_from_json(self._call("POST", f"/runs/{latest[0].run_id}/cases", body))
        except StoreServiceError as exc:
            if exc.status != 413:
                raise
            if len(latest) == 1:
                return SaveReport(failures={latest[0].row_id: str(exc)})
        half = len(latest) // 2
        first, second = self.save_cases(latest[:half]), self.save_cases(latest[half:])
        return SaveReport(failures={**first.failures, **second.failures}, fenced=first.fenced or second.fenced)

    def heartbeat(self, run_id: str) -> bool:
        return bool(self._call("POST", f"/runs/{run_id}/heartbeat", {})["alive"])

    def finish_run(
        self,
        run_id: str,
        status: RunStatus,
        cause: str | None = None,
        error: str | None = None,
        unsaved_cases: dict[str, str] | None = None,
        terminated_by: str = "runner",
        case_events: Sequence[CaseEvent] = (),
    ) -> RunRow | None:
        self.faults.check("suite_status_write")
        unsaved = dict(unsaved_cases or {})
        body = {"status": status.value, "cause": cause, "error": error, "unsaved_cases": unsaved,
                "case_events": wire.case_events_to_json(case_events)}
        try:
            data = self._call("POST", f"/runs/{run_id}/finish", body)
        except StoreServiceError as exc:
            if exc.status != 413 or not case_events:
                raise
            # Too large with its case results: save them first (split as need be), then close without
            # them; a case whose result is refused even alone is closed as case_save_failed.
            report = self.save_cases(case_events)
            unsaved.update(report.failures)
            for ev in case_events:
                if ev.row_id not in report.failures:
                    unsaved.pop(ev.row_id, None)
            body = {**body, "unsaved_cases": unsaved, "case_events": []}
            data = self._call("POST", f"/runs/{run_id}/finish", body)
        return wire.run_row_from_json(data["run"]) if data.get("applied") else None

    def terminate_run(self, run_id: str, cause: Cause | str, error: str, terminated_by: str) -> RunRow | None:
        raise StoreServiceError("runner tokens cannot terminate runs; the controller does that")

    def close_from_summary(self, run_id: str, status: RunStatus, cause: str | None, error: str | None,
                           terminated_by: str, case_events: Sequence[CaseEvent]) -> RunRow | None:
        raise StoreServiceError("runner tokens cannot close runs from a summary; the controller does that")

    def running_runs(self) -> list[RunRow]:
        return []  # orphans are the controller's business in cluster mode

    def close_stranded_cases(self, terminated_by: str) -> list[StrandedCases]:
        return []  # and so is repairing case rows

    def close(self) -> None:
        pass

    # ------------------------------------------------------------ the CLI through a local server

    def cases(self, run_id: str) -> list[CaseRow]:
        return [wire.case_row_from_json(c) for c in self._call("GET", f"/runs/{run_id}/cases")["cases"]]

    def find_runs_by_prefix(self, prefix: str) -> list[RunRow]:
        runs = [wire.run_row_from_json(r) for r in self._call("GET", "/runs?limit=500")["runs"]]
        return [r for r in runs if r.id.startswith(prefix)]

    def run_cli(self, argv: list[str]) -> dict[str, Any]:
        """Run an `evalrunner` command inside the server that holds the database (service/local_cli.py)."""
        return self._call("POST", "/local/cli", {"argv": argv})

    # ------------------------------------------------------------ transport

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        """One API call, tried again on a retryable failure until `retry_for_s` is spent."""
        payload = json.dumps(body).encode() if body is not None else None
        deadline = time.monotonic() + self.retry_for_s
        tries = 0
        while True:
            tries += 1
            try:
                return self._attempt(method, path, payload)
            except retry.Retryable as exc:
                delay = self.backoff.delay_s(tries - 1, exc.retry_after_s)
                if time.monotonic() + delay > deadline:
                    raise StoreServiceError(
                        f"{exc} (gave up after {tries} attempt{'s' if tries > 1 else ''} in "
                        f"{self.retry_for_s:g}s)", exc.status if isinstance(exc, _RetryableReply) else None) from None
            self.retries += 1
            self.sleep(delay)

    def _attempt(self, method: str, path: str, payload: bytes | None) -> Any:
        req = urllib.request.Request(f"{self.base_url}{wire.API_PREFIX}{path}", data=payload, method=method)
        req.add_header("Content-Type", "application/json")
        token = self._token_file.read() if self._token_file else self.token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = _error_body(exc)
            message = f"store service {method} {path}: HTTP {exc.code}: {detail.get('error', exc.reason)}"
            if retry.is_retryable_status(exc.code):
                asked = retry.retry_after_s({k.lower(): v for k, v in exc.headers.items()})
                raise _RetryableReply(message, asked, exc.code) from None
            if exc.code == 409 and detail.get("kind") == "refused":
                raise admission.RunRefused(
                    detail.get("suite", "?"), detail.get("live_run_ids", []), detail.get("owners", [])
                ) from None
            raise StoreServiceError(message, exc.code) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise retry.Retryable(f"store service at {self.base_url} unreachable: {exc}") from None


def _error_body(exc: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        data = json.loads(exc.read() or b"{}")
        return data if isinstance(data, dict) else {}
    except (ValueError, OSError):
        return {}
