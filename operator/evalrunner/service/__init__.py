"""The store service: the single process that writes the DuckDB file in cluster mode."""

from .app import build_app

__all__ = ["build_app"]
