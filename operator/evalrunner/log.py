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
CASE_STARTED = "eval.case_started"
CASE_COMPLETED = "eval.case_completed"
CASE_FAILED = "eval.case_failed"
RUN_TERMINATED = "eval.run_terminated"
RUN_FENCED = "eval.run_fenced"
HEARTBEAT_FAILED = "eval.heartbeat_failed"
STORE_OPENED = "store.opened"
STORE_MIGRATED = "store.migrated"

LOG_FORMATS = ("console", "json")


def configure(fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog events to `stream` (stderr by default) as console text or JSON lines."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(LOG_FORMATS)}")
    stream = stream or sys.stderr
    processors: list[Any] = [
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


def get(**context: Any) -> Any:
    return structlog.get_logger("evalrunner").bind(**context)
