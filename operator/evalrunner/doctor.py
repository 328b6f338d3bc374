"""`evalrunner doctor`: the checks an operator makes before touching a stuck run (runbook case 2)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb

from . import summary
from .store import errors
from .store.duckdb_store import DuckDBStore, utcnow
from .store.schema import CURRENT_VERSION

LOW_DISK_BYTES = 100 * 1024 * 1024
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "afs", "ceph", "glusterfs"}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def diagnose(db_path: str) -> list[Check]:
    path = Path(db_path)
    checks = [Check("database file", True, f"{path} ({_size(path)})")]
    checks.append(_filesystem(path))
    checks.append(_free_disk(path))
    if not path.exists():
        return checks + [Check("open", True, "no database yet; the first `evalrunner run` creates it")]
    try:
        store = DuckDBStore.open(db_path)
    except errors.StoreLockedError as exc:
        return checks + [Check("lock", False, str(exc))]
    except errors.StoreFileUnusable:
        raise  # no database at all: bad input, which the caller reports as such, not a finding of the checks
    except errors.StoreError as exc:
        return checks + [Check("open", False, str(exc))]
    try:
        checks.append(Check("lock", True, "no other process holds the file"))
        checks.append(_writable(store))
        checks.append(_reserve(store))
        found = store.schema_version()
        checks.append(Check("schema version", found == CURRENT_VERSION, f"database {found}, this evalrunner {CURRENT_VERSION}"))
        running = store.running_runs()
        checks.append(Check("running runs", True, f"{len(running)}" + (f" ({', '.join(r.id for r in running[:5])})" if running else "")))
        spool = summary.spool_dir(db_path)
        spooled = sorted(p.stem for p in spool.glob("*.json")) if spool.exists() else []
        unreadable = sorted(p.name for p in spool.glob("*.unreadable")) if spool.exists() else []
        detail = "none" if not spooled else (
            f"{len(spooled)} waiting to be applied by the next command: {', '.join(spooled[:5])}")
        if unreadable:
            detail += f"; {len(unreadable)} unreadable, kept in {spool} for inspection: {', '.join(unreadable[:5])}"
        checks.append(Check("unwritten final statuses", not spooled, detail))
    finally:
        store.close()
    return checks


def _writable(store: DuckDBStore) -> Check:
    cur = store._cur()
    try:
        cur.begin()
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS doctor_probe (probed_at TIMESTAMPTZ)")
        cur.execute("UPDATE schema_version SET applied_at = applied_at WHERE version = (SELECT max(version) FROM schema_version)")
        cur.execute("INSERT INTO doctor_probe VALUES (?)", [utcnow()])
        cur.rollback()
        return Check("writable", True, "a write transaction succeeded (rolled back)")
    except duckdb.Error as exc:
        try:
            cur.rollback()
        except duckdb.Error:
            pass
        translated = errors.translate(exc, store.path)
        return Check("writable", False, str(translated or exc))


def _reserve(store: DuckDBStore) -> Check:
    """Opening the store has just tried to create the reserve if it was missing."""
    reserve = store.reserve
    if reserve is None:
        return Check("emergency reserve", True, "none for an in-memory database")
    if reserve.in_place():
        return Check("emergency reserve", True, f"{reserve.size // 1024} KiB in place at {reserve.path}")
    return Check(
        "emergency reserve", False,
        f"missing at {reserve.path} and no room to recreate it ({reserve.size // 1024} KiB, and as much again): "
        "free disk space, or a full disk may fail a run's last writes",
    )


def _free_disk(path: Path) -> Check:
    directory = path.parent if path.parent.exists() else Path.cwd()
    usage = shutil.disk_usage(directory)
    ok = usage.free >= LOW_DISK_BYTES
    return Check("free disk", ok, f"{usage.free / 2**20:.0f} MiB free on {directory}" + ("" if ok else " (low: writes may fail)"))


def _filesystem(path: Path) -> Check:
    target = os.path.realpath(path.parent if path.parent.exists() else ".")
    best, fstype = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and target.startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    except OSError:
        return Check("filesystem", True, "unknown (no /proc/mounts)")
    if fstype in NETWORK_FILESYSTEMS:
        return Check("filesystem", False, f"{fstype} at {best}: DuckDB files must not live on a network filesystem")
    return Check("filesystem", True, f"{fstype} at {best}")


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size / 2**20:.1f} MiB"
    except OSError:
        return "does not exist yet"
