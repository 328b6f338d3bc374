"""The runner's compact final summary, kept outside the database.

When the final status write fails (runbook case 2), the runner still knows
how the run ended. It leaves this summary where recovery can find it: a spool
directory beside a local database file, or the pod's termination message in
a cluster. Recovery then closes the row as the runner meant to, recording
that it did, instead of guessing `killed`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

# Kubernetes keeps at most 4096 bytes of a termination message.
MAX_SUMMARY_BYTES = 4096


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    suite: str
    status: str  # what the runner meant to write: completed | failed
    cause: str | None
    error: str | None
    passed: int
    failed: int
    errored: int
    write_error: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        text = json.dumps(data, sort_keys=True)
        while len(text.encode()) > MAX_SUMMARY_BYTES and (data["error"] or data["write_error"]):
            for key in ("error", "write_error"):
                if data[key]:
                    data[key] = data[key][: len(data[key]) // 2] + "…"
            text = json.dumps(data, sort_keys=True)
        return text

    @classmethod
    def from_json(cls, text: str) -> RunSummary | None:
        try:
            data = json.loads(text)
            return cls(**data)
        except (ValueError, TypeError):
            return None


def spool_dir(db_path: str) -> Path:
    return Path(f"{db_path}.unwritten")


def write_spooled(db_path: str, summary: RunSummary) -> Path | None:
    """Best effort: the disk may be as broken as the database."""
    directory = spool_dir(db_path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{summary.run_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(summary.to_json())
        os.replace(tmp, path)
        return path
    except OSError:
        return None


def spooler(db_path: str):
    """A `keep_summary` for local runs: the summary goes beside the database file."""

    def keep(summary: RunSummary) -> str | None:
        path = write_spooled(db_path, summary)
        return str(path) if path else None

    return keep


def termination_message_writer(path: str):
    """A `keep_summary` for pods: the summary goes to the container's termination message."""

    def keep(summary: RunSummary) -> str | None:
        try:
            Path(path).write_text(summary.to_json())
            return path
        except OSError:
            return None

    return keep


def read_spooled(db_path: str, run_id: str) -> RunSummary | None:
    path = spool_dir(db_path) / f"{run_id}.json"
    try:
        return RunSummary.from_json(path.read_text())
    except OSError:
        return None


def discard_spooled(db_path: str, run_id: str) -> None:
    try:
        (spool_dir(db_path) / f"{run_id}.json").unlink()
    except OSError:
        pass
