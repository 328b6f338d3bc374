"""The http target: a model endpoint, called as real APIs need.

OpenAI-compatible chat completions or a plain JSON POST. Each call keeps the
target's rate limits (`ratelimit`), retries what is worth retrying within the
case's timeout (`retry`), and adds the reply's token usage to the case's
(`case_context`). Kept apart from `targets` so that only runs with an http
target import aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from . import case_context, models, retry, usage
from .models import JsonValue
from .ratelimit import NoSlotInTime, RateLimiter, estimate_tokens
from .targets import TargetError, as_text

ERROR_BODY_CHARS = 200


class HttpInvoke:
    """POST each case to an endpoint over one shared session, created on first use
    so it belongs to the event loop that runs the cases. One per run, so its rate
    limiter is shared by all the run's cases. `clock`, `sleep` and `backoff` are
    there for tests.
    """

    def __init__(
        self,
        spec: models.HttpTarget,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff: retry.Backoff = retry.Backoff(),
    ):
        self.spec = spec
        self.session: aiohttp.ClientSession | None = None
        self.clock, self.sleep, self.backoff = clock, sleep, backoff
        self.limiter = (
            RateLimiter(spec.requests_per_minute, spec.tokens_per_minute, clock, sleep)
            if spec.requests_per_minute or spec.tokens_per_minute else None
        )

    async def __call__(self, input: JsonValue) -> JsonValue:
        if self.spec.format == "openai-chat":
            reply = await self._post(self._chat_request(input))
            try:
                return reply["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise TargetError(
                    f"POST {self.spec.url}: reply has no choices[0].message.content: "
                    f"{json.dumps(reply)[:ERROR_BODY_CHARS]}"
                ) from None
        reply = await self._post({"input": input})
        if not isinstance(reply, dict) or self.spec.output_field not in reply:
            raise TargetError(
                f"POST {self.spec.url}: reply has no field {self.spec.output_field!r}: "
                f"{json.dumps(reply)[:ERROR_BODY_CHARS]}"
            )
        return reply[self.spec.output_field]

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _chat_request(self, input: JsonValue) -> dict[str, Any]:
        messages = []
        if self.spec.system_prompt:
            messages.append({"role": "system", "content": self.spec.system_prompt})
        messages.append({"role": "user", "content": as_text(input)})
        request: dict[str, Any] = {"messages": messages}
        if self.spec.model:
            request["model"] = self.spec.model
        return request

    def _headers(self) -> dict[str, str]:
        headers = dict(self.spec.headers)
        if self.spec.api_key_env:
            # Read per call so a rotated key is picked up; the key never enters a message.
            key = os.environ.get(self.spec.api_key_env)
            if not key:
                raise TargetError(f"http target: environment variable {self.spec.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _seconds_left(self) -> float | None:
        return case_context.seconds_left(self.clock())

    async def _post(self, body: dict[str, Any]) -> Any:
        headers = self._headers()
        if self.session is None:
            # No timeout of aiohttp's own (5 minutes by default): the case's timeout is the one that counts.
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        estimate = estimate_tokens(body) if self.limiter else 0
        try:
            return await retry.with_retries(
                lambda: self._attempt(body, headers, estimate), self.spec.max_retries, self.backoff,
                self._seconds_left, self.sleep,
            )
        except (retry.GaveUp, NoSlotInTime) as exc:
            raise TargetError(str(exc)) from exc.__cause__

    async def _attempt(self, body: dict[str, Any], headers: dict[str, str], estimate: int) -> Any:
        """One POST: the parsed reply, `retry.Retryable` if another try may succeed, else TargetError."""
        assert self.session is not None
        if self.limiter:
            await self.limiter.acquire(estimate, self._seconds_left)
        spent: int | None = 0  # what the rate limit keeps: nothing for a failed attempt
        try:
            try:
                async with self.session.post(self.spec.url, json=body, headers=headers) as response:
                    text = await response.text(errors="replace")
                    status, asked_s = response.status, retry.retry_after_s(response.headers)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                raise retry.Retryable(f"POST {self.spec.url} failed: {type(exc).__name__}: {exc}") from exc
            except aiohttp.ClientError as exc:
                raise TargetError(f"POST {self.spec.url} failed: {type(exc).__name__}: {exc}") from exc
            failure = f"POST {self.spec.url} returned HTTP {status}: {text[:ERROR_BODY_CHARS]}"
            if retry.is_retryable_status(status):
                raise retry.Retryable(failure, asked_s)
            if not 200 <= status < 300:
                raise TargetError(failure)
            spent = None  # the endpoint did the work: keep the estimate unless the reply says better
            try:
                reply = json.loads(text)
            except json.JSONDecodeError:
                raise TargetError(f"POST {self.spec.url} returned invalid JSON: {text[:ERROR_BODY_CHARS]}") from None
            used = usage.from_reply(reply.get(self.spec.usage_field)) if isinstance(reply, dict) else None
            if used is not None:
                case_context.add_usage(used)
                spent = used.total_tokens
            return reply
        except asyncio.CancelledError:
            spent = None  # the case timed out mid-call: the endpoint may have done the work
            raise
        finally:
            if self.limiter:
                self.limiter.settle(estimate, spent)
