"""Fault injection for the failure paths the runbook describes.

Set `EVALRUNNER_FAULTS` to a comma-separated list of `point=key` to make a
store write fail with DuckDB's own `IOException`, exactly where a real
locked or full database would fail it. DuckDBStore checks them in the
process that holds the file; HttpStore checks `suite_status_write` in the
runner pod, which reports over HTTP. Points:

- `case_save=<case name>`: saving that case's row (runbook case 1)
- `suite_status_write=*`: the run's final status write (runbook case 2)
- `heartbeat=*`: the heartbeat write

Tests use it on real subprocesses; it is inert when the variable is unset.
"""

from __future__ import annotations

import os

import duckdb

ENV = "EVALRUNNER_FAULTS"


class Faults:
    def __init__(self, spec: str = ""):
        self._points: set[tuple[str, str]] = set()
        for item in filter(None, (part.strip() for part in spec.split(","))):
            point, _, key = item.partition("=")
            self._points.add((point.strip(), key.strip() or "*"))

    @classmethod
    def from_env(cls) -> Faults:
        return cls(os.environ.get(ENV, ""))

    def __bool__(self) -> bool:
        return bool(self._points)

    def check(self, point: str, key: str = "*") -> None:
        if (point, key) in self._points or (point, "*") in self._points:
            raise duckdb.IOException(f"IO Error: injected fault at {point} ({key}) via {ENV}")
