"""Is the file at a database path one DuckDB can use? Read from its headers before DuckDB opens it.

DuckDB given a file it cannot use reports the wrong thing: a SQLite file
makes it reach for its SQLite extension (a download), and a truncated file
fails a read only later, after a command may have begun writing to it. The
headers tell both apart at once, and a refused file is never opened, so
never changed.
"""

from __future__ import annotations

import os
import stat
import struct

from .errors import StoreCorruptError, StoreNotDuckDBError

SQLITE_MAGIC = b"SQLite format 3\x00"
DUCKDB_MAGIC = b"DUCK"
DUCKDB_MAGIC_AT = 8  # after the main header's checksum
# DuckDB's storage layout: a 4 KiB main header, two 4 KiB database headers (the active one has the
# higher iteration), then `block_count` blocks of `block_alloc_size` bytes each.
HEADER_BYTES = 4096
FIRST_BLOCK_AT = 3 * HEADER_BYTES
# A database header: checksum, iteration, meta block, free list, block count, block alloc size (uint64 each).
DATABASE_HEADER = struct.Struct("<QQQQQQ")
# Block sizes DuckDB may use; anything else means the header is not one this check understands.
BLOCK_SIZES = frozenset(2**n for n in range(12, 31))


def refuse_unusable(path: str) -> None:
    """Raise StoreNotDuckDBError or StoreCorruptError for a file at `path` that DuckDB could not use.

    No file yet is fine (the store creates one). So is a file too short to judge, which may be one
    another process is creating: DuckDB then answers, with a lock error or one `errors.translate` names.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise StoreNotDuckDBError(path, "it is a directory")
    if not stat.S_ISREG(mode):
        raise StoreNotDuckDBError(path, "it is not a regular file")
    with open(path, "rb") as file:
        head = file.read(FIRST_BLOCK_AT)
        size = os.fstat(file.fileno()).st_size
    if head.startswith(SQLITE_MAGIC):
        raise StoreNotDuckDBError(path, "it is a SQLite database")
    if len(head) < DUCKDB_MAGIC_AT + len(DUCKDB_MAGIC):
        return
    if head[DUCKDB_MAGIC_AT:DUCKDB_MAGIC_AT + len(DUCKDB_MAGIC)] != DUCKDB_MAGIC:
        raise StoreNotDuckDBError(path, "it does not start with DuckDB's header")
    if len(head) < FIRST_BLOCK_AT:
        return
    needed = _bytes_the_header_counts(head)
    if needed is not None and size < needed:
        raise StoreCorruptError(path, f"it holds {size} bytes, but its header counts blocks up to byte {needed}")


def _bytes_the_header_counts(head: bytes) -> int | None:
    """The file size the active database header implies, or None if the headers do not read as expected."""
    headers = [DATABASE_HEADER.unpack_from(head, offset) for offset in (HEADER_BYTES, 2 * HEADER_BYTES)]
    _, _, _, _, block_count, block_size = max(headers, key=lambda header: header[1])  # the higher iteration
    if block_size not in BLOCK_SIZES or block_count > 2**40:
        return None
    return FIRST_BLOCK_AT + block_count * block_size
