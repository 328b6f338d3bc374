"""The progress bar and log lines on one terminal: a log line never lands on the bar's line.

The terminal is a StringIO read back as a terminal would show it: `\\r`
returns to the start of the line and `ESC[2K` erases it.
"""

from __future__ import annotations

import io
import re

from evalrunner import log
from evalrunner.report import ProgressBar


def screen(raw: str) -> list[str]:
    """The lines a terminal would show after `raw`: `\\r` then new text overwrites the line (the bar
    only ever grows, so overwriting is replacing), `ESC[2K` erases it."""
    lines, current = [], ""
    for token in re.split(r"(\r|\n|\x1b\[2K)", raw):
        if token == "\n":
            lines.append(current)
            current = ""
        elif token in ("\r", "\x1b[2K"):
            current = ""
        else:
            current += token
    return lines + ([current] if current else [])


def test_log_lines_are_written_above_the_bar_not_after_it():
    terminal = io.StringIO()
    bar = ProgressBar(3, stream=terminal, enabled=True)
    log.configure("console", "info", stream=bar.log_stream())
    try:
        bar.update("pass")
        log.get().warning("eval.heartbeat_failed", run_id="r1")
        bar.update("fail")
        log.get().info("eval.case_completed", run_id="r1")
        bar.update("pass")
        bar.finish()
    finally:
        log.configure("console", "warning")
    shown = screen(terminal.getvalue())
    assert len(shown) == 3, shown
    assert "eval.heartbeat_failed" in shown[0] and "/3" not in shown[0], shown
    assert "eval.case_completed" in shown[1] and "/3" not in shown[1], shown
    assert shown[2].startswith("[") and shown[2].rstrip().endswith("error 0") and "3/3" in shown[2]
