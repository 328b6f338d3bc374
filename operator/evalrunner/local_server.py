"""Finding the server that holds a database file, so the CLI can work through it.

DuckDB lets one process write a file. When `evalrunner serve` holds it, the
other commands on the same file (`run`, `runs`, `show`, `recover`, `verify`,
`sweep`, `compare`) reach it over its API instead of failing: runs side by
side then go through its one writer, and a suite's lock policy (`Forbid`,
`Replace`) is decided there, as in a cluster.

`serve` leaves a record beside the file, `<db>.server.json`: its URL, its
PID and a token made for this start. The record is created with mode 0600
in the user's own directory, so only the same user can read the token, and
the token is what the server accepts for these calls: only the same user can
write through it. The record is removed when the server stops; one left by
a server that died is ignored (its PID is gone, or is not the lock's holder).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from .owner import Owner, local_liveness, this_process

RECORD_SUFFIX = ".server.json"


@dataclass(frozen=True)
class LocalServer:
    url: str  # as a client on this host reaches it
    pid: int
    token: str
    process_started_at: float | None = None  # with the PID, tells the server from a later process

    def alive(self) -> bool:
        owner = Owner(kind="process", host=socket.gethostname(), pid=self.pid,
                      process_started_at=self.process_started_at)
        return local_liveness(owner) == "alive"


def record_path(db: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(db)}{RECORD_SUFFIX}")


def client_url(host: str, port: int) -> str:
    """How a client on this host reaches a server listening on host:port (a wildcard means loopback)."""
    reach = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    return f"http://[{reach}]:{port}" if ":" in reach else f"http://{reach}:{port}"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def publish(db: str | os.PathLike[str], url: str, token: str) -> LocalServer:
    """Write this server's record (mode 0600, replacing a stale one) and return it."""
    server = LocalServer(url, os.getpid(), token, this_process().process_started_at)
    path = record_path(db)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(asdict(server), file)
    os.replace(partial, path)
    return server


def withdraw(db: str | os.PathLike[str], server: LocalServer) -> None:
    """Remove the record if it is still this server's."""
    found = _read(record_path(db))
    if found is not None and found.token == server.token:
        record_path(db).unlink(missing_ok=True)


def find(db: str | os.PathLike[str], holder_pid: int | None = None) -> LocalServer | None:
    """The live server that holds `db`, from its record; None if there is none (or it is not trustworthy)."""
    path = record_path(db)
    try:
        info = path.stat()
    except OSError:
        return None
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        return None  # someone else's, or readable by others: not a record this user's server wrote
    server = _read(path)
    if server is None or not server.alive():
        return None
    if holder_pid is not None and server.pid != holder_pid:
        return None
    return server


def _read(path: Path) -> LocalServer | None:
    try:
        data = json.loads(path.read_text())
        return LocalServer(str(data["url"]), int(data["pid"]), str(data["token"]),
                           data.get("process_started_at"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
