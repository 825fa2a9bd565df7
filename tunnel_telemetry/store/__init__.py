"""Store step: scrubbed reports and their relay state, durably (SQLite or PostgreSQL)."""

from __future__ import annotations

from urllib.parse import urlsplit

from .base import (
    STATES,
    Claim,
    Enqueue,
    ExportFilter,
    RelayQueue,
    Reports,
    Store,
    StoreError,
    dumps,
)
from .sqlite import SQLiteStore, sqlite_options, sqlite_path

__all__ = ["STATES", "Claim", "Enqueue", "ExportFilter", "RelayQueue", "Reports", "SQLiteStore",
           "Store", "StoreError", "dumps", "open_store"]


def open_store(url: str) -> Store:
    """Open the backend named by the URL scheme; StoreError with one line when it cannot."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        raise StoreError("database-url: not a valid URL") from None
    if scheme == "sqlite":
        return SQLiteStore(sqlite_path(url), **sqlite_options(url))
    if scheme in ("postgres", "postgresql"):
        try:
            from .postgres import PostgresStore  # noqa: PLC0415 - optional backend
        except ImportError:
            raise StoreError("database-url: PostgreSQL support is not installed: "
                             "pip install 'tunnel-telemetry[postgres]'") from None
        return PostgresStore(url)
    raise StoreError(f"database-url: unsupported scheme {scheme or '(none)'!r}; "
                     "use sqlite:/// or postgresql://")
