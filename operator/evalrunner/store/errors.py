"""Store failures translated into messages that say what happened and what to do.

DuckDB has no dedicated exception classes for a held lock, a read-only file
or a full disk, so these are recognised by their message text.
"""

from __future__ import annotations

import errno
import re

import duckdb
import psutil


class StoreError(Exception):
    """The run could not be recorded. The message is meant for the user as is."""


class StoreLockedError(StoreError):
    def __init__(self, path: str, pid: int | None, holder: str | None):
        self.path, self.pid, self.holder = path, pid, holder
        who = f"process {pid}" if pid else "another process"
        if holder:
            who += f" ({holder})"
        command = holder or ""
        if " controller" in command:
            advice = ("A controller's file is read through its API and its /evals page "
                      "(`kubectl port-forward` to its Service).")
        elif " serve" in command:
            advice = ("That server did not leave a record this user can use (`<db>.server.json`, mode 0600) "
                      "for the CLI to work through it; is it another user's, or an older evalrunner?")
        else:
            advice = ("Wait for it to finish (or stop it), or use another file with --db. To run suites "
                      "side by side on one file, start `evalrunner serve --db FILE` first: `run`, `runs`, `show`, "
                      "`recover`, `verify`, `sweep` and `compare` then work through it.")
        super().__init__(f"database {path} is in use by {who}. DuckDB lets one process write a file at a time. "
                         + advice)


class StoreReadOnlyError(StoreError):
    def __init__(self, path: str, detail: str):
        super().__init__(
            f"database {path} cannot be written ({detail}). "
            "Make the file and its directory writable, or use another file with --db."
        )


class StoreDiskFullError(StoreError):
    def __init__(self, path: str, detail: str):
        super().__init__(
            f"no space left to write database {path} ({detail}). "
            "Free disk space; no committed row is lost, and the next command terminates any run left running."
        )


class StoreReserveMissingError(StoreError):
    def __init__(self, path: str, reserve_path: str, free_bytes: int, reserve_bytes: int):
        super().__init__(
            f"not starting a run: the disk holding {path} is nearly full ({free_bytes // 1024} KiB free), with no "
            f"room for the {reserve_bytes // 1024} KiB emergency reserve ({reserve_path}) that lets a run's results "
            "survive a full disk. Free disk space and run again; listing and closing runs still work."
        )


class StoreSchemaTooNewError(StoreError):
    def __init__(self, path: str, found: int, supported: int):
        super().__init__(
            f"database {path} has schema version {found}, but this evalrunner supports up to {supported}. "
            "Upgrade evalrunner; the file was left untouched."
        )


class StoreFileUnusable(StoreError):
    """The file given as the database cannot be one: bad input, not a failure to record."""


class StoreNotDuckDBError(StoreFileUnusable):
    def __init__(self, path: str, what: str):
        super().__init__(f"{path} is not a DuckDB database ({what}). It was left untouched; give an evalrunner "
                         "database, or a path where none exists yet, with --db.")


class StoreCorruptError(StoreFileUnusable):
    def __init__(self, path: str, detail: str):
        super().__init__(f"the file at {path} is not a readable DuckDB database (truncated or corrupt: {detail}). "
                         "It was left untouched; restore it from a copy, or give another path with --db.")


# DuckDB's words for a file that is cut short or damaged, at open or at a later read.
_CORRUPT = ("not a valid duckdb database", "could not read enough bytes", "corrupt database file",
            "checksum mismatch", "does not match stored checksum")
_LOCK = re.compile(r"Could not set lock on file .*?Conflicting lock is held in (?P<exe>.*?) \(PID (?P<pid>\d+)\)", re.S)


def translate(exc: BaseException, path: str) -> StoreError | None:
    """Map a DuckDB or OS error to a StoreError, or None when it is not one we recognise."""
    text = str(exc)
    match = _LOCK.search(text)
    if match:
        pid = int(match.group("pid"))
        return StoreLockedError(path, pid, _describe_process(pid) or match.group("exe"))
    if "Could not set lock" in text:
        return StoreLockedError(path, None, None)
    lowered = text.lower()
    if is_out_of_space(exc) or "no space left" in lowered or "disk quota exceeded" in lowered:
        return StoreDiskFullError(path, first_line(text))
    if (
        isinstance(exc, PermissionError)
        or "read-only file system" in lowered
        or "permission denied" in lowered
        or "cannot open file" in lowered and "read-only" in lowered
    ):
        return StoreReadOnlyError(path, first_line(text))
    if isinstance(exc, duckdb.SerializationException) or any(sign in lowered for sign in _CORRUPT):
        return StoreCorruptError(path, first_line(text))
    return None


def is_out_of_space(exc: BaseException) -> bool:
    """A file write refused for lack of space (a full disk, or the user's quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _describe_process(pid: int) -> str | None:
    try:
        proc = psutil.Process(pid)
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    return cmd[:200] or None
