"""Turn a suite's `target` into something the runner can call once per case.

`build_target(spec)` returns an `Invoke`: `await invoke(case_input)` gives the
target's output, and `await invoke.aclose()` releases what it holds (an HTTP
session). Every kind has `aclose`, so callers always close without checking
the kind. Failures on the target's side (bad HTTP status, non-zero exit, a
missing function) raise `TargetError`; an exception raised by a python target
function itself propagates unchanged so its traceback points at user code.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from . import models
from .sync_calls import SYNC_CALLS
from .models import JsonValue

STDERR_TAIL_CHARS = 500
KILL_WAIT_SECONDS = 5.0


class TargetError(Exception):
    """The target could not produce an output for a case."""


class Invoke(Protocol):
    async def __call__(self, input: JsonValue) -> JsonValue: ...

    async def aclose(self) -> None: ...


def build_target(spec: models.Target, search_path: Iterable[str] = ()) -> Invoke:
    """`search_path`: directories importable by python targets (the suite file's directory)."""
    if spec.python is not None:
        return PythonInvoke(spec.python, search_path)
    if spec.http is not None:
        from .http_target import HttpInvoke  # imports aiohttp (~130 ms): only runs with an http target pay it

        return HttpInvoke(spec.http)
    if spec.command is not None:
        return CommandInvoke(spec.command)
    raise TargetError("the target names no kind (python, http or command)")


def as_text(value: JsonValue) -> str:
    """Text sent to a target that takes text: strings as-is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------- python


def resolve_callable(path: str, search_path: Iterable[str] = ()) -> Callable[..., Any]:
    """Import `module:attr.path` and return it; LookupError with a readable message if unusable."""
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise LookupError(f"{path!r} is not of the form module:function")
    for directory in reversed(list(search_path)):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    importlib.invalidate_caches()  # files written after interpreter start must be found
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Tell "the module is not there" apart from "it imports something that is not there".
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise LookupError(f"cannot import {path!r}: no module named {exc.name!r}") from None
        raise LookupError(f"cannot import {path!r}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise LookupError(f"cannot import {path!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    walked = module_name
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise LookupError(f"cannot import {path!r}: {walked!r} has no attribute {attr!r}")
        obj = getattr(obj, attr)
        walked += (":" if walked == module_name else ".") + attr
    if not callable(obj):
        raise LookupError(f"{path!r} is a {type(obj).__name__}, not a callable")
    return obj


def is_async_callable(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class PythonInvoke:
    def __init__(self, spec: models.PythonTarget, search_path: Iterable[str] = ()):
        try:
            self.function = resolve_callable(spec.callable, search_path)
        except LookupError as exc:
            raise TargetError(f"python target: {exc}") from exc.__cause__
        self.is_async = is_async_callable(self.function)

    async def __call__(self, input: JsonValue) -> JsonValue:
        if self.is_async:
            return await self.function(input)
        # A sync call that times out cannot be interrupted: the awaiting task is cancelled,
        # and the call runs on in a daemon thread that the process does not wait for at exit.
        return await SYNC_CALLS.call(self.function, input)

    async def aclose(self) -> None:
        pass


# ---------------------------------------------------------------- http: see http_target.py


# ---------------------------------------------------------------- command


class CommandInvoke:
    """Run `argv` per case: input on stdin, output from stdout."""

    def __init__(self, spec: models.CommandTarget):
        self.argv = list(spec.argv)
        self.env = {**os.environ, **spec.env}

    async def __call__(self, input: JsonValue) -> JsonValue:
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
                # Own process group, so a timeout kills whatever the command spawned too.
                start_new_session=True,
            )
        except OSError as exc:
            raise TargetError(f"command target: cannot start {self.argv[0]!r}: {exc.strerror or exc}") from exc
        try:
            stdout, stderr = await process.communicate(as_text(input).encode("utf-8"))
        except BaseException:  # cancelled (timeout) or shutting down: leave no child behind
            await _kill(process)
            raise
        if process.returncode != 0:
            tail = stderr.decode("utf-8", errors="replace")[-STDERR_TAIL_CHARS:]
            raise TargetError(f"command {self.argv[0]!r} exited with code {process.returncode}: {tail}")
        return stdout.decode("utf-8", errors="replace").removesuffix("\n")

    async def aclose(self) -> None:
        pass


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                process.kill()
            except ProcessLookupError:
                pass
    # wait() also waits for the pipes to close; a descendant that escaped the
    # process group could hold them open forever, so bound it. The child
    # itself is reaped by asyncio's child watcher either way.
    try:
        await asyncio.wait_for(process.wait(), KILL_WAIT_SECONDS)
    except asyncio.TimeoutError:
        pass
