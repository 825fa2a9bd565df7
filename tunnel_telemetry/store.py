"""Store step: scrubbed reports and their relay state, durably.

``open_store(url)`` picks the backend from the URL scheme. The SQLite backend is the embedded
default: WAL mode, one connection per process and thread (opened lazily, so it is safe across
gunicorn's fork), ``synchronous=FULL`` so a 201 means the report is on disk.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from .errors import StoreUnavailable

log = logging.getLogger(__name__)

STATES = ("pending", "delivered", "failed", "expired", "skipped")


class StoreError(Exception):
    """A store that cannot be opened; the message is one line."""


@dataclass(frozen=True)
class Claim:
    """A pending relay leased to one owner."""

    uuid: str
    report: dict[str, Any]
    attempts: int
    created: float


class Store(Protocol):
    """What the collector needs from a backend (SQLite now, PostgreSQL later)."""

    backend: str

    def add(self, report: dict[str, Any], destinations: list[str], *,
            lease_owner: str | None = None,
            lease_seconds: float = 0.0) -> tuple[dict[str, Any], bool]: ...

    def get(self, uuid: str) -> dict[str, Any] | None: ...

    def update_report(self, uuid: str, fields: dict[str, Any]) -> dict[str, Any] | None: ...

    def claim(self, destination: str, limit: int, owner: str, lease_seconds: float,
              now: float | None = None, due_only: bool = True) -> list[Claim]: ...

    def finish(self, uuid: str, destination: str, owner: str, state: str, *,
               result: dict[str, Any] | None = None, error: str | None = None,
               next_attempt: float | None = None,
               report_fields: dict[str, Any] | None = None) -> bool: ...

    def release(self, uuids: list[str], destination: str, owner: str,
                next_attempt: float | None = None) -> int: ...

    def make_due(self, destination: str, now: float | None = None) -> int: ...

    def requeue(self, destination: str, states: tuple[str, ...] = ("failed",),
                now: float | None = None) -> int: ...

    def relay_state(self, uuid: str) -> dict[str, dict[str, Any]]: ...

    def backlog(self, now: float | None = None) -> dict[str, dict[str, Any]]: ...

    def count(self) -> int: ...

    def ping(self) -> bool: ...

    def close(self) -> None: ...


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    uuid TEXT PRIMARY KEY,
    received REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS relays (
    uuid TEXT NOT NULL REFERENCES reports(uuid),
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    next_attempt REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    last_error TEXT,
    result TEXT,
    PRIMARY KEY (uuid, destination)
);
CREATE INDEX IF NOT EXISTS relays_due ON relays (destination, state, next_attempt);
"""


class SQLiteStore:
    """SQLite backend; one connection per (process, thread)."""

    backend = "sqlite"

    def __init__(self, path: str, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            conn = self._connect()
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SQLITE_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            conn.close()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"database-url: cannot open {path}: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        return conn

    @property
    def _conn(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.conn = self._connect()
            local.pid = os.getpid()
        return local.conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locking) transaction; any SQLite error becomes a 503."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("store error: %s", type(exc).__name__)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreUnavailable("store_error") from None

    def add(self, report: dict[str, Any], destinations: list[str], *,
            lease_owner: str | None = None,
            lease_seconds: float = 0.0) -> tuple[dict[str, Any], bool]:
        """Store a report once by uuid and queue it for each destination, atomically.

        With ``lease_owner`` the new relay rows start leased to it for ``lease_seconds``, so
        the caller can attempt them at once without another process claiming them too.
        """
        now = time.time()
        lease_until = now + lease_seconds if lease_owner else None
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT INTO reports (uuid, received, body) VALUES (?, ?, ?) "
                "ON CONFLICT (uuid) DO NOTHING",
                (report["uuid"], now, _dumps(report)),
            )
            if cur.rowcount == 0:
                row = conn.execute("SELECT body FROM reports WHERE uuid = ?",
                                   (report["uuid"],)).fetchone()
                return json.loads(row[0]), False
            conn.executemany(
                "INSERT INTO relays (uuid, destination, created, next_attempt, lease_owner, "
                "lease_until) VALUES (?, ?, ?, ?, ?, ?)",
                [(report["uuid"], dest, now, now, lease_owner, lease_until)
                 for dest in destinations],
            )
        return report, True

    def get(self, uuid: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT body FROM reports WHERE uuid = ?", (uuid,)).fetchone()
        return json.loads(row[0]) if row else None

    def update_report(self, uuid: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Merge fields into a stored report (e.g. the OONI measurement id)."""
        with self._tx() as conn:
            row = conn.execute("SELECT body FROM reports WHERE uuid = ?", (uuid,)).fetchone()
            if row is None:
                return None
            body = json.loads(row[0])
            body.update(fields)
            conn.execute("UPDATE reports SET body = ? WHERE uuid = ?", (_dumps(body), uuid))
        return body

    def claim(self, destination: str, limit: int, owner: str, lease_seconds: float,
              now: float | None = None, due_only: bool = True) -> list[Claim]:
        """Lease up to ``limit`` pending relays for ``destination``, oldest first."""
        now = time.time() if now is None else now
        due = now if due_only else float("inf")
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT r.uuid, p.body, r.attempts, r.created FROM relays r "
                "JOIN reports p ON p.uuid = r.uuid "
                "WHERE r.destination = ? AND r.state = 'pending' AND r.next_attempt <= ? "
                "AND (r.lease_until IS NULL OR r.lease_until < ?) "
                "ORDER BY r.created LIMIT ?",
                (destination, due, now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE relays SET lease_owner = ?, lease_until = ? "
                "WHERE uuid = ? AND destination = ?",
                [(owner, now + lease_seconds, row[0], destination) for row in rows],
            )
        return [Claim(row[0], json.loads(row[1]), row[2], row[3]) for row in rows]

    def finish(self, uuid: str, destination: str, owner: str, state: str, *,
               result: dict[str, Any] | None = None, error: str | None = None,
               next_attempt: float | None = None,
               report_fields: dict[str, Any] | None = None) -> bool:
        """Record the outcome of a leased relay; False when the lease was lost.

        ``report_fields`` are merged into the stored report in the same transaction (e.g. the
        OONI measurement id), and only when the lease was still held.
        """
        if state not in STATES:
            raise ValueError(f"unknown relay state {state!r}")
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE relays SET state = ?, attempts = attempts + 1, last_error = ?, "
                "result = COALESCE(?, result), next_attempt = COALESCE(?, next_attempt), "
                "lease_owner = NULL, lease_until = NULL "
                "WHERE uuid = ? AND destination = ? AND lease_owner = ? AND state = 'pending'",
                (state, error, _dumps(result) if result is not None else None, next_attempt,
                 uuid, destination, owner),
            )
            if cur.rowcount != 1:
                return False
            if report_fields:
                row = conn.execute("SELECT body FROM reports WHERE uuid = ?",
                                   (uuid,)).fetchone()
                body = {**json.loads(row[0]), **report_fields}
                conn.execute("UPDATE reports SET body = ? WHERE uuid = ?", (_dumps(body), uuid))
            return True

    def release(self, uuids: list[str], destination: str, owner: str,
                next_attempt: float | None = None) -> int:
        """Give leased relays back unattempted (attempts unchanged); returns how many."""
        if not uuids:
            return 0
        with self._tx() as conn:
            cur = conn.executemany(
                "UPDATE relays SET lease_owner = NULL, lease_until = NULL, "
                "next_attempt = COALESCE(?, next_attempt) "
                "WHERE uuid = ? AND destination = ? AND lease_owner = ? AND state = 'pending'",
                [(next_attempt, uuid, destination, owner) for uuid in uuids],
            )
            return cur.rowcount

    def make_due(self, destination: str, now: float | None = None) -> int:
        """Make every pending relay to ``destination`` due now, whatever its backoff."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            return conn.execute(
                "UPDATE relays SET next_attempt = ? "
                "WHERE destination = ? AND state = 'pending' AND next_attempt > ?",
                (now, destination, now),
            ).rowcount

    def requeue(self, destination: str, states: tuple[str, ...] = ("failed",),
                now: float | None = None) -> int:
        """Put finished relays (by default the permanently failed ones) back in the queue."""
        bad = [s for s in states if s not in STATES or s == "pending"]
        if bad:
            raise ValueError(f"cannot requeue relay states {bad}")
        now = time.time() if now is None else now
        with self._tx() as conn:
            return conn.executemany(
                "UPDATE relays SET state = 'pending', next_attempt = ?, lease_owner = NULL, "
                "lease_until = NULL WHERE destination = ? AND state = ?",
                [(now, destination, state) for state in states],
            ).rowcount

    def relay_state(self, uuid: str) -> dict[str, dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT destination, state, attempts, last_error, result, next_attempt "
            "FROM relays WHERE uuid = ?", (uuid,),
        ).fetchall()
        return {
            row[0]: {"state": row[1], "attempts": row[2], "error": row[3],
                     "result": json.loads(row[4]) if row[4] else None, "next_attempt": row[5]}
            for row in rows
        }

    def backlog(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Pending relays per destination and the age of the oldest one, in seconds."""
        now = time.time() if now is None else now
        rows = self._conn.execute(
            "SELECT destination, COUNT(*), MIN(created) FROM relays "
            "WHERE state = 'pending' GROUP BY destination"
        ).fetchall()
        return {row[0]: {"pending": row[1], "oldest_age_s": round(now - row[2], 3)}
                for row in rows}

    def count(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM reports").fetchone()[0]

    def ping(self) -> bool:
        try:
            self._conn.execute("SELECT 1 FROM reports LIMIT 1").fetchall()
        except sqlite3.Error:
            return False
        return True

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
        self._local = threading.local()


def sqlite_path(url: str) -> str:
    """sqlite:///relative/path -> relative/path; sqlite:////abs/path -> /abs/path."""
    rest = url[len("sqlite://"):]
    if not rest.startswith("/") or rest == "/":
        raise StoreError("database-url: expected sqlite:///relative/path or sqlite:////abs/path")
    return unquote(rest[1:])


def open_store(url: str) -> Store:
    """Open the backend named by the URL scheme; StoreError with one line when it cannot."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        raise StoreError("database-url: not a valid URL") from None
    if scheme == "sqlite":
        return SQLiteStore(sqlite_path(url))
    if scheme in ("postgres", "postgresql"):
        try:
            from .store_pg import PostgresStore  # noqa: PLC0415 - optional backend
        except ImportError:
            raise StoreError("database-url: PostgreSQL support is not installed: "
                             "pip install 'tunnel-telemetry[postgres]'") from None
        return PostgresStore(url)
    raise StoreError(f"database-url: unsupported scheme {scheme or '(none)'!r}; "
                     "use sqlite:/// or postgresql://")
