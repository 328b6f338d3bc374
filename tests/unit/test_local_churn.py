"""Local churn: many `evalrunner run` processes, SIGKILLed at random, with faults injected and one disk full.

DuckDB lets one process write a file at a time, so each database file gets
its runs one after another (each new command first closes what the killed
one left), and several files churn in parallel; one of them lives on a 2 MiB
tmpfs that fills up. Afterwards, with space freed and one `evalrunner runs`
per file:

- no run and no case row is left `running`;
- every case a runner logged as completed is a completed row, unless the
  runner was SIGKILLed before that result was committed (it never logged
  `eval.cases_saved` for it) within the last moments before the kill, or a
  `case_save=<case>` fault made its save fail on purpose;
- every failed run and case row has a cause from the closed set.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from disk_support import grow, small_disk
from helpers import EXAMPLES, LogReader, copy_example_targets, parse_json_lines, query, run_cli, start_cli

from evalrunner.models import Cause

CHURN_SECONDS = 35.0
FILES_ON_LOCAL_DISK = 3
# A result is committed within one flush interval (50 ms) plus one batch write. What a SIGKILLed
# runner may lose is judged by its durable signal (`eval.cases_saved`); this bound only adds that the
# uncommitted ones were recent, generous because CI machines can be loaded many times over.
KILL_WINDOW_S = 5.0
CAUSES = {c.value for c in Cause}


@dataclass
class Attempt:
    db: Path
    suite: str
    faults: str
    killed_at: datetime | None = None
    returncode: int | None = None
    lines: list[dict] = field(default_factory=list)

    def faulted_cases(self) -> set[str]:
        return {part.split("=", 1)[1] for part in self.faults.split(",") if part.startswith("case_save=")}


def churn_suite(directory: Path) -> Path:
    """Twelve short cases, three at a time: about half a second, long enough to be killed mid-run."""
    copy_example_targets(directory)
    path = directory / "churn.yaml"
    path.write_text(
        "name: churn\ntimeout_seconds: 5\nconcurrency: 3\nlock_policy: Allow\n"
        "target: {python: {callable: 'targets:slow'}}\ncases:\n"
        + "".join(f"  - {{id: c{i:02d}, input: {0.05 + 0.02 * i:.2f}, expected: done}}\n" for i in range(12))
    )
    return path


def churn(db: Path, suites: dict[str, tuple[Path, list[str]]], seed: int, until: float, out: list[Attempt]) -> None:
    """Runs on one file, one after another, until `until`: some killed, some with faults.

    A quarter are killed at a random moment (often before the run even
    starts), a quarter just after a random case completed (inside the
    group-commit window), the rest run to their end.
    """
    rng = random.Random(seed)
    while time.monotonic() < until:
        name = rng.choice(sorted(suites))
        path, cases = suites[name]
        faults = rng.choice(["", "", f"case_save={rng.choice(cases)}", "suite_status_write=*", "heartbeat=*",
                             f"case_save={rng.choice(cases)},suite_status_write=*"])
        attempt = Attempt(db, name, faults)
        proc = start_cli(["--log-level", "debug", "run", path, "--no-progress"], db,
                         env={"EVALRUNNER_FAULTS": faults} if faults else None)
        reader = LogReader(proc)
        mode = rng.random()
        try:
            if mode < 0.25:
                proc.wait(timeout=rng.uniform(0.2, 2.5))
            elif mode < 0.5:
                with contextlib.suppress(AssertionError):  # it ended (refused, or done) before that many
                    reader.wait_for("eval.case_completed", rng.randint(1, len(cases)), timeout=20)
                time.sleep(rng.uniform(0, 0.1))
                if proc.poll() is None:
                    raise subprocess.TimeoutExpired(proc.args, 0)
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            attempt.killed_at = datetime.now(timezone.utc)
            proc.kill()
        proc.wait()
        reader.join()
        attempt.returncode = proc.returncode
        attempt.lines = parse_json_lines(reader.lines, strict=False)  # a kill can cut the last line short
        out.append(attempt)


def test_churn_of_killed_and_faulted_local_runs_leaves_nothing_running_and_loses_no_committed_case(tmp_path):
    suites = {
        "smoke": (EXAMPLES / "smoke.yaml", ["add", "mul", "div", "pow", "neg", "precedence"]),
        "churn": (churn_suite(tmp_path), [f"c{i:02d}" for i in range(12)]),
    }
    attempts: list[Attempt] = []
    with small_disk(tmp_path / "disk", "2m") as disk:
        (disk / "other-files").write_bytes(b"\x01" * 256 * 1024)
        dbs = [tmp_path / f"churn-{i}.duckdb" for i in range(FILES_ON_LOCAL_DISK)] + [disk / "full.duckdb"]
        until = time.monotonic() + CHURN_SECONDS
        workers = [threading.Thread(target=churn, args=(db, suites, seed, until, attempts))
                   for seed, db in enumerate(dbs)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(CHURN_SECONDS + 90)

        grow(disk, "16m")  # space is freed
        for db in dbs:
            listing = run_cli(["runs"], db)
            assert listing.returncode == 0, listing.stderr
        rows = {db: _rows(db) for db in dbs}

    assert len(attempts) >= 2 * len(dbs) and any(a.killed_at for a in attempts)
    for db in dbs:
        assert query(db, "SELECT count(*) FROM eval_runs WHERE status = 'running'") == [(0,)], db
        assert query(db, "SELECT count(*) FROM eval_cases WHERE status = 'running'") == [(0,)], db
        runs, cases = rows[db]
        bad_causes = [r for r in runs if r[1] == "failed" and r[2] not in CAUSES]
        bad_causes += [c for c in cases.values() if c[0] == "failed" and c[1] not in CAUSES]
        assert not bad_causes, bad_causes

    closers = _closing_attempts(attempts)
    lost = []
    for attempt in attempts:
        for case_id, completed_at in _completed(attempt).items():
            status = rows[attempt.db][1].get(case_id, (None,))[0]
            if status == "completed" or _may_be_lost(attempt, case_id, completed_at, closers):
                continue
            lost.append((attempt.db.name, attempt.faults, attempt.killed_at, case_id, status))
    assert not lost, f"completed cases lost: {lost}"


def _rows(db: Path) -> tuple[list[tuple], dict[str, tuple]]:
    runs = query(db, "SELECT id, status, cause FROM eval_runs")
    cases = {r[0]: r[1:] for r in query(db, "SELECT id, status, cause FROM eval_cases")}
    return runs, cases


def _completed(attempt: Attempt) -> dict[str, datetime]:
    """case row id -> when the runner logged it completed."""
    return {e["case_id"]: datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00"))
            for e in attempt.lines if e.get("event") == "eval.case_completed"}


def _closing_attempts(attempts: list[Attempt]) -> dict[str, Attempt]:
    """run id -> the attempt whose command closed it from its runner's summary (it applied the case results)."""
    return {e["run_id"]: a for a in attempts for e in a.lines
            if e.get("event") == "eval.run_terminated" and "runner summary" in str(e.get("terminated_by"))}


def _may_be_lost(attempt: Attempt, case_id: str, completed_at: datetime, closers: dict[str, Attempt]) -> bool:
    run_id, name = case_id.split("/", 1)
    if name in attempt.faulted_cases():
        return True  # its save was made to fail: it ends failed (case_save_failed), as runbook case 1 says
    closer = closers.get(run_id)
    if closer is not None and name in closer.faulted_cases():
        return True  # the command that applied the summary could not save that row either
    if attempt.killed_at is None:
        return False
    committed = any(case_id in e.get("case_ids", ()) for e in attempt.lines if e.get("event") == "eval.cases_saved")
    return not committed and (attempt.killed_at - completed_at).total_seconds() < KILL_WINDOW_S
