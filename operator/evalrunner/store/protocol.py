"""What the runner needs from a store, in process (DuckDB) or over HTTP."""

from __future__ import annotations

from typing import Protocol, Sequence

from ..models import Cause, RunStatus
from .records import Admission, CaseEvent, RunRequest, RunRow, SaveReport, StrandedCases


class RunStore(Protocol):
    def start_run(self, request: RunRequest) -> Admission: ...

    def get_run(self, run_id: str) -> RunRow | None: ...

    def completed_case_names(self, run_id: str) -> list[str]: ...

    def save_cases(self, events: Sequence[CaseEvent]) -> SaveReport: ...

    def heartbeat(self, run_id: str) -> bool: ...

    def finish_run(
        self,
        run_id: str,
        status: RunStatus,
        cause: str | None = None,
        error: str | None = None,
        unsaved_cases: dict[str, str] | None = None,
        terminated_by: str = "runner",
        case_events: Sequence[CaseEvent] = (),
    ) -> RunRow | None: ...

    def close_from_summary(
        self,
        run_id: str,
        status: RunStatus,
        cause: str | None,
        error: str | None,
        terminated_by: str,
        case_events: Sequence[CaseEvent],
    ) -> RunRow | None: ...

    def terminate_run(self, run_id: str, cause: Cause | str, error: str, terminated_by: str) -> RunRow | None: ...

    def running_runs(self) -> list[RunRow]: ...

    def close_stranded_cases(self, terminated_by: str) -> list[StrandedCases]: ...
