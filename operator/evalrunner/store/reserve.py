"""An emergency reserve of disk space beside the database file.

When the disk fills up, the writes that matter most come last: the batch of
case results in flight, the run's final status, the summary left for
recovery. So the store keeps a ballast file (`DB.reserve`) of
`RESERVE_BYTES`; the first write that fails for lack of space deletes it and
is retried once, with that much room. The reserve is recreated by a later
open, once there is room for it and as much again.

The ballast is written with random bytes and fsynced: a sparse file, or
zeros on a compressing filesystem (btrfs, ZFS), would hold no real blocks,
and deleting it would free nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

# Measured: a run's final transaction appends about 1 KiB to the WAL, 2 KiB when it
# carries a smoke run's 6 case results, 4 KiB for 20; the summaries are 1.7 and 4.7 KiB.
# Outputs (up to 64 KiB each) can make them much larger, so 256 KiB: room for the rest
# of a run's batches after the release, yet small next to any disk a database lives on.
RESERVE_BYTES = 256 * 1024


class DiskReserve:
    def __init__(self, db_path: str, size: int = RESERVE_BYTES):
        self.path = Path(f"{db_path}.reserve")
        self.size = size

    def in_place(self) -> bool:
        try:
            return self.path.stat().st_size >= self.size
        except OSError:
            return False

    def ensure(self) -> str | None:
        """Create the reserve unless it is in place; None on success, else why it could not be.

        Only when the disk has room for it twice over: a reserve that leaves
        no room for ordinary writes would be released by the very next one.
        """
        if self.in_place():
            return None
        tmp = self.path.with_name(self.path.name + ".tmp")
        with contextlib.suppress(OSError):  # left by a process killed while writing it
            tmp.unlink()
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError as exc:
            return f"cannot check free space: {exc}"
        if free < 2 * self.size:
            return (f"only {free // 1024} KiB free; the reserve needs {2 * self.size // 1024} KiB "
                    "(itself and as much again)")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(os.urandom(self.size))
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return f"{type(exc).__name__}: {exc}"
        return None

    def release(self) -> bool:
        """Delete the reserve; True when that freed its space (False if it was not there)."""
        try:
            self.path.unlink()
        except OSError:
            return False
        return True
