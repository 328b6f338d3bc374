"""Output that a closed pipe cannot break: `evalrunner run SUITE | head -3` must not fail the run.

When the reader of stdout or stderr goes away, every later write raises
BrokenPipeError. Raised inside a log call or a print, it would end the run
as `runner_error` although its cases passed. The streams are wrapped so that
such a write is dropped instead, and the file descriptor is pointed at
/dev/null so that the interpreter's last flush at exit is quiet too. What
the run records, and its exit code, do not depend on anyone reading.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, TextIO


class ClosedPipeTolerant:
    """A text stream whose writes after the reader left are dropped (and everything after them)."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self.closed_by_reader = False

    def write(self, text: str) -> int:
        if not self.closed_by_reader:
            try:
                return self._stream.write(text)
            except (BrokenPipeError, ValueError, OSError) as exc:
                self._reader_left(exc)
        return len(text)

    def flush(self) -> None:
        if not self.closed_by_reader:
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError) as exc:
                self._reader_left(exc)

    def _reader_left(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError) and exc.errno != errno.EPIPE:
            raise exc  # a full disk or a bad descriptor is not a reader that left
        self.closed_by_reader = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding ...: the stream's own
        return getattr(self._stream, name)


def tolerate_closed_pipes() -> None:
    """Wrap this process's stdout and stderr (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, ClosedPipeTolerant):
            setattr(sys, name, ClosedPipeTolerant(stream))
