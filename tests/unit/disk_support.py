"""Small real filesystems for the full-disk tests: a tmpfs of a few MiB, filled for real.

Mounting needs root (CI runs as root); without it the tests fail, as the
other tmpfs tests do, rather than skip what they exist to prove.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_disk(mountpoint: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of `size` at `mountpoint`, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs and must run as root (CI does)")
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def grow(mountpoint: Path, size: str) -> None:
    """Free space the way an operator would, by giving the filesystem more room (files stay as they are)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mountpoint)], check=True)


def fill(path: Path) -> int:
    """Append to `path` until the disk refuses; returns the bytes written. Unbuffered, so nothing is left to flush."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for chunk in (65536, 4096, 512, 1):
            block = b"\x01" * chunk
            try:
                while True:
                    written += os.write(fd, block)
            except OSError:
                continue
    finally:
        os.close(fd)
    return written
