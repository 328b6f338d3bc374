"""Executes one suite: concurrency, timeouts, group commit, heartbeat, shutdown."""

from .case import CaseOutcome
from .suite_run import ResumeError, RunOptions, RunResult, StatusWriteFailed, run_suite

__all__ = ["CaseOutcome", "ResumeError", "RunOptions", "RunResult", "StatusWriteFailed", "run_suite"]
