"""PostgreSQL store: several collector instances (and Heroku-style dynos) on one database.

Same behaviour as ``SQLiteStore``; what differs is how it gets there:

- one ``psycopg_pool.ConnectionPool`` per process, opened on first use, so a pool created before
  gunicorn's fork is never used by a worker (a forked child opens its own);
- the schema is created and migrated forward at start-up under a transaction-level advisory
  lock, so several instances starting at once migrate once and the others wait;
- relays are claimed with ``FOR UPDATE SKIP LOCKED`` and a lease (``lease_until``): concurrent
  claimers never get the same row, and a killed instance's claims are taken over once the
  lease has expired.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import ReportError, StoreUnavailable
from . import green
from .base import STATES, Claim, Enqueue, ExportFilter, StoreError, dumps

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key for schema migrations: an arbitrary constant ("tt-schema").
MIGRATION_LOCK = 0x74742D736368656D


@dataclass(frozen=True)
class Migration:
    """One forward step of the schema; ``version`` numbers are 1, 2, 3, ... in order."""

    version: int
    description: str
    sql: str


# Append new steps at the end; never edit a step that has been released. Each step runs inside
# the migration transaction, so it cannot use statements such as CREATE INDEX CONCURRENTLY.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "reports and relay queue", """
CREATE TABLE reports (
    uuid text PRIMARY KEY,
    received double precision NOT NULL,
    body jsonb NOT NULL
);
CREATE TABLE relays (
    uuid text NOT NULL REFERENCES reports (uuid) ON DELETE CASCADE,
    destination text NOT NULL,
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'delivered', 'failed', 'expired', 'skipped')),
    attempts integer NOT NULL DEFAULT 0,
    created double precision NOT NULL,
    next_attempt double precision NOT NULL,
    lease_owner text,
    lease_until double precision,
    last_error text,
    result jsonb,
    PRIMARY KEY (uuid, destination)
);
CREATE INDEX relays_pending ON relays (destination, created) WHERE state = 'pending';
"""),
    Migration(2, "reports by time received (aggregates)", """
CREATE INDEX reports_received ON reports (received);
"""),
    Migration(3, "aggregates relayed by other collectors", """
CREATE TABLE relayed_aggregates (
    source text NOT NULL,
    period text NOT NULL,
    start double precision NOT NULL,
    received double precision NOT NULL,
    body jsonb NOT NULL,
    PRIMARY KEY (source, period, start)
);
"""),
)

# AGGREGATE_COLUMNS (store/base.py): a report whose failure has an op failed; its weight is
# 1/sampling_rate for a rate in (0, 1], else 1.
POSTGRES_AGGREGATE = """
SELECT (floor(received / %(width)s) * %(width)s)::bigint AS period,
  body->>'client_cc', body->>'client_asn', body->>'proto', body->>'endpoint_asn',
  body->>'endpoint_cc', body->'failure'->>'op' IS NOT NULL,
  body->'failure'->>'op', body->'failure'->>'posix_error',
  COUNT(*),
  SUM(CASE WHEN jsonb_typeof(body->'sampling_rate') = 'number' THEN  -- CASE: cast after the test
      CASE WHEN (body->>'sampling_rate')::float8 > 0 AND (body->>'sampling_rate')::float8 <= 1
      THEN 1.0 / (body->>'sampling_rate')::float8 ELSE 1.0 END ELSE 1.0 END)::float8
FROM reports WHERE received >= %(start)s AND received < %(end)s
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
"""


def check_migrations(migrations: tuple[Migration, ...]) -> None:
    """Versions must be 1..n in order: a gap or a duplicate is a programming error."""
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1..n in order, got {versions}")


def migrate(conn: psycopg.Connection, migrations: tuple[Migration, ...] = MIGRATIONS,
            lock_timeout: float = 60.0) -> tuple[int, int]:
    """Bring the schema to the last version; returns (version before, version after).

    Everything runs in one transaction holding ``pg_advisory_xact_lock``: DDL is transactional
    in PostgreSQL, so a step either applies whole with its ``schema_version`` row or not at all,
    and an instance starting concurrently waits for the lock, then finds nothing left to do.
    """
    check_migrations(migrations)
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
            sql.Literal(f"{int(lock_timeout * 1000)}ms")))
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY,"
            " description text NOT NULL,"
            " applied timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
        before = row[0] if row else 0
        latest = len(migrations)
        if before > latest:
            raise StoreError(f"database-url: the schema is at version {before}, newer than this "
                             f"tt-server knows ({latest}): upgrade tt-server")
        for step in migrations[before:]:
            log.info("schema migration %d: %s", step.version, step.description)
            conn.execute(step.sql)
            conn.execute("INSERT INTO schema_version (version, description) VALUES (%s, %s)",
                         (step.version, step.description))
    return before, latest


def _secrets(url: str) -> list[str]:
    """The password(s) in a URL, raw and percent-decoded: in the netloc or as ?password=."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
        found += [value for key, value in parse_qsl(parts.query) if key == "password"]
    except ValueError:
        return []
    return [s for secret in found if secret for s in {secret, unquote(secret)}]


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages)."""
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            user, host = parts.netloc.rsplit("@", 1)
            parts = parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}")
        query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
        return urlunsplit(parts._replace(query=query))
    except ValueError:
        return "(unparsable URL)"


def _one_line(exc: BaseException, secrets: list[str]) -> str:
    """The first non-empty line of an error, with any password removed."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _jsonb(value: Any) -> Jsonb:
    return Jsonb(value, dumps=dumps)


def cooperative_waits() -> bool:
    """In a gevent worker, make psycopg wait for the server through gevent; True if changed.

    psycopg picks its wait function when it is imported: poll() in C unless gevent had patched
    ``select`` by then. tt-server imports it in the master, before a worker patches, and the C
    wait blocks the worker's whole event loop for every round trip to the server: its other
    requests stall meanwhile. ``wait_poll`` calls ``select.poll``, which gevent patched; new
    connections wait through the selector class it bound at import, replaced by gevent's.
    """
    import selectors  # noqa: PLC0415

    from psycopg import waiting  # noqa: PLC0415 - psycopg's own module, imported already

    if not green.active() or waiting.wait is not getattr(waiting, "wait_c", None):
        return False
    waiting.wait = waiting.wait_poll
    if hasattr(waiting, "DefaultSelector"):
        waiting.DefaultSelector = selectors.DefaultSelector  # type: ignore[misc]  # a patch
    return True


# Pools inherited across a fork: kept referenced so that the child never finalises (and so
# never closes) connections that belong to the parent.
_ABANDONED: list[ConnectionPool] = []


class PostgresStore:
    """PostgreSQL backend; one connection pool per process, opened lazily."""

    backend = "postgresql"

    def __init__(self, url: str, *, pool_min: int = 1, pool_max: int = 5,
                 pool_timeout: float = 5.0, reconnect_timeout: float = 10.0,
                 connect_timeout: int = 5,
                 busy_timeout: float = 10.0, statement_timeout: float = 20.0,
                 migrations: tuple[Migration, ...] = MIGRATIONS) -> None:
        self.url = url
        self._secrets = _secrets(url)
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.pool_timeout = pool_timeout
        self.reconnect_timeout = reconnect_timeout
        self.busy_timeout = busy_timeout
        self.statement_timeout = statement_timeout
        self._lock = green.ProcessLock()  # held while the pool starts its threads
        self._pool: ConnectionPool | None = None
        self._pid: int | None = None
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StoreError(f"database-url: invalid PostgreSQL URL {redact_url(url)}: "
                             f"{_one_line(exc, self._secrets)}") from None
        self._kwargs: dict[str, Any] = {"application_name": "tt-server"}
        if "connect_timeout" not in params:
            self._kwargs["connect_timeout"] = connect_timeout
        try:
            with psycopg.connect(url, **self._kwargs) as conn:
                self.schema_version = migrate(conn, migrations)[1]
        except psycopg.Error as exc:
            raise StoreError(f"database-url: cannot open {redact_url(url)}: "
                             f"{_one_line(exc, self._secrets)}") from None

    # -- connections ---------------------------------------------------------------------

    def _configure(self, conn: psycopg.Connection) -> None:
        """Per-connection settings: a write waiting on a lock gives up (like busy_timeout)."""
        conn.execute(sql.SQL("SET lock_timeout = {}; SET statement_timeout = {}").format(
            sql.Literal(f"{int(self.busy_timeout * 1000)}ms"),
            sql.Literal(f"{int(self.statement_timeout * 1000)}ms")))
        conn.commit()

    def _get_pool(self) -> ConnectionPool:
        pid = os.getpid()
        if self._pid == pid and self._pool is not None:
            return self._pool
        with self._lock:
            if self._pid != pid or self._pool is None:
                cooperative_waits()
                if self._pool is not None:
                    _ABANDONED.append(self._pool)  # the parent's, after a fork
                self._pool = ConnectionPool(
                    self.url, kwargs=self._kwargs, min_size=self.pool_min,
                    max_size=self.pool_max, timeout=self.pool_timeout, open=False,
                    configure=self._configure, check=ConnectionPool.check_connection,
                    reconnect_timeout=self.reconnect_timeout, name=f"tt-store-{pid}",
                    num_workers=2,
                )
                self._pool.open(wait=False)
                self._pid = pid
        return self._pool

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection]:
        """A connection in a transaction (committed at the end); DB errors become a 503."""
        try:
            with self._get_pool().connection() as conn:
                yield conn
        except psycopg.errors.UntranslatableCharacter:
            # jsonb cannot hold \u0000; retrying would never help, so this is the client's.
            log.info("store rejected a report: nul_character")
            raise ReportError("nul_character",
                              "the report contains a NUL character (\\u0000)") from None
        except (psycopg.Error, PoolTimeout) as exc:
            code = getattr(exc, "sqlstate", None) or "-"
            log.error("store error: %s (%s)", type(exc).__name__, code)
            raise StoreUnavailable("store_error") from None

    def _read(self, query: str, params: tuple | dict = ()) -> list[tuple]:
        with self._tx() as conn:
            return conn.execute(query, params).fetchall()

    # -- Reports and RelayQueue -------------------------------------------------------------------

    def add(self, report: dict[str, Any], queue: Enqueue | None = None, *,
            body: str | None = None) -> tuple[dict[str, Any], bool]:
        """Store a report once by uuid with its relay rows (``queue``), atomically; see
        ``Reports.add``. ``body`` is not needed: psycopg encodes the jsonb itself."""
        now = time.time()
        with self._tx() as conn:
            row = conn.execute(
                "INSERT INTO reports (uuid, received, body) VALUES (%s, %s, %s) "
                "ON CONFLICT (uuid) DO NOTHING RETURNING uuid",
                (report["uuid"], now, _jsonb(report)),
            ).fetchone()
            if row is None:
                stored = conn.execute("SELECT body FROM reports WHERE uuid = %s",
                                      (report["uuid"],)).fetchone()
                if stored is None:  # purged since the conflict: the client retries, stored anew
                    raise StoreUnavailable("store_error")
                return stored[0], False
            rows = queue.rows(report["uuid"], now) if queue is not None else []
            if rows:
                conn.execute(  # one statement for every destination: the columns as arrays
                    "INSERT INTO relays (uuid, destination, state, last_error, created, "
                    "next_attempt, lease_owner, lease_until) SELECT * FROM unnest("
                    "%s::text[], %s::text[], %s::text[], %s::text[], %s::float8[], "
                    "%s::float8[], %s::text[], %s::float8[])",
                    [list(column) for column in zip(*rows, strict=True)],
                )
        return report, True

    def get(self, uuid: str) -> dict[str, Any] | None:
        rows = self._read("SELECT body FROM reports WHERE uuid = %s", (uuid,))
        return rows[0][0] if rows else None

    def update_report(self, uuid: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Merge fields into a stored report (e.g. the OONI measurement id), atomically."""
        with self._tx() as conn:
            row = conn.execute("UPDATE reports SET body = body || %s WHERE uuid = %s "
                               "RETURNING body", (_jsonb(fields), uuid)).fetchone()
        return row[0] if row else None

    def claim(self, destination: str, limit: int, owner: str, lease_seconds: float,
              now: float | None = None, due_only: bool = True) -> list[Claim]:
        """Lease up to ``limit`` pending relays for ``destination``, oldest first.

        ``SKIP LOCKED`` lets concurrent claimers (threads, workers, instances) pass over rows
        another transaction is leasing instead of waiting for it or leasing them twice.
        """
        now = time.time() if now is None else now
        due = now if due_only else float("inf")
        with self._tx() as conn:
            rows = conn.execute(
                "WITH picked AS ("
                " SELECT uuid FROM relays"
                " WHERE destination = %(dest)s AND state = 'pending'"
                " AND next_attempt <= %(due)s"
                " AND (lease_until IS NULL OR lease_until < %(now)s)"
                " ORDER BY created LIMIT %(limit)s"
                " FOR UPDATE SKIP LOCKED) "
                "UPDATE relays r SET lease_owner = %(owner)s, lease_until = %(until)s "
                "FROM picked, reports p "
                "WHERE r.destination = %(dest)s AND r.uuid = picked.uuid AND p.uuid = r.uuid "
                "RETURNING r.uuid, p.body, r.attempts, r.created, r.result",
                {"dest": destination, "due": due, "now": now, "limit": limit, "owner": owner,
                 "until": now + lease_seconds},
            ).fetchall()
        rows.sort(key=lambda row: row[3])
        return [Claim(row[0], row[1], row[2], row[3], row[4]) for row in rows]

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
                "UPDATE relays SET state = %s, attempts = attempts + 1, last_error = %s, "
                "result = COALESCE(%s, result), next_attempt = COALESCE(%s, next_attempt), "
                "lease_owner = NULL, lease_until = NULL "
                "WHERE uuid = %s AND destination = %s AND lease_owner = %s AND state = 'pending'",
                (state, error, _jsonb(result) if result is not None else None, next_attempt,
                 uuid, destination, owner),
            )
            if cur.rowcount != 1:
                return False
            if report_fields:
                conn.execute("UPDATE reports SET body = body || %s WHERE uuid = %s",
                             (_jsonb(report_fields), uuid))
            return True

    def release(self, uuids: list[str], destination: str, owner: str,
                next_attempt: float | None = None) -> int:
        """Give leased relays back unattempted (attempts unchanged); returns how many."""
        if not uuids:
            return 0
        with self._tx() as conn:
            return conn.execute(
                "UPDATE relays SET lease_owner = NULL, lease_until = NULL, "
                "next_attempt = COALESCE(%s, next_attempt) "
                "WHERE uuid = ANY(%s) AND destination = %s AND lease_owner = %s "
                "AND state = 'pending'",
                (next_attempt, list(uuids), destination, owner),
            ).rowcount

    def make_due(self, destination: str, now: float | None = None, *,
                 unconfirmed: bool = False) -> int:
        """Make the pending relays to ``destination`` due now, whatever their backoff; those
        that may have arrived (``maybe`` in their result) only with ``unconfirmed``."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            return conn.execute(
                "UPDATE relays SET next_attempt = %s "
                "WHERE destination = %s AND state = 'pending' AND next_attempt > %s "
                "AND (%s OR result IS NULL OR NOT result ? 'maybe')",
                (now, destination, now, unconfirmed),
            ).rowcount

    def requeue(self, destination: str, states: tuple[str, ...] = ("failed",),
                now: float | None = None) -> int:
        """Put finished relays (by default the permanently failed ones) back in the queue."""
        bad = [s for s in states if s not in STATES or s == "pending"]
        if bad:
            raise ValueError(f"cannot requeue relay states {bad}")
        now = time.time() if now is None else now
        with self._tx() as conn:
            return conn.execute(
                "UPDATE relays SET state = 'pending', next_attempt = %s, lease_owner = NULL, "
                "lease_until = NULL WHERE destination = %s AND state = ANY(%s)",
                (now, destination, list(states)),
            ).rowcount

    def relay_state(self, uuid: str) -> dict[str, dict[str, Any]]:
        rows = self._read(
            "SELECT destination, state, attempts, last_error, result, next_attempt "
            "FROM relays WHERE uuid = %s", (uuid,))
        return {
            row[0]: {"state": row[1], "attempts": row[2], "error": row[3], "result": row[4],
                     "next_attempt": row[5]}
            for row in rows
        }

    def backlog(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Pending relays per destination and the age of the oldest one, in seconds."""
        now = time.time() if now is None else now
        rows = self._read("SELECT destination, COUNT(*), MIN(created) FROM relays "
                          "WHERE state = 'pending' GROUP BY destination")
        return {row[0]: {"pending": row[1], "oldest_age_s": round(now - row[2], 3)}
                for row in rows}

    def count(self) -> int:
        return self._read("SELECT COUNT(*) FROM reports")[0][0]

    def aggregate(self, start: float, end: float, width: int) -> list[tuple]:
        """Reports received in [start, end) counted per cell (``AGGREGATE_COLUMNS``): periods
        of ``width`` seconds from the epoch (UTC hours, days), grouped by PostgreSQL."""
        return self._read(POSTGRES_AGGREGATE, {"width": width, "start": start, "end": end})

    def export(self, filters: ExportFilter) -> Iterator[dict[str, Any]]:
        """The stored reports matching ``filters``, oldest first, through a server-side
        cursor (constant memory, whatever the table's size)."""
        where: list[sql.Composable] = [sql.SQL("TRUE")]
        params: list[float | str] = []
        if filters.since is not None:
            where.append(sql.SQL("received >= %s"))
            params.append(filters.since)
        if filters.until is not None:
            where.append(sql.SQL("received < %s"))
            params.append(filters.until)
        for key, value in filters.fields():
            where.append(sql.SQL("body ->> {} = %s").format(sql.Literal(key)))
            params.append(value)
        if filters.failed is not None:
            where.append(sql.SQL("jsonb_typeof(body -> 'failure') IS {} DISTINCT FROM 'object'")
                         .format(sql.SQL("NOT" if filters.failed else "")))
        query = sql.SQL("SELECT body FROM reports WHERE {} ORDER BY received, uuid").format(
            sql.SQL(" AND ").join(where))
        with self._tx() as conn, conn.cursor(name="tt_export") as cursor:
            cursor.itersize = 500
            cursor.execute(query, params)
            yield from (row[0] for row in cursor)

    def purge(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` reports received before ``before`` with no relay pending
        (oldest first), with their relay rows, in one transaction; how many.

        The candidates' relay rows are locked before the delete re-checks them: a relay put
        back in the queue meanwhile (``requeue``) keeps its report."""
        with self._tx() as conn:
            uuids = [row[0] for row in conn.execute(
                "SELECT uuid FROM reports p WHERE received < %s AND NOT EXISTS (SELECT 1 FROM "
                "relays r WHERE r.uuid = p.uuid AND r.state = 'pending') "
                "ORDER BY received LIMIT %s FOR UPDATE SKIP LOCKED", (before, limit))]
            if not uuids:
                return 0
            conn.execute("SELECT 1 FROM relays WHERE uuid = ANY(%s) FOR UPDATE", (uuids,))
            return conn.execute(
                "DELETE FROM reports p WHERE uuid = ANY(%s) AND NOT EXISTS (SELECT 1 FROM "
                "relays r WHERE r.uuid = p.uuid AND r.state = 'pending')", (uuids,)).rowcount

    def purgeable(self, before: float) -> int:
        """How many reports ``purge`` would delete (all batches)."""
        return self._read(
            "SELECT COUNT(*) FROM reports p WHERE received < %s AND NOT EXISTS (SELECT 1 FROM "
            "relays r WHERE r.uuid = p.uuid AND r.state = 'pending')", (before,))[0][0]

    def add_relayed_aggregates(self, source: str, period: str,
                               periods: list[tuple[int, dict[str, Any]]]) -> int:
        """Keep the periods another collector relayed (a period sent again replaces it)."""
        now = time.time()
        with self._tx() as conn:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO relayed_aggregates (source, period, start, received, body) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (source, period, start) DO UPDATE "
                    "SET received = excluded.received, body = excluded.body",
                    [(source, period, start, now, _jsonb(body)) for start, body in periods])
        return len(periods)

    def relayed_aggregates(self, source: str, period: str, start: float,
                           end: float) -> list[dict[str, Any]]:
        """The periods ``source`` relayed that start in [start, end), in order."""
        return [row[0] for row in self._read(
            "SELECT body FROM relayed_aggregates WHERE source = %s AND period = %s "
            "AND start >= %s AND start < %s ORDER BY start", (source, period, start, end))]

    def ping(self) -> bool:
        try:
            self._read("SELECT 1 FROM reports LIMIT 1")
        except StoreUnavailable:
            return False
        return True

    def disk(self) -> str | None:
        """None: the database server's disk is not this process's to see."""
        return None

    def close(self) -> None:
        """Close this process's pool (a pool inherited across a fork is left alone)."""
        with self._lock:
            pool, pid = self._pool, self._pid
            self._pool = self._pid = None
        if pool is not None:
            if pid == os.getpid():
                pool.close()
            else:
                _ABANDONED.append(pool)

