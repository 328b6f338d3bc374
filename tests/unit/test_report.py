"""What `evalrunner run` and `show` print for a run's cases."""

from __future__ import annotations

from datetime import UTC, datetime

from evalrunner.report import run_summary_text
from evalrunner.store.records import CaseRow, RunRow

T = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def case(name: str, status: str, passed: bool | None, detail: str | None = None, error: str | None = None,
         carried: bool = False) -> CaseRow:
    return CaseRow(f"r2/{name}", "r2", name, status, T, T, T, error, None if status == "completed" else "case_raised",
                   passed, 1.0 if passed else 0.0, "out", detail, 3.0, f"r1/{name}" if carried else None)


def test_every_carried_over_case_is_labelled_whatever_its_result():
    cases = [case("kept-pass", "completed", True, carried=True),
             case("kept-fail", "completed", False, detail="expected 4, got 5", carried=True),
             case("kept-error", "failed", None, error="ValueError: boom", carried=True),
             case("new-fail", "completed", False, detail="expected 1, got 2")]
    run = RunRow.__new__(RunRow)
    run.__dict__.update(id="r2", suite="s", attempt=2, status="completed", cause=None, passed=1, failed=2,
                        errored=1, error=None, started_at=T, created_at=T, completed_at=T, terminated_by=None,
                        heartbeat_at=T, prompt_tokens=None, completion_tokens=None, total_tokens=None)
    lines = {line.split()[0]: line for line in run_summary_text(run, cases).splitlines()[2:6]}
    assert all("carried over" in lines[n] for n in ("kept-pass", "kept-fail", "kept-error")), lines
    assert "expected 4, got 5" in lines["kept-fail"] and "ValueError: boom" in lines["kept-error"]
    assert "carried over" not in lines["new-fail"]
