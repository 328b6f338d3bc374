"""Token usage of model calls: read from a reply, summed per case and per run.

A count is None when no call reported it (a python target, an endpoint that
sends no usage), never 0, so "unknown" stays distinct from "free".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            _plus(self.prompt_tokens, other.prompt_tokens),
            _plus(self.completion_tokens, other.completion_tokens),
            _plus(self.total_tokens, other.total_tokens),
        )


NONE = Usage()


def from_reply(data: Any) -> Usage | None:
    """A reply's usage object: OpenAI's `prompt_tokens`, `completion_tokens` and `total_tokens`,
    or `input_tokens` and `output_tokens` as other model APIs name them. None when there is
    none; a count that is not a non-negative integer is left out."""
    if not isinstance(data, dict):
        return None
    prompt = _count(data.get("prompt_tokens", data.get("input_tokens")))
    completion = _count(data.get("completion_tokens", data.get("output_tokens")))
    total = _count(data.get("total_tokens"))
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    if prompt is None and completion is None and total is None:
        return None
    return Usage(prompt, completion, total)


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _plus(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else a + b
