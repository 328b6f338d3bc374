"""Library log lines (kopf's request retries) come out as the controller's own events."""

from __future__ import annotations

import logging

from evalrunner import log


def test_kopfs_request_retry_is_a_controller_event_not_a_raw_line(logs):
    log.route_library_logs(logging.INFO)
    try:
        kopf_logger = logging.getLogger("kopf._cogs.clients.api")
        kopf_logger.error("Request attempt #1/9 failed; will retry: GET https://10.0.0.1:6443/apis -> "
                          "APIClientError('storage is (re)initializing', 429)")
        kopf_logger.error("Request attempt #9/9 failed; escalating: GET https://10.0.0.1:6443/apis -> "
                          "APIServerError('boom', 500)")
        logging.getLogger("kopf.objects").info("Handler 'evalrun_event' succeeded.")
    finally:
        for handler in list(logging.getLogger().handlers):
            if type(handler).__name__ == "_ToStructlog":
                logging.getLogger().removeHandler(handler)
    retried, failed = logs.events(log.API_REQUEST_RETRIED), logs.events(log.API_REQUEST_FAILED)
    assert len(retried) == 1 and retried[0]["level"] == "warning" and retried[0]["attempt"] == "#1/9"
    assert "429" in retried[0]["detail"] and retried[0]["component"] == "controller"
    assert len(failed) == 1 and failed[0]["level"] == "error"
    other = logs.events(log.LIBRARY_LOG)
    assert other and other[0]["logger"] == "kopf.objects" and "succeeded" in other[0]["message"]
