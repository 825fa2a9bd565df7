"""Store step: scrubbed reports and their relay state, durably.

``open_store(url)`` picks the backend from the URL scheme. The SQLite backend is the embedded
default: WAL mode, one connection per process and thread (opened lazily, so it is safe across
gunicorn's fork), ``synchronous=FULL`` so a 201 means the report is on disk (``NORMAL`` would
survive a crash of the process but not of the machine: the last commits before a power loss
would be gone although acknowledged).

Each commit costs an fsync (about 1 ms on a typical disk), so concurrent ``add`` calls of one
process are group-committed: one caller writes everything queued in one transaction while the
others wait for that commit, and each caller returns only after the commit holding its report.
Durability is unchanged (every 201 still follows its own fsynced commit); the fsync is shared.

Writes run through ``green.offload``: in a gevent worker, in a real thread (SQLite and flock
block), so the worker's other requests go on meanwhile. That code only touches native locks,
and its error lines are logged by the caller.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ..errors import StoreUnavailable
from . import green
from .base import STATES, Claim, Enqueue, ExportFilter, StoreError, dumps

log = logging.getLogger(__name__)

DEFAULT_MIN_FREE_MB = 64.0  # free disk below which /healthz says the SQLite store is not ok
_FORK_LOCK = green.native_lock()
# Writers queue on an flock of this file (beside the database) before taking SQLite's write
# lock: the kernel wakes the next one at once, where SQLite's busy handler sleeps and polls
# (1, 2, 5, 10 ... 100 ms), which left the lock idle and made p99 latency hundreds of ms.
WRITER_LOCK_SUFFIX = "-writer.lock"


# A new report's write: uuid, received, body (JSON text), relay rows, the report.
_NewReport = tuple[str, float, str, list[tuple], dict[str, Any]]


def _insert_reports(conn: sqlite3.Connection, adds: list[tuple[_Write, _NewReport]]) -> None:
    """SQLiteStore.add for a batch: the same outcome per write as one ``insert`` each.

    Inside the batch's write transaction nobody else inserts, so the uuids already stored are
    known before inserting; a uuid twice in one batch is stored by its first write. Three
    statements whatever the batch's size: one look-up, one insert per table (executemany).
    """
    uuids = list({add[0]: None for _, add in adds})
    stored: dict[str, Any] = dict(conn.execute(
        "SELECT uuid, body FROM reports WHERE uuid IN (SELECT value FROM json_each(?))",
        (json.dumps(uuids),)).fetchall())
    rows: list[tuple] = []
    relays: list[tuple] = []
    for item, (uuid, received, body, relay_rows, report) in adds:
        if uuid in stored:
            existing = stored[uuid]
            item.result = (json.loads(existing) if isinstance(existing, str) else existing, False)
            continue
        stored[uuid] = report  # a later write of the same uuid in this batch gets this one
        rows.append((uuid, received, body))
        relays.extend(relay_rows)
        item.result = (report, True)
    if rows:
        conn.executemany("INSERT INTO reports (uuid, received, body) VALUES (?, ?, ?)", rows)
    if relays:
        conn.executemany("INSERT INTO relays (uuid, destination, state, last_error, created, "
                         "next_attempt, lease_owner, lease_until) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", relays)


def _run_writes(conn: sqlite3.Connection, writes: list[_Write]) -> None:
    """Run queued writes in the caller's transaction: new reports together, the rest each."""
    adds = [(item, item.add) for item in writes if item.add is not None]
    if adds:
        _insert_reports(conn, adds)
    for item in writes:
        if item.run is not None:
            item.result = item.run(conn)


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
-- claim() walks pending relays oldest first and stops at its LIMIT (no sort of the backlog).
CREATE INDEX IF NOT EXISTS relays_oldest ON relays (destination, state, created);
-- aggregate() reads the reports of a time range (docs/aggregates.md), the retention purge
-- and export walk them by age.
CREATE INDEX IF NOT EXISTS reports_received ON reports (received);
-- Aggregates other collectors relayed here (POST /aggregates), one row per period.
CREATE TABLE IF NOT EXISTS relayed_aggregates (
    source TEXT NOT NULL,
    period TEXT NOT NULL,
    start REAL NOT NULL,
    received REAL NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (source, period, start)
);
"""


# Store.aggregate: json_extract with several paths parses each body once and returns the cell
# as a JSON array (one parse instead of nine); grouped by that text, decoded per cell.
SQLITE_AGGREGATE = """
SELECT CAST(received / ? AS INTEGER) * ?,
  json_extract(body, '$.client_cc', '$.client_asn', '$.proto', '$.endpoint_asn',
               '$.endpoint_cc', '$.failure.op', '$.failure.posix_error', '$.sampling_rate'),
  COUNT(*)
FROM reports WHERE received >= ? AND received < ? GROUP BY 1, 2
"""


def _aggregate_rows(grouped: list[tuple]) -> list[tuple]:
    """SQLITE_AGGREGATE's rows as ``AGGREGATE_COLUMNS``: a report whose failure has an op
    failed; its weight is 1/sampling_rate for a rate in (0, 1], else 1."""
    rows: dict[tuple, list[float]] = {}
    for period, cell, count in grouped:
        cc, asn, proto, easn, ecc, op, errno, rate = json.loads(cell)
        usable = isinstance(rate, int | float) and not isinstance(rate, bool) and 0 < rate <= 1
        into = rows.setdefault((period, cc, asn, proto, easn, ecc, op is not None, op, errno),
                               [0, 0.0])
        into[0] += count
        into[1] += count / rate if usable else count
    return [(*key, count, weighted) for key, (count, weighted) in rows.items()]


@dataclass
class _Write:
    """One queued write: ``run(conn)`` inside a group transaction, then its outcome.

    ``add`` is set for a new report (uuid, received, body, relay rows, report): those of one
    batch are inserted together, a few statements for the whole batch (each statement releases
    and takes back the GIL, a thread switch when other threads wait for it).
    """

    run: Callable[[sqlite3.Connection], Any] | None
    add: _NewReport | None = None
    # Looked up per write: gevent's Event in a worker it patched after this module loaded.
    done: threading.Event = field(default_factory=lambda: threading.Event())
    lead: bool = False
    result: Any = None
    error: BaseException | None = None


class _GroupCommit:
    """Leader/follower group commit for one process.

    The first writer to arrive becomes the leader and commits everything queued in one
    transaction; writers arriving meanwhile queue up, and the first of them leads the next
    transaction. The leader takes its batch only once it holds the database's write lock
    (``commit`` calls ``take``): whatever queued while it waited for another process's commit
    goes into this one. No thread of its own (nothing to restart after fork), no added delay
    when idle.
    """

    def __init__(self) -> None:
        self.lock = green.native_lock()  # ``take`` runs in the offloaded commit
        self.queue: list[_Write] = []
        self.leading = False

    def submit(self, write: _Write, commit: Callable[[Callable[[], list[_Write]]], None]) -> Any:
        with self.lock:
            self.queue.append(write)
            lead = not self.leading
            self.leading = True
        if not lead:
            write.done.wait()
            lead = write.lead
        if lead:
            taken: list[_Write] = []

            def take() -> list[_Write]:
                with self.lock:
                    batch, self.queue = self.queue, []
                taken.extend(batch)
                return batch

            try:
                commit(take)
            finally:
                if not taken:  # commit failed before taking: its writes must still be answered
                    for item in take():
                        item.error = item.error or StoreUnavailable("store_error")
                with self.lock:  # nothing here may wait: ``take`` needs it in another thread
                    nxt = self.queue[0] if self.queue else None
                    if nxt is not None:  # hand over: it commits what queued meanwhile
                        nxt.lead = True
                    else:
                        self.leading = False
                if nxt is not None:
                    nxt.done.set()
                for item in taken:
                    item.lead = False
                    item.done.set()
        if write.error is not None:
            raise write.error
        return write.result


class SQLiteStore:
    """SQLite backend; one connection per (process, thread)."""

    backend = "sqlite"

    def __init__(self, path: str, busy_timeout: float = 10.0,
                 min_free_mb: float = DEFAULT_MIN_FREE_MB) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.min_free_mb = min_free_mb
        self._local = green.native_local()
        # The group commit's connection: one per process, used by whichever thread leads, so
        # its page cache stays warm from one batch to the next (a thread's own connection
        # would re-read every page other connections changed since it last wrote).
        self._writer = types.SimpleNamespace()
        self._opened: list[tuple[int, sqlite3.Connection, int]] = []
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            conn = self._connect(create=True)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("SELECT json_patch('{}', '{}')")  # JSON functions: SQLite 3.38+
            conn.executescript(SQLITE_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            conn.close()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"database-url: cannot open {path}: {exc}") from None

    def _connect(self, create: bool = False) -> sqlite3.Connection:
        # Only start-up creates the file: a later connection to a deleted one must fail, not
        # start an empty database beside the relay queue.
        uri = f"file:{quote(os.path.abspath(self.path))}?mode={'rwc' if create else 'rw'}"
        conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        return conn

    def _handles(self, local: Any = None) -> tuple[sqlite3.Connection, int]:
        """This thread's connection and writer-lock file descriptor (opened on first use);
        ``local``: another holder of them (the group commit's)."""
        local = self._local if local is None else local
        if getattr(local, "pid", None) != os.getpid():
            local.file = _file_id(self.path)  # before connecting: a later swap is caught
            conn = self._connect()
            lock = os.open(self.path + WRITER_LOCK_SUFFIX,
                           os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            local.handles, local.pid = (conn, lock), os.getpid()
            with _FORK_LOCK:
                self._opened.append((os.getpid(), conn, lock))
        return local.handles

    @property
    def _conn(self) -> sqlite3.Connection:
        return self._handles()[0]

    def _checked_handles(self, local: Any = None) -> tuple[sqlite3.Connection, int]:
        """This thread's handles, if the file they have open is still the one at ``path``.

        An open SQLite file that is deleted or replaced keeps working through its descriptor:
        reports written there are acknowledged and then lost. Checked before every write (one
        stat); the handles are dropped so the next use opens whatever is there now.
        """
        local = self._local if local is None else local
        handles = self._handles(local)
        if _file_id(self.path) != local.file:
            conn, lock = handles
            with _FORK_LOCK:
                self._opened = [h for h in self._opened if h[1] is not conn]
            local.pid = None
            try:
                conn.close()
            except sqlite3.Error:
                pass
            os.close(lock)
            raise sqlite3.OperationalError("database file missing or replaced")
        return handles

    @property
    def _group(self) -> _GroupCommit:
        """This process's group commit (a new one after fork: locks do not survive it)."""
        group = self.__dict__.get("_group_state")
        if group is None or group[0] != os.getpid():
            with _FORK_LOCK:
                group = self.__dict__.get("_group_state")
                if group is None or group[0] != os.getpid():
                    group = (os.getpid(), _GroupCommit())
                    self.__dict__["_group_state"] = group
        return group[1]

    def _grouped(self, run: Callable[[sqlite3.Connection], Any] | None,
                 add: _NewReport | None = None) -> Any:
        """Run ``run(conn)`` in a transaction shared with concurrent writers; its result."""
        return self._group.submit(_Write(run, add), self._commit_batch)

    def _commit_batch(self, take: Callable[[], list[_Write]]) -> None:
        """Commit the writes ``take()`` hands over once the write lock is held (offloaded)."""
        _offload_logged(self._write_batch, take)

    def _write_batch(self, take: Callable[[], list[_Write]],
                     note: Callable[[str], None]) -> None:
        """``_commit_batch``'s work, in one transaction; if that fails, each write alone (one
        bad write must not fail the others). Errors go to ``note``, not to the log."""
        batch: list[_Write] | None = None
        try:
            with self._tx(self._writer, note) as conn:
                batch = take()
                _run_writes(conn, batch)
            return
        except Exception as exc:  # noqa: BLE001 - handed to the writer's own thread
            if batch is None:
                batch = take()
            if len(batch) == 1:
                batch[0].result, batch[0].error = None, exc
                return
        for item in batch:
            try:
                with self._tx(self._writer, note) as conn:
                    _run_writes(conn, [item])
            except Exception as exc:  # noqa: BLE001 - handed to the writer's own thread
                item.result, item.error = None, exc

    def _write(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """``work(conn)`` in its own write transaction (offloaded); its result."""
        return _offload_logged(self._run_tx, work)

    def _run_tx(self, work: Callable[[sqlite3.Connection], Any],
                note: Callable[[str], None]) -> Any:
        with self._tx(note=note) as conn:
            return work(conn)

    @contextmanager
    def _tx(self, local: Any = None,
            note: Callable[[str], None] | None = None) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locking) transaction; any SQLite error becomes a 503.

        ``local``: whose connection to use (default this thread's); ``note``: where error lines
        go (default the log).
        """
        note = note or _log_error
        try:
            conn, lock = self._checked_handles(local)
        except sqlite3.Error as exc:
            note(f"store error: {type(exc).__name__} {sqlite_reason(exc)}")
            raise StoreUnavailable("store_error") from None
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            note(f"store error: {type(exc).__name__} {sqlite_reason(exc)}")
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # e.g. an I/O error again: SQLite rolls back on reopen
                    note("store error: rollback failed")
            raise StoreUnavailable("store_error") from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

    def add(self, report: dict[str, Any], queue: Enqueue | None = None, *,
            body: str | None = None) -> tuple[dict[str, Any], bool]:
        """Store a report once by uuid with its relay rows (``queue``), atomically; see
        ``Reports.add``. Concurrent adds of one process share a commit."""
        now = time.time()
        uuid, body = report["uuid"], body or dumps(report)
        relays = queue.rows(uuid, now) if queue is not None else []
        return self._grouped(None, (uuid, now, body, relays, report))

    def get(self, uuid: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT body FROM reports WHERE uuid = ?", (uuid,)).fetchone()
        return json.loads(row[0]) if row else None

    def update_report(self, uuid: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Merge fields into a stored report (e.g. the OONI measurement id)."""

        def update(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute("SELECT body FROM reports WHERE uuid = ?", (uuid,)).fetchone()
            if row is None:
                return None
            body = json.loads(row[0])
            body.update(fields)
            conn.execute("UPDATE reports SET body = ? WHERE uuid = ?", (dumps(body), uuid))
            return body

        return self._write(update)

    def claim(self, destination: str, limit: int, owner: str, lease_seconds: float,
              now: float | None = None, due_only: bool = True) -> list[Claim]:
        """Lease up to ``limit`` pending relays for ``destination``, oldest first."""
        now = time.time() if now is None else now
        due = now if due_only else float("inf")

        def lease(conn: sqlite3.Connection) -> list[tuple]:
            rows = conn.execute(
                "SELECT r.uuid, p.body, r.attempts, r.created, r.result FROM relays r "
                "JOIN reports p ON p.uuid = r.uuid "
                # "+" keeps the planner on relays_oldest: with relays_due it sorted the whole
                # backlog per claim (100 ms at 100,000 pending, 0.02 ms this way).
                "WHERE r.destination = ? AND r.state = 'pending' AND +r.next_attempt <= ? "
                "AND (r.lease_until IS NULL OR r.lease_until < ?) "
                "ORDER BY r.created LIMIT ?",
                (destination, due, now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE relays SET lease_owner = ?, lease_until = ? "
                "WHERE uuid = ? AND destination = ?",
                [(owner, now + lease_seconds, row[0], destination) for row in rows],
            )
            return rows

        rows = self._write(lease)
        return [Claim(row[0], json.loads(row[1]), row[2], row[3],
                      json.loads(row[4]) if row[4] else None) for row in rows]

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
        result_text = dumps(result) if result is not None else None

        def update(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE relays SET state = ?, attempts = attempts + 1, last_error = ?, "
                "result = COALESCE(?, result), next_attempt = COALESCE(?, next_attempt), "
                "lease_owner = NULL, lease_until = NULL "
                "WHERE uuid = ? AND destination = ? AND lease_owner = ? AND state = 'pending'",
                (state, error, result_text, next_attempt, uuid, destination, owner),
            )
            if cur.rowcount != 1:
                return False
            if report_fields:  # merged by SQLite: no decoding and re-encoding of the body
                conn.execute("UPDATE reports SET body = json_patch(body, ?) WHERE uuid = ?",
                             (dumps(report_fields), uuid))
            return True

        return self._grouped(update)  # relay outcomes share commits with reports

    def release(self, uuids: list[str], destination: str, owner: str,
                next_attempt: float | None = None) -> int:
        """Give leased relays back unattempted (attempts unchanged); returns how many."""
        if not uuids:
            return 0
        rows = [(next_attempt, uuid, destination, owner) for uuid in uuids]

        def update(conn: sqlite3.Connection) -> int:
            return conn.executemany(
                "UPDATE relays SET lease_owner = NULL, lease_until = NULL, "
                "next_attempt = COALESCE(?, next_attempt) "
                "WHERE uuid = ? AND destination = ? AND lease_owner = ? AND state = 'pending'",
                rows,
            ).rowcount

        return self._grouped(update)

    def make_due(self, destination: str, now: float | None = None, *,
                 unconfirmed: bool = False) -> int:
        """Make the pending relays to ``destination`` due now, whatever their backoff; those
        that may have arrived (``maybe`` in their result) only with ``unconfirmed``."""
        now = time.time() if now is None else now
        return self._write(lambda conn: conn.execute(
            "UPDATE relays SET next_attempt = ? "
            "WHERE destination = ? AND state = 'pending' AND next_attempt > ? "
            "AND (? OR result IS NULL OR json_extract(result, '$.maybe') IS NULL)",
            (now, destination, now, unconfirmed),
        ).rowcount)

    def requeue(self, destination: str, states: tuple[str, ...] = ("failed",),
                now: float | None = None) -> int:
        """Put finished relays (by default the permanently failed ones) back in the queue."""
        bad = [s for s in states if s not in STATES or s == "pending"]
        if bad:
            raise ValueError(f"cannot requeue relay states {bad}")
        now = time.time() if now is None else now
        return self._write(lambda conn: conn.executemany(
            "UPDATE relays SET state = 'pending', next_attempt = ?, lease_owner = NULL, "
            "lease_until = NULL WHERE destination = ? AND state = ?",
            [(now, destination, state) for state in states],
        ).rowcount)

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

    def aggregate(self, start: float, end: float, width: int) -> list[tuple]:
        """Reports received in [start, end) counted per cell (``AGGREGATE_COLUMNS``): periods
        of ``width`` seconds from the epoch (UTC hours, days), grouped by SQLite. Offloaded:
        a month of a busy collector takes seconds, which the worker's requests must not wait."""

        def read() -> list[tuple]:
            return self._conn.execute(SQLITE_AGGREGATE, (width, width, start, end)).fetchall()

        try:
            return _aggregate_rows(green.offload(read))
        except sqlite3.Error as exc:
            _log_error(f"store error: {type(exc).__name__} {sqlite_reason(exc)}")
            raise StoreUnavailable("store_error") from None

    def export(self, filters: ExportFilter) -> Iterator[dict[str, Any]]:
        """The stored reports matching ``filters``, oldest first, read row by row (its own
        connection: constant memory, whatever the table's size)."""
        where: list[str] = ["1"]
        params: list[float | str] = []
        if filters.since is not None:
            where.append("received >= ?")
            params.append(filters.since)
        if filters.until is not None:
            where.append("received < ?")
            params.append(filters.until)
        for key, value in filters.fields():
            where.append(f"json_extract(body, '$.{key}') = ?")
            params.append(value)
        if filters.failed is not None:
            where.append("json_type(body, '$.failure') " +
                         ("= 'object'" if filters.failed else "IS NOT 'object'"))
        conn = self._connect()
        try:
            cursor = conn.execute("SELECT body FROM reports WHERE "  # noqa: S608 - fixed parts
                                  + " AND ".join(where) + " ORDER BY received, uuid", params)
            for (body,) in cursor:
                yield json.loads(body)
        finally:
            conn.close()

    def purge(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` reports received before ``before`` with no relay pending
        (oldest first), with their relay rows, in one transaction; how many."""

        def delete(conn: sqlite3.Connection) -> int:
            uuids = json.dumps([row[0] for row in conn.execute(
                "SELECT uuid FROM reports p WHERE received < ? AND NOT EXISTS (SELECT 1 FROM "
                "relays r WHERE r.uuid = p.uuid AND r.state = 'pending') "
                "ORDER BY received LIMIT ?", (before, limit))])
            conn.execute("DELETE FROM relays WHERE uuid IN (SELECT value FROM json_each(?))",
                         (uuids,))
            return conn.execute("DELETE FROM reports WHERE uuid IN "
                                "(SELECT value FROM json_each(?))", (uuids,)).rowcount

        return self._write(delete)

    def purgeable(self, before: float) -> int:
        """How many reports ``purge`` would delete (all batches)."""
        return self._conn.execute(
            "SELECT COUNT(*) FROM reports p WHERE received < ? AND NOT EXISTS (SELECT 1 FROM "
            "relays r WHERE r.uuid = p.uuid AND r.state = 'pending')", (before,)).fetchone()[0]

    def add_relayed_aggregates(self, source: str, period: str,
                               periods: list[tuple[int, dict[str, Any]]]) -> int:
        """Keep the periods another collector relayed (a period sent again replaces it)."""
        now = time.time()
        rows = [(source, period, start, now, dumps(body)) for start, body in periods]
        self._write(lambda conn: conn.executemany(
            "INSERT INTO relayed_aggregates (source, period, start, received, body) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (source, period, start) DO UPDATE SET "
            "received = excluded.received, body = excluded.body", rows))
        return len(rows)

    def relayed_aggregates(self, source: str, period: str, start: float,
                           end: float) -> list[dict[str, Any]]:
        """The periods ``source`` relayed that start in [start, end), in order."""
        rows = self._conn.execute(
            "SELECT body FROM relayed_aggregates WHERE source = ? AND period = ? "
            "AND start >= ? AND start < ? ORDER BY start", (source, period, start, end))
        return [json.loads(row[0]) for row in rows.fetchall()]

    def ping(self) -> bool:
        """Whether the database at ``path`` answers and its disk has ``min_free_mb`` left; a
        connection to a file that has been replaced since is dropped and the one there now is
        tried."""
        for _ in range(2):
            try:
                self._checked_handles()[0].execute("SELECT 1 FROM reports LIMIT 1").fetchall()
            except sqlite3.Error:
                continue
            return self.disk() != "low"
        return False

    def free_mb(self) -> float | None:
        """Megabytes left for the database on its file system (None when unknown).

        A full disk fails every commit (reports get 503) while reads still work: /healthz
        says so before that happens, so a load balancer or an alert can act."""
        try:
            stat = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize / 2**20

    def disk(self) -> str | None:
        """"ok", or "low" under ``min_free_mb`` (/healthz shows no figures: a public page);
        None when unknown."""
        free = self.free_mb()
        return None if free is None else "ok" if free >= self.min_free_mb else "low"

    def close(self) -> None:
        """Close every connection this process opened (any thread's); a parent's, inherited
        through fork, are left alone."""
        pid = os.getpid()
        with _FORK_LOCK:
            mine = [h for h in self._opened if h[0] == pid]
            self._opened = [h for h in self._opened if h[0] != pid]
            self._local = green.native_local()
            self._writer = types.SimpleNamespace()
        for _, conn, lock in mine:
            conn.close()
            os.close(lock)


def _log_error(line: str) -> None:
    log.error("%s", line)


def _offload_logged(work: Callable[..., Any], *args: Any) -> Any:
    """``work(*args, note)`` offloaded (green.offload); the error lines it noted are logged
    here, in the caller's greenlet: log handlers must not be used from the offload thread."""
    notes: list[str] = []
    try:
        return green.offload(work, *args, notes.append)
    finally:
        for line in notes:
            _log_error(line)


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


_SQLITE_REASONS = (
    ("missing or replaced", "gone"), ("full", "disk_full"), ("locked", "locked"),
    ("busy", "locked"), ("readonly", "read_only"),
    ("read-only", "read_only"), ("i/o", "io_error"), ("malformed", "corrupt"),
    ("not a database", "corrupt"), ("unable to open", "cannot_open"),
)


def sqlite_reason(exc: sqlite3.Error) -> str:
    """A short code for an SQLite error, for logs (SQLite's own texts name no data)."""
    text = str(exc).lower()
    for fragment, reason in _SQLITE_REASONS:
        if fragment in text:
            return reason
    return "other"


def sqlite_path(url: str) -> str:
    """sqlite:///relative/path -> relative/path; sqlite:////abs/path -> /abs/path."""
    rest = url[len("sqlite://"):].partition("?")[0]
    if not rest.startswith("/") or rest == "/":
        raise StoreError("database-url: expected sqlite:///relative/path or sqlite:////abs/path")
    return unquote(rest[1:])


def sqlite_options(url: str) -> dict[str, float]:
    """Options in the URL's query: ?timeout=SECONDS, how long a write waits for a lock;
    ?min_free_mb=MB, the free disk space below which /healthz reports the store not ok."""
    options: dict[str, float] = {}
    for name, values in parse_qs(urlsplit(url).query, keep_blank_values=True).items():
        if name not in ("timeout", "min_free_mb"):
            raise StoreError(f"database-url: unknown SQLite option {name!r} "
                             "(known: timeout, min_free_mb)")
        try:
            value = float(values[-1])
        except ValueError:
            value = math.nan
        if name == "timeout":
            if not 0 < value <= 600:
                raise StoreError("database-url: timeout must be seconds between 0 and 600")
            options["busy_timeout"] = value
        else:
            if not 0 <= value < math.inf:
                raise StoreError("database-url: min_free_mb must be megabytes, 0 or more")
            options["min_free_mb"] = value
    return options
