"""Requests and tokens per minute, shared by every case of a run.

Each limit is a token bucket, the scheme model APIs describe for their own
limits: full at the start (a minute's worth), refilled continuously at
limit/60 per second. A call waits until both buckets hold what it needs,
then takes it; waiting calls are served in arrival order. Every attempt is a
call, retries included.

A call's tokens are known only from its reply, so it takes an estimate
first (its request's characters / 4, the usual rule of thumb; the completion
is not known yet) and settles with the reply's `usage.total_tokens`: the
difference is taken or given back. A bucket may go below zero (a long
completion, or a call larger than the whole bucket, which waits for a full
one), and the calls after it wait until it refills. A failed attempt gives
its estimate back (nothing was spent); a reply without usage keeps it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

CHARS_PER_TOKEN = 4
# Waits shorter than this are rounding noise of the refill arithmetic.
EPSILON_S = 1e-6


class NoSlotInTime(Exception):
    """The next slot comes after the case's deadline: waiting for it would only time the case out."""


def estimate_tokens(body: Any) -> int:
    return len(json.dumps(body, ensure_ascii=False)) // CHARS_PER_TOKEN + 1


class TokenBucket:
    def __init__(self, per_minute: float, now: float):
        self.per_minute = per_minute
        self.rate_per_s = per_minute / 60.0
        self.level = float(per_minute)
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(self.per_minute, self.level + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def wait_s(self, amount: float) -> float:
        """Until the bucket holds `amount`, or is full if `amount` is more than it can hold."""
        return max(0.0, (min(amount, self.per_minute) - self.level) / self.rate_per_s)

    def take(self, amount: float) -> None:
        self.level = min(self.per_minute, self.level - amount)  # a negative amount gives back


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        now = clock()
        self.requests = TokenBucket(requests_per_minute, now) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute, now) if tokens_per_minute else None
        self.clock, self.sleep = clock, sleep
        self._turn = asyncio.Lock()  # held while waiting: first come, first served

    def describe(self) -> str:
        limits = [f"{b.per_minute:g} {unit}/min" for b, unit in ((self.requests, "requests"), (self.tokens, "tokens"))
                  if b is not None]
        return " and ".join(limits)

    async def acquire(self, tokens: int, seconds_left: Callable[[], float | None] = lambda: None) -> None:
        """Wait for one request and `tokens` (the estimate), then take them.

        Raises NoSlotInTime rather than wait past the case's deadline (`seconds_left()`).
        """
        async with self._turn:
            while True:
                now = self.clock()
                wait = 0.0
                for bucket, amount in ((self.requests, 1), (self.tokens, tokens)):
                    if bucket is not None:
                        bucket.refill(now)
                        wait = max(wait, bucket.wait_s(amount))
                if wait <= EPSILON_S:
                    break
                left = seconds_left()
                if left is not None and wait >= left:
                    raise NoSlotInTime(
                        f"rate limit ({self.describe()}): the next slot is {wait:.1f}s away, past the case's "
                        f"timeout ({max(left, 0):.1f}s left)"
                    )
                await self.sleep(wait)
            if self.requests is not None:
                self.requests.take(1)
            if self.tokens is not None:
                self.tokens.take(tokens)

    def settle(self, estimate: int, spent: int | None) -> None:
        """Replace a call's estimate with the tokens it spent (None: unknown, keep the estimate)."""
        if self.tokens is None or spent is None:
            return
        self.tokens.refill(self.clock())
        self.tokens.take(spent - estimate)
