"""What a person (or CI) reads after a run: progress, tables, JSON and JUnit XML."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import threading
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from typing import Any, Sequence, TextIO

from .store.records import CaseRow, RunRow
from .summary import RunSummary
from .usage import NONE, Usage


class ProgressBar:
    """A one-line bar on a terminal; silent when stderr is not a terminal (logs suffice there).

    Log lines share the terminal: written through `log_stream()`, each erases
    the bar's line, takes it, and the bar is redrawn below it, so a log line
    never lands on the end of the bar.
    """

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.counts = {"pass": 0, "fail": 0, "error": 0}
        self._last_draw = 0.0
        self._drawn = False  # the bar is on the terminal's current line
        self._lock = threading.Lock()

    def update(self, verdict: str) -> None:
        self.counts[verdict] = self.counts.get(verdict, 0) + 1
        now = time.monotonic()
        if self.enabled and (now - self._last_draw > 0.1 or sum(self.counts.values()) == self.total):
            self._last_draw = now
            with self._lock:
                self._draw()

    def _draw(self) -> None:
        done = sum(self.counts.values())
        width = 30
        filled = int(width * done / max(self.total, 1))
        c = self.counts
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}  "
                          f"pass {c['pass']}  fail {c['fail']}  error {c['error']}")
        self.stream.flush()
        self._drawn = True

    def log_stream(self) -> TextIO:
        """A stream for log lines that keeps them off the bar's line (the plain stream when disabled)."""
        return _AboveTheBar(self) if self.enabled else self.stream  # type: ignore[return-value]

    def finish(self) -> None:
        with self._lock:
            if self.enabled and self._drawn:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = False


class _AboveTheBar:
    """Writes of whole log lines: erase the bar, write the line, draw the bar again."""

    ERASE_LINE = "\r\x1b[2K"

    def __init__(self, bar: ProgressBar):
        self.bar = bar

    def write(self, text: str) -> int:
        bar = self.bar
        with bar._lock:
            if bar._drawn:
                bar.stream.write(self.ERASE_LINE)
                bar._drawn = False
            bar.stream.write(text)
            if text.endswith("\n") and sum(bar.counts.values()):
                bar._draw()
        return len(text)

    def flush(self) -> None:
        self.bar.stream.flush()

    def isatty(self) -> bool:
        return self.bar.stream.isatty()


CLOSED_BY_ITS_RUNNER = (None, "runner")


def duration_s(run: RunRow, now: datetime | None = None) -> float | None:
    """How long the run's runner ran: to its close, or, for a run someone else closed (a sweeper,
    the controller, a person), to the runner's last sign of life, never to when the death was noticed."""
    start = run.started_at or run.created_at
    end = run.completed_at or now
    if run.completed_at and run.terminated_by not in CLOSED_BY_ITS_RUNNER and run.heartbeat_at:
        end = min(run.completed_at, run.heartbeat_at)
    return max(0.0, (end - start).total_seconds()) if start and end else None


def closed_by(run: RunRow) -> str | None:
    """Who wrote the run's terminal status: its runner, the sweeper, the controller, manual; None while running."""
    if run.status == "running":
        return None
    return run.terminated_by or "runner"


def run_to_dict(run: RunRow) -> dict[str, Any]:
    data = {k: _plain(v) for k, v in run.__dict__.items()}
    data["owner"] = run.owner.__dict__ if run.owner else None
    data["duration_s"] = duration_s(run)
    return data


def case_to_dict(case: CaseRow) -> dict[str, Any]:
    return {k: _plain(v) for k, v in case.__dict__.items()}


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def verdict(case: CaseRow) -> str:
    if case.status == "running":
        return "running"
    if case.status == "failed":
        return "error"
    return "pass" if case.passed else "fail"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value: Any, limit: int = 60) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.3g}"
    elif isinstance(value, datetime):
        text = value.strftime("%Y-%m-%d %H:%M:%S")
    else:
        text = str(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_tokens(run: RunRow, cases: Sequence[CaseRow]) -> Usage:
    """The run's token totals; while it runs, the sum of its case rows so far (carried-over ones excluded)."""
    if run.status != "running":
        return Usage(run.prompt_tokens, run.completion_tokens, run.total_tokens)
    return sum((Usage(c.prompt_tokens, c.completion_tokens, c.total_tokens) for c in cases if not c.carried_from),
               NONE)


def tokens_text(usage: Usage) -> str | None:
    """`1,234 tokens (1,000 prompt, 234 completion)`; None when no call reported usage."""
    if usage == NONE:
        return None
    parts = [f"{n:,} {kind}" for n, kind in ((usage.prompt_tokens, "prompt"), (usage.completion_tokens, "completion"))
             if n is not None]
    total = f"{usage.total_tokens:,} tokens" if usage.total_tokens is not None else "tokens"
    return total + (f" ({', '.join(parts)})" if parts else "")


# A table of every case helps for a dozen; for ten thousand, the ones that did not pass are what to read.
CASE_TABLE_LIMIT = 50


def run_summary_text(run: RunRow, cases: Sequence[CaseRow]) -> str:
    shown = list(cases)
    if len(shown) > CASE_TABLE_LIMIT:
        shown = [c for c in cases if verdict(c) != "pass"][:CASE_TABLE_LIMIT]
    with_tokens = any(c.total_tokens is not None for c in shown)  # a column only where a model reported usage
    rows = [
        (c.name, verdict(c), c.score, None if c.duration_ms is None else f"{c.duration_ms:.0f}ms",
         *((c.total_tokens,) if with_tokens else ()),
         _detail(c))
        for c in shown
    ]
    headers = ["case", "result", "score", "time", *(["tokens"] if with_tokens else []), "detail"]
    body = table(headers, rows) if rows else ""
    if len(shown) < len(cases):
        failing = sum(1 for c in cases if verdict(c) != "pass")
        listed = (f"{len(shown)} of the {failing} that did not pass are listed" if shown
                  else "every one passed")
        body += ("\n" if body else "") + (f"{len(cases)} cases: {listed}; `evalrunner show {run.id} --json` "
                                          "lists them all")
    took = duration_s(run)
    footer = (
        f"run {run.id}  suite {run.suite}  attempt {run.attempt}  status {run.status}"
        + (f" ({run.cause})" if run.cause else "")
        + f"\npassed {run.passed or 0}  failed {run.failed or 0}  errored {run.errored or 0}"
        + (f"  in {took:.2f}s" if took is not None else "")
    )
    if tokens := tokens_text(run_tokens(run, cases)):
        footer += f"\n{tokens}"
    if run.error and run.status == "failed":
        footer += f"\nerror: {run.error}"
    return f"{body}\n\n{footer}"


def _detail(case: CaseRow) -> str | None:
    """What to say of a case: its error or scorer's detail, and whether an earlier attempt ran it."""
    said = case.error or case.detail
    if case.carried_from:
        return f"carried over: {said}" if said else "carried over"
    return said


def runs_text(runs: Sequence[RunRow]) -> str:
    rows = [
        (r.id, r.suite, r.status, r.cause, r.attempt, r.created_at,
         _seconds(duration_s(r, datetime.now(r.created_at.tzinfo))), closed_by(r),
         f"{r.passed or 0}/{r.failed or 0}/{r.errored or 0}" if r.status != "running" else "-")
        for r in runs
    ]
    return table(["run", "suite", "status", "cause", "attempt", "created", "secs", "closed by", "pass/fail/err"],
                 rows)


def _seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"


def as_the_runner_meant(run: RunRow, unwritten: RunSummary) -> tuple[RunRow, list[CaseRow]]:
    """The run (`run` is its row as opened) and the cases it ran, as its runner meant to record them when
    the final status write failed: what the run's reports still say."""
    now = datetime.now(timezone.utc)
    meant = dataclasses.replace(
        run, status=unwritten.status, cause=unwritten.cause, error=unwritten.error, passed=unwritten.passed,
        failed=unwritten.failed, errored=unwritten.errored, completed_at=now, terminated_by="runner",
    )
    cases = [
        CaseRow(ev.row_id, ev.run_id, ev.name, ev.status, ev.started_at, ev.started_at, ev.completed_at, ev.error,
                ev.cause, ev.passed, ev.score, ev.output, ev.detail, ev.duration_ms, None, ev.prompt_tokens,
                ev.completion_tokens, ev.total_tokens)
        for ev in unwritten.case_events(now)
    ]
    return meant, cases


def junit_xml(run: RunRow, cases: Sequence[CaseRow], status_write_failed: str | None = None) -> bytes:
    suite_el = ET.Element(
        "testsuite",
        name=xml_text(run.suite),
        tests=str(len(cases)),
        failures=str(sum(1 for c in cases if verdict(c) == "fail")),
        errors=str(sum(1 for c in cases if verdict(c) in ("error", "running"))),
        time=f"{duration_s(run) or 0:.3f}",
        timestamp=(run.started_at or run.created_at).isoformat(),
    )
    props = ET.SubElement(suite_el, "properties")
    for key in ("id", "status", "cause", "attempt", "parent_run_id"):
        value = getattr(run, key)
        ET.SubElement(props, "property", name=f"run.{key}", value="" if value is None else xml_text(str(value)))
    if status_write_failed is not None:  # the status above is the one the runner meant, not the row's
        ET.SubElement(props, "property", name="run.status_write_failed", value=xml_text(status_write_failed))
    for case in cases:
        el = ET.SubElement(
            suite_el, "testcase", classname=xml_text(run.suite), name=xml_text(case.name),
            time=f"{(case.duration_ms or 0) / 1000:.3f}",
        )
        v = verdict(case)
        if v == "fail":
            failure = ET.SubElement(el, "failure", message=xml_text(case.detail or "output did not match"))
            failure.text = xml_text(case.output or "")
        elif v in ("error", "running"):
            ET.SubElement(el, "error", message=xml_text(case.error or v), type=xml_text(case.cause or "error"))
        if case.output:
            ET.SubElement(el, "system-out").text = xml_text(case.output)
    return ET.tostring(ET.ElementTree(suite_el).getroot(), encoding="utf-8", xml_declaration=True)


# Characters XML 1.0 cannot hold, even escaped. A target's output may hold any (a terminal colour
# escape is \x1b), and a single one would make the whole report unreadable to a CI system.
_NOT_IN_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    """`text` with each character XML cannot hold written out as its escape (`\\x1b`), visibly."""
    return _NOT_IN_XML.sub(lambda found: ascii(found.group())[1:-1], text)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)
