"""Shared helpers for tests that drive the real `evalrunner` command in subprocesses.

Everything here talks to real processes and real DuckDB files: the CLI runs
as its console script, a lock holder is a real Python process holding
`duckdb.connect(path)`, an owner is a real (live or reaped) process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

from evalrunner.models import LockPolicy
from evalrunner.owner import Owner
from evalrunner.store import DuckDBStore
from evalrunner.store.records import RunRequest, RunRow

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "suites"
CLI_TIMEOUT_S = 30.0


def evalrunner_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m evalrunner.cli`."""
    script = Path(sys.executable).parent / "evalrunner"
    if script.exists():
        return [str(script)]
    found = shutil.which("evalrunner")
    return [found] if found else [sys.executable, "-m", "evalrunner.cli"]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EVALRUNNER_DB", "EVALRUNNER_FAULTS")}
    env.update(extra or {})
    return env


def cli_args(args: Sequence[str], db: str | os.PathLike[str], log_format: str | None = "json") -> list[str]:
    head = [*evalrunner_command(), "--db", str(db)]
    if log_format:
        head += ["--log-format", log_format]
    return head + [str(a) for a in args]


def run_cli(
    args: Sequence[str],
    db: str | os.PathLike[str],
    env: dict[str, str] | None = None,
    log_format: str | None = "json",
    timeout: float = CLI_TIMEOUT_S,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `evalrunner --db DB [--log-format json] ARGS...` to completion."""
    return subprocess.run(
        cli_args(args, db, log_format), capture_output=True, text=True, env=cli_env(env), timeout=timeout, cwd=cwd
    )


def start_cli(
    args: Sequence[str],
    db: str | os.PathLike[str],
    env: dict[str, str] | None = None,
    log_format: str | None = "json",
) -> subprocess.Popen[str]:
    """Start `evalrunner` in the background; stderr is a pipe to read log lines from."""
    return subprocess.Popen(
        cli_args(args, db, log_format),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(env),
    )


class LogReader:
    """Reads a process's stderr on a thread, so a test can wait for lines without blocking on the pipe."""

    def __init__(self, proc: subprocess.Popen[str]):
        self.proc = proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def events(self) -> list[dict[str, Any]]:
        return parse_json_lines(self.lines)

    def wait_for(self, event: str, count: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Wait until `count` JSON log lines with `event` were seen; return them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in parse_json_lines(self.lines, strict=False) if e.get("event") == event]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self._done:
                    raise AssertionError(
                        f"saw {len(found)} of {count} {event!r} lines (process exited: {self._done});"
                        f" stderr so far:\n" + "\n".join(self.lines)
                    )
                self._cond.wait(left)

    def wait_durable(self, case_ids: Iterable[str], running: int = 0, timeout: float = 15.0) -> None:
        """Wait until the runner says (`eval.cases_saved`, a debug event) these case results are committed,
        and, after the last of them, at least `running` rows saved as running (the cases in flight)."""
        wanted = set(case_ids)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                saved: set[str] = set()
                in_flight = 0
                for event in parse_json_lines(self.lines, strict=False):
                    if event.get("event") == "eval.cases_saved":
                        saved |= set(event.get("case_ids", ()))
                        in_flight = in_flight + len(event.get("running_ids", ())) if wanted <= saved else 0
                if wanted <= saved and in_flight >= running:
                    return
                left = deadline - time.monotonic()
                if left <= 0 or self._done:
                    raise AssertionError(f"case results {sorted(wanted - saved)} (and {running} running rows) "
                                         f"were never logged as committed; is --log-level debug set?")
                self._cond.wait(left)

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)


def wait_for_log_lines(
    proc: subprocess.Popen[str], event: str, count: int = 1, timeout: float = 15.0
) -> tuple[LogReader, list[dict[str, Any]]]:
    reader = LogReader(proc)
    return reader, reader.wait_for(event, count, timeout)


def parse_json_lines(lines: Iterable[str], strict: bool = True) -> list[dict[str, Any]]:
    """Each non-empty line as a JSON object; `strict` fails on any line that is not one."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            if strict:
                raise AssertionError(f"stderr line is not JSON: {line!r}") from None
            continue
        if not isinstance(obj, dict):
            if strict:
                raise AssertionError(f"stderr line is not a JSON object: {line!r}")
            continue
        out.append(obj)
    return out


def events(stderr: str) -> list[dict[str, Any]]:
    return parse_json_lines(stderr.splitlines())


def kill_and_reap(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout)


# ---------------------------------------------------------------- suites


def write_suite(directory: Path, text: str, name: str = "suite.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def copy_example_targets(directory: Path) -> Path:
    """Put examples/suites/targets.py beside a temp suite, so `targets:...` callables resolve."""
    return Path(shutil.copy(EXAMPLES / "targets.py", directory / "targets.py"))


# ---------------------------------------------------------------- rows owned by other processes


def start_sleeper(seconds: float = 60) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", str(seconds)])


def process_owner(pid: int, started_at: float | None = None) -> Owner:
    return Owner(
        kind="process",
        host=socket.gethostname(),
        pid=pid,
        process_started_at=started_at if started_at is not None else psutil.Process(pid).create_time(),
    )


def dead_owner() -> Owner:
    """The owner record of a real process that has exited and been reaped."""
    proc = start_sleeper(60)
    owner = process_owner(proc.pid)
    proc.kill()
    proc.wait(10)
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).create_time() != owner.process_started_at
    return owner


def insert_running_row(
    db: Path,
    suite: str,
    owner: Owner,
    case_names: Sequence[str] = ("a",),
    lock_policy: LockPolicy = LockPolicy.ALLOW,
    timeout_seconds: float = 1.0,
) -> RunRow:
    """Insert a `running` row as another process would have, then close the file."""
    with DuckDBStore.open(db) as store:
        admission = store.start_run(RunRequest(
            suite=suite,
            case_names=tuple(case_names),
            timeout_seconds=timeout_seconds,
            owner=owner,
            lock_policy=lock_policy,
        ))
        return admission.run


def read_run(db: Path, run_id: str) -> RunRow | None:
    with DuckDBStore.open(db) as store:
        return store.get_run(run_id)


def read_runs(db: Path, suite: str | None = None) -> list[RunRow]:
    with DuckDBStore.open(db) as store:
        return store.list_runs(suite=suite, limit=1000)


def query(db: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with DuckDBStore.open(db) as store:
        return store._cur().execute(sql, list(params)).fetchall()
