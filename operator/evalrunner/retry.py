"""When, and after how long, a model call is tried again.

Retried: HTTP 408, 429 and 5xx replies, and connection errors (refused,
reset, a reply cut short); anything else fails at once. Before retry n (from
0) the call waits what the server asked for (`retry-after-ms`, else
`Retry-After` in seconds or as an HTTP date) plus up to 10% jitter, never
less; without either, exponential backoff with "equal jitter": between half
and all of min(8 s, 0.5 s x 2^n), so concurrent cases that failed together
do not return together. A wait that would end past the case's deadline is
not started: the call fails at once, naming the last error, as it does after
`max_retries` retries.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TypeVar

RETRY_STATUSES = frozenset({408, 429})
BASE_DELAY_S = 0.5
MAX_BACKOFF_S = 8.0
RETRY_AFTER_JITTER = 0.1

T = TypeVar("T")


class Retryable(Exception):
    """An attempt failed in a way worth another try; `retry_after_s` is the wait the server asked for."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GaveUp(Exception):
    """No more tries: the retries are spent, or the next wait would pass the case's deadline."""


def is_retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500


def retry_after_s(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """The wait a reply asks for, in seconds; None if it asks for none (or says it unreadably)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT; parsedate marks "-0000" as naive
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


@dataclass(frozen=True)
class Backoff:
    base_s: float = BASE_DELAY_S
    max_s: float = MAX_BACKOFF_S
    random: Callable[[], float] = field(default=random.random, compare=False)

    def delay_s(self, retry: int, asked_s: float | None) -> float:
        if asked_s is not None:
            return asked_s * (1 + RETRY_AFTER_JITTER * self.random())
        step = min(self.max_s, self.base_s * 2**retry)
        return step * (0.5 + 0.5 * self.random())


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    max_retries: int,
    backoff: Backoff,
    seconds_left: Callable[[], float | None],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """`await attempt()` until it returns or raises anything but `Retryable`.

    `seconds_left()`: time until the case's deadline (None: no deadline).
    """
    retry = 0
    while True:
        try:
            return await attempt()
        except Retryable as exc:
            if retry >= max_retries:
                tries = f"{retry + 1} attempts" if retry else "1 attempt (max_retries: 0)"
                raise GaveUp(f"{exc} (gave up after {tries})") from exc
            delay = backoff.delay_s(retry, exc.retry_after_s)
            left = seconds_left()
            if left is not None and delay >= left:
                raise GaveUp(
                    f"{exc} (not retried: waiting {delay:.1f}s would pass the case's timeout, "
                    f"{max(left, 0):.1f}s left)"
                ) from exc
        await sleep(delay)
        retry += 1
