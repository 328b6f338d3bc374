"""The runner's store when a store service owns the database (cluster mode).

Same interface as DuckDBStore (store.protocol.RunStore), spoken over the
service's versioned HTTP API with a bearer token. Every call is idempotent,
so transport failures are retried; a start without a run id gets one here,
before the first try, so a retried start cannot open two runs.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

from .. import admission
from ..faults import Faults
from ..models import Cause, RunStatus
from . import wire
from .duckdb_store import new_run_id, utcnow
from .errors import StoreError
from .records import Admission, CaseEvent, RunRequest, RunRow, SaveReport, StrandedCases

# Every call is idempotent, so a server-side failure (a transient DuckDB
# conflict, a restarting controller behind its Service) is retried too.
RETRYABLE_STATUS = {500, 502, 503, 504}


class StoreServiceError(StoreError):
    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


class HttpStore:
    def __init__(self, base_url: str, token: str | None, timeout_s: float = 10.0, retry_for_s: float = 20.0,
                 faults: Faults | None = None):
        self.base_url = base_url.rstrip("/")
        self.path = self.base_url  # for messages; there is no local file
        self.token = token
        self.timeout_s = timeout_s
        self.retry_for_s = retry_for_s
        # The runner's own writes fail here under EVALRUNNER_FAULTS, as DuckDBStore's do locally
        # (the service's process does not see the runner pod's environment).
        self.faults = faults if faults is not None else Faults.from_env()

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
        run_id = events[0].run_id
        body = {"events": [wire.case_event_to_json(ev) for ev in events]}
        return wire.save_report_from_json(self._call("POST", f"/runs/{run_id}/cases", body))

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
        body = {"status": status.value, "cause": cause, "error": error, "unsaved_cases": unsaved_cases or {},
                "case_events": wire.case_events_to_json(case_events)}
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

    # ------------------------------------------------------------ transport

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        url = f"{self.base_url}{wire.API_PREFIX}{path}"
        payload = json.dumps(body).encode() if body is not None else None
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.1
        while True:
            req = urllib.request.Request(url, data=payload, method=method)
            req.add_header("Content-Type", "application/json")
            if self.token:
                req.add_header("Authorization", f"Bearer {self.token}")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read() or b"null")
            except urllib.error.HTTPError as exc:
                detail = _error_body(exc)
                if exc.code in RETRYABLE_STATUS and time.monotonic() < deadline:
                    pass
                elif exc.code == 409 and detail.get("kind") == "refused":
                    raise admission.RunRefused(
                        detail.get("suite", "?"), detail.get("live_run_ids", []), detail.get("owners", [])
                    ) from None
                else:
                    raise StoreServiceError(
                        f"store service {method} {path}: HTTP {exc.code}: {detail.get('error', exc.reason)}", exc.code
                    ) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise StoreServiceError(f"store service at {self.base_url} unreachable: {exc}") from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _error_body(exc: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        data = json.loads(exc.read() or b"{}")
        return data if isinstance(data, dict) else {}
    except (ValueError, OSError):
        return {}
