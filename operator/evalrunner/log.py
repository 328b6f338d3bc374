"""structlog set-up and the event names operators grep for.

The first five names come from the runbook and are contract: alerting rules
and humans search for them verbatim. Every event carries `run_id` and `suite`
(and `case_id` where a case is involved) so one grep follows one run.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

# Runbook fingerprints (contract).
CASE_SAVE_FAILED = "eval.case_save_failed"
SUITE_STATUS_WRITE_FAILED = "eval.suite_status_write_failed"
SUITE_COMPLETED = "eval.suite_completed"
SUITE_FAILED = "eval.suite_failed"
SHUTDOWN_REQUESTED = "actor.shutdown_requested"

# The project's own.
SUITE_STARTED = "eval.suite_started"
SUITE_REFUSED = "eval.suite_refused"
CASE_COMPLETED = "eval.case_completed"
CASE_FAILED = "eval.case_failed"
RUN_TERMINATED = "eval.run_terminated"
RUN_FENCED = "eval.run_fenced"
STRANDED_CASES_CLOSED = "eval.stranded_cases_closed"  # case rows left running under a closed run, repaired
HEARTBEAT_FAILED = "eval.heartbeat_failed"
CASES_SAVED = "eval.cases_saved"  # debug: these case results are committed (the durable signal)
RUN_SUMMARY = "eval.run_summary"  # the runner's summary, echoed when its final write failed
SUMMARY_UNREADABLE = "eval.summary_unreadable"
STORE_RESERVE_RELEASED = "store.reserve_released"
STORE_RESERVE_UNAVAILABLE = "store.reserve_unavailable"
STORE_REOPENED = "store.reopened"

LOG_FORMATS = ("console", "json")

# One line per case: what a progress bar shows instead on a console (10,000 cases, 10,000 lines).
PER_CASE_EVENTS = frozenset({CASE_COMPLETED, CASE_FAILED})
_per_case_events = True  # whether the configuration prints them (the runner skips building them otherwise)


def configure(fmt: str = "console", level: str = "info", stream: TextIO | None = None,
              quiet: frozenset[str] = frozenset()) -> None:
    """Route structlog events to `stream` (stderr by default) as console text or JSON lines.

    Events named in `quiet` are left out (unless the level is debug).
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(LOG_FORMATS)}")
    global _per_case_events
    stream = stream or sys.stderr
    dropped = quiet if level.lower() != "debug" else frozenset()
    _per_case_events = logging.getLevelName(level.upper()) <= logging.INFO and not (PER_CASE_EVENTS <= dropped)
    processors: list[Any] = [_dropping(dropped)] if dropped else []
    processors += [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    else:
        colors = stream.isatty()
        processors += [structlog.dev.ConsoleRenderer(colors=colors)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def _dropping(names: frozenset[str]):
    def drop(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("event") in names:
            raise structlog.DropEvent
        return event

    return drop


def per_case_events() -> bool:
    """Whether a line per case would be printed: the runner builds none when it would not."""
    return _per_case_events


def get(**context: Any) -> Any:
    return structlog.get_logger("evalrunner").bind(**context)
