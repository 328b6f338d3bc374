"""Shared fixtures for the unit tests: structured log capture and example paths."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from evalrunner import log

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "suites"


class LogCapture:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def events(self, name: str | None = None) -> list[dict]:
        out = [json.loads(line) for line in self.stream.getvalue().splitlines() if line.strip()]
        return [e for e in out if name is None or e["event"] == name]


@pytest.fixture
def logs():
    capture = LogCapture()
    log.configure("json", "debug", stream=capture.stream)
    yield capture
    log.configure("console", "warning")


@pytest.fixture
def world():
    """A controller wired to an in-memory fake of the Kubernetes API, a real in-memory store, a fixed clock."""
    from controller_fakes import World

    built = World.build()
    yield built
    built.close()
