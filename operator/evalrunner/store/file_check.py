"""Is the file at a database path one DuckDB can use? Its headers, read before DuckDB opens it, and its blocks.

DuckDB given a file it cannot use reports the wrong thing: a SQLite file
makes it reach for its SQLite extension (a download), and a truncated file
fails a read only later, after a command may have begun writing to it. The
headers tell a foreign file at once, and it is never opened; a file cut
short is caught right after opening, before anything is written to it.
"""

from __future__ import annotations

import os
import stat

import duckdb

from .errors import StoreCorruptError, StoreNotDuckDBError

SQLITE_MAGIC = b"SQLite format 3\x00"
DUCKDB_MAGIC = b"DUCK"
DUCKDB_MAGIC_AT = 8  # after the main header's checksum
# DuckDB's storage layout: a 4 KiB main header, two 4 KiB database headers, then blocks.
FIRST_BLOCK_AT = 3 * 4096


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
        head = file.read(len(SQLITE_MAGIC))
    if head.startswith(SQLITE_MAGIC):
        raise StoreNotDuckDBError(path, "it is a SQLite database")
    if len(head) < DUCKDB_MAGIC_AT + len(DUCKDB_MAGIC):
        return
    if head[DUCKDB_MAGIC_AT:DUCKDB_MAGIC_AT + len(DUCKDB_MAGIC)] != DUCKDB_MAGIC:
        raise StoreNotDuckDBError(path, "it does not start with DuckDB's header")


def refuse_missing_blocks(con: duckdb.DuckDBPyConnection, path: str) -> None:
    """Raise StoreCorruptError if a block the tables use lies past the end of the file.

    A file cut short may still open, and fail only a later read, after a command has begun to write.
    Called right after opening, before anything is written. (The header's own block count cannot
    tell: DuckDB may shorten the file past free blocks without rewriting it.)
    """
    # fetchall, never fetchone: a result left unfinished keeps its transaction open (see DuckDBStore._read_row).
    tables = [row[0] for row in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()]
    if not tables:
        return
    block_size = con.execute("SELECT block_size FROM pragma_database_size()").fetchall()[0][0]
    per_table = " UNION ALL ".join(
        "SELECT greatest(max(block_id), max(list_max(additional_block_ids))) AS block "
        f"FROM pragma_storage_info({_sql_string(table)})" for table in tables
    )
    last_block = con.execute(f"SELECT max(block) FROM ({per_table})").fetchall()[0][0]
    if last_block is None or last_block < 0:
        return
    needed = FIRST_BLOCK_AT + (last_block + 1) * block_size
    size = os.path.getsize(path)
    if size < needed:
        raise StoreCorruptError(path, f"it holds {size} bytes, but its tables use blocks up to byte {needed}")


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
