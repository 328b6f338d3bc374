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
LOG_LEVELS = ("debug", "info", "warning", "error")

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
    if level.lower() not in LOG_LEVELS:  # from $EVALRUNNER_LOG_LEVEL, which argparse does not see
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LOG_LEVELS)}")
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


# ---------------------------------------------------------------- libraries' own logging

API_REQUEST_RETRIED = "controller.api_request_retried"  # kopf retries a failed Kubernetes API call
API_REQUEST_FAILED = "controller.api_request_failed"  # ... and gave up on it
LIBRARY_LOG = "controller.library_log"  # anything else kopf or a client library logs


class _ToStructlog(logging.Handler):
    """Library log records (kopf, the Kubernetes client) as our events, in our format, never raw lines.

    kopf's "Request attempt #1/9 failed; will retry: ... 429 storage is (re)initializing" is the
    first thing a controller says while the API server starts; it becomes `controller.api_request_retried`
    with the request and the error, at warning level, since kopf retries it.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            level = record.levelno
            event, fields = LIBRARY_LOG, {"logger": record.name, "message": message}
            if message.startswith("Request attempt") and "failed" in message:
                retried = "will retry" in message or "will re-authenticate" in message
                event = API_REQUEST_RETRIED if retried else API_REQUEST_FAILED
                level = logging.WARNING if retried else logging.ERROR
                attempt, _, rest = message.partition(" failed; ")
                fields = {"attempt": attempt.removeprefix("Request attempt ").strip(), "detail": rest}
            get(component="controller").log(level, event, **fields)
        except Exception:  # logging must never break the caller
            self.handleError(record)


def route_library_logs(level: int = logging.WARNING) -> None:
    """Send the standard library's log records (kopf, kubernetes, urllib3, aiohttp) through structlog."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ToStructlog):
            root.removeHandler(handler)
    root.addHandler(_ToStructlog())
    root.setLevel(level)
