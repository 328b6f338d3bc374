"""The runner's compact final summary, kept outside the database.

When the final status write fails (runbook case 2), the runner still knows
how the run ended. It leaves this summary where recovery can find it: a spool
directory beside a local database file, or the pod's termination message in
a cluster. Recovery then closes the row as the runner meant to, recording
that it did, instead of guessing `killed`.

The summary carries every case result the runner holds, so that closing
from it also writes the case rows whose saves were lost with the database:
the run ends with the counts the runner reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TextIO

from . import log
from .store.errors import is_out_of_space
from .store.records import CaseEvent, case_row_id

# Kubernetes keeps at most 4096 bytes of a termination message.
MAX_SUMMARY_BYTES = 4096

# Where a summary was left (a path), or None if it could not be kept.
KeepSummary = Callable[["RunSummary"], "str | None"]


@dataclass(frozen=True)
class CaseResult:
    """One case's final state as the runner knew it: what its row should say."""

    name: str
    status: str  # completed | failed
    passed: bool | None = None
    score: float | None = None
    cause: str | None = None
    error: str | None = None
    duration_ms: float | None = None
    started_at: str | None = None  # ISO 8601
    completed_at: str | None = None
    output: str | None = None
    detail: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None

    @classmethod
    def from_event(cls, ev: CaseEvent) -> CaseResult:
        return cls(
            ev.name, ev.status, ev.passed, ev.score, ev.cause, ev.error,
            round(ev.duration_ms, 2) if ev.duration_ms is not None else None,
            ev.started_at.isoformat() if ev.started_at else None,
            ev.completed_at.isoformat() if ev.completed_at else None, ev.output, ev.detail,
            ev.prompt_tokens, ev.completion_tokens, ev.total_tokens,
        )

    def to_event(self, run_id: str, now: datetime) -> CaseEvent:
        return CaseEvent(
            case_row_id(run_id, self.name), run_id, self.name, self.status,
            _timestamp(self.started_at) or now, _timestamp(self.completed_at) or now, self.error, self.cause,
            self.passed, self.score, self.output, self.detail, self.duration_ms,
            self.prompt_tokens, self.completion_tokens, self.total_tokens,
        )

    def verdict_only(self) -> CaseResult:
        """Status, pass, score, cause and duration: what is left when a small message cannot hold more."""
        return replace(self, output=None, detail=None, error=None, started_at=None, completed_at=None)


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
    cases: tuple[CaseResult, ...] = ()
    trimmed: str | None = None  # what was left out to fit a size limit; None when nothing was

    def to_json(self, max_bytes: int | None = None) -> str:
        """The summary as one JSON object; with `max_bytes`, trimmed to fit and saying what it left out.

        Trimming drops, in order: the cases' outputs, errors, details and
        timestamps (keeping each verdict); then case results, from the last;
        then halves of the run's own error texts. Counts, status and cause are
        always kept.
        """
        full = _encode(self)
        if max_bytes is None or _fits(full, max_bytes):
            return full
        dropped = "case outputs, errors and timestamps dropped"
        lean = replace(self, cases=tuple(c.verdict_only() for c in self.cases), trimmed=dropped)
        text = _encode(lean)
        if _fits(text, max_bytes):
            return text

        def keeping(n: int) -> RunSummary:
            note = f"{dropped}; {len(self.cases) - n} of {len(self.cases)} case results dropped"
            return replace(lean, cases=lean.cases[:n], trimmed=note)

        fit, too_many = 0, len(self.cases)  # binary search for the most cases that fit
        while too_many - fit > 1:
            middle = (fit + too_many) // 2
            if _fits(_encode(keeping(middle)), max_bytes):
                fit = middle
            else:
                too_many = middle
        smallest = keeping(fit)
        text = _encode(smallest)
        while not _fits(text, max_bytes) and (smallest.error or smallest.write_error):
            smallest = replace(smallest, error=_halve(smallest.error), write_error=_halve(smallest.write_error))
            text = _encode(smallest)
        return text

    @classmethod
    def from_json(cls, text: str) -> RunSummary | None:
        """None for anything that is not a summary (empty, cut short, not JSON, missing fields).

        Fields this version does not know are ignored: a newer runner's
        summary still closes the run.
        """
        try:
            data = json.loads(text)
            known = {f.name for f in fields(cls)}
            values = {k: v for k, v in data.items() if k in known}
            case_fields = {f.name for f in fields(CaseResult)}
            values["cases"] = tuple(
                CaseResult(**{k: v for k, v in case.items() if k in case_fields}) for case in data.get("cases") or ()
            )
            summary = cls(**values)
        except (ValueError, TypeError, AttributeError):
            return None
        terminal = ("completed", "failed")
        if summary.status not in terminal or any(c.status not in terminal for c in summary.cases):
            return None
        return summary

    def case_events(self, now: datetime | None = None) -> list[CaseEvent]:
        """The case results as the store's records; `now` stands in for timestamps the summary lacks."""
        now = now or datetime.now(timezone.utc)
        return [case.to_event(self.run_id, now) for case in self.cases]


def _encode(summary: RunSummary) -> str:
    data = asdict(summary)
    data["cases"] = [{k: v for k, v in case.items() if v is not None} for case in data["cases"]]
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


def _fits(text: str, max_bytes: int) -> bool:
    return len(text.encode()) <= max_bytes


def _halve(text: str | None) -> str | None:
    """Half of `text` and an ellipsis; None once nothing is left to halve (so trimming ends)."""
    return text[: len(text) // 2] + "…" if text and len(text) > 2 else None


def _timestamp(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


def spool_dir(db_path: str) -> Path:
    return Path(f"{db_path}.unwritten")


def write_spooled(db_path: str, summary: RunSummary, make_room: Callable[[], bool] | None = None) -> Path | None:
    """Write the summary durably (temp file, fsync, rename); None if the disk refuses it.

    The disk may be as full as the database's: out of space, `make_room`
    (the store's emergency reserve) is asked once to free some, then the
    write is tried again.
    """
    path = spool_dir(db_path) / f"{summary.run_id}.json"
    data = summary.to_json().encode()
    try:
        _write_durably(path, data)
        return path
    except OSError as exc:
        if not (is_out_of_space(exc) and make_room is not None and make_room()):
            return None
    try:
        _write_durably(path, data)
        return path
    except OSError:
        return None


def _write_durably(path: Path, data: bytes) -> None:
    """A reader sees the whole file or none of it, and a crash right after keeps it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself is durable once the directory is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def spooler(db_path: str, make_room: Callable[[], bool] | None = None) -> KeepSummary:
    """A `keep_summary` for local runs: the summary goes beside the database file."""

    def keep(summary: RunSummary) -> str | None:
        path = write_spooled(db_path, summary, make_room)
        return str(path) if path else None

    return keep


def termination_message_writer(path: str) -> KeepSummary:
    """A `keep_summary` for pods: the summary goes to the container's termination message (trimmed to fit)."""

    def keep(summary: RunSummary) -> str | None:
        try:
            Path(path).write_text(summary.to_json(MAX_SUMMARY_BYTES))
            return path
        except OSError:
            return None

    return keep


def echoing(keep: KeepSummary, log_format: str, stream: TextIO | None = None) -> KeepSummary:
    """Keep the summary, and print it on stderr too: the copy left when even the spool file is refused.

    One JSON log line under JSON logs, a readable block under console logs.
    Case outputs are left out of it; the kept file has them.
    """

    def keep_and_echo(summary: RunSummary) -> str | None:
        kept = keep(summary)
        brief = replace(summary, cases=tuple(replace(c, output=None, detail=None) for c in summary.cases))
        if log_format == "json":
            log.get(run_id=summary.run_id, suite=summary.suite).error(
                log.RUN_SUMMARY, summary=json.loads(_encode(brief)), kept_at=kept)
        else:
            print(_readable(brief, kept), file=stream or sys.stderr)
        return kept

    return keep_and_echo


def _readable(summary: RunSummary, kept: str | None) -> str:
    where = f"kept at {kept}" if kept else "NOT kept: the disk refused it; this is the only copy"
    why = f" ({summary.cause})" if summary.cause else ""
    lines = [
        f"run {summary.run_id} ({summary.suite}) ended {summary.status}{why}, but its final status was not written.",
        f"The runner's summary ({where}): {summary.passed} passed, {summary.failed} failed, {summary.errored} errored",
    ]
    for case in summary.cases:
        verdict = "error" if case.status == "failed" else ("pass" if case.passed else "fail")
        score = f"score {case.score:g}" if case.score is not None else ""
        why_not = f"{case.cause}: {case.error}" if case.cause else (case.error or "")
        lines.append(f"  {case.name:<24} {verdict:<5} {score:<11} {why_not}".rstrip())
    return "\n".join(lines)


def read_spooled(db_path: str, run_id: str) -> RunSummary | None:
    """The run's spooled summary, if one was left and can be read.

    A file that is not a summary (empty, cut short) is set aside as
    `RUN_ID.json.unreadable` with a warning, never silently ignored: the
    run is then closed as if no summary had been left.
    """
    path = spool_dir(db_path) / f"{run_id}.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        _warn_unreadable(path, run_id, f"{type(exc).__name__}: {exc}")
        return None
    parsed = RunSummary.from_json(text)
    if parsed is None or parsed.run_id != run_id:
        _warn_unreadable(path, run_id, "empty file" if not text.strip() else "not a run summary")
        return None
    return parsed


def _warn_unreadable(path: Path, run_id: str, reason: str) -> None:
    kept = path.with_name(path.name + ".unreadable")
    try:
        os.replace(path, kept)
    except OSError:
        kept = path
    log.get(run_id=run_id).warning(
        log.SUMMARY_UNREADABLE, path=str(path), kept_at=str(kept), reason=reason,
        consequence="the run is closed as if its runner had left no summary",
    )


def discard_spooled(db_path: str, run_id: str) -> None:
    try:
        (spool_dir(db_path) / f"{run_id}.json").unlink()
    except OSError:
        pass
