"""Offline targets for the example suites: no network, no model, deterministic."""

from __future__ import annotations

import ast
import asyncio
import json
import operator
import os
import time

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg}


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError(f"unsupported expression: {ast.dump(node)}")


def calculator(prompt: str) -> str:
    """A tiny 'model' that answers arithmetic; raises on what it cannot parse."""
    value = _eval(ast.parse(str(prompt), mode="eval").body)
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


async def echo_json(payload):
    """Async target that returns structured output."""
    return {"echo": payload, "length": len(json.dumps(payload))}


def capital(country: str) -> str:
    return {"France": "The capital of France is Paris.", "Japan": "Tokyo", "Peru": "Lima, Peru"}.get(country, "unknown")


async def slow(seconds) -> str:
    await asyncio.sleep(float(seconds))
    return "done"


def flaky(prompt: str) -> str:
    if "boom" in str(prompt):
        raise RuntimeError("target exploded on purpose")
    if "hang" in str(prompt):
        time.sleep(3)
    return str(prompt).upper()


def noop(_input):
    return "ok"


_held: list[bytes] = []


def hog(mb) -> str:
    """Allocate `mb` megabytes, touch every page and hold them: drives a runner over its memory limit.

    0 returns at once. Otherwise it waits half a second first, so the results
    of the cases before it reach the store before the kernel kills the process.
    """
    if float(mb) > 0:
        time.sleep(0.5)
        _held.append(b"\x01" * int(float(mb) * 2**20))  # bytes(n) would leave the pages untouched
    return "ok"


def crash(code) -> str:
    """Exit the whole process at once with `code` (no cleanup, no final write); 0 returns "ok".

    Like `hog`, it waits half a second first so earlier results are stored.
    """
    if int(code) != 0:
        time.sleep(0.5)
        os._exit(int(code))
    return "ok"


def looks_polite(output, expected, case) -> float:
    """Custom scorer: fraction of expected words found in the output."""
    words = [w.lower() for w in str(expected).split()]
    found = sum(1 for w in words if w in str(output).lower())
    return found / len(words) if words else 1.0
