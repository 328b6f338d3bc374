"""Persistence: schema, state transitions and (for cluster mode) the HTTP client."""

from .duckdb_store import DuckDBStore
from .errors import StoreError
from .records import Admission, CaseEvent, CaseRow, RunRequest, RunRow, SaveReport

__all__ = ["Admission", "CaseEvent", "CaseRow", "DuckDBStore", "RunRequest", "RunRow", "SaveReport", "StoreError"]
