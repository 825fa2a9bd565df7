"""Fill a SQLite store with many reports in bulk, directly (not over HTTP), for benchmarks.

The schema comes from the store itself (``open_store`` creates it) and the report bodies from
the collector's own pipeline (validate -> enrich -> scrub) run on a set of templates, so the
rows look like what tt-server writes; only uuid, time and t_received vary per row.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
import uuid as uuidlib
from datetime import UTC, datetime, timedelta
from typing import Any

from tunnel_telemetry.pipeline.enrich import enrich
from tunnel_telemetry.pipeline.geo import open_geo
from tunnel_telemetry.pipeline.scrub import scrub
from tunnel_telemetry.pipeline.validate import format_time, validate
from tunnel_telemetry.store import open_store, sqlite_path
from tunnel_telemetry.testing.reports import make_report

PROTOS = ("ss", "vless", "vmess", "trojan", "wireguard", "hysteria2", "obfs4", "https")
FAILURES = (
    None,
    None,
    {"op": "connect", "msg": "connection reset by peer", "posix_error": "ECONNRESET"},
    {"op": "tls-handshake", "msg": "remote error: tls: handshake failure"},
)


def templates(addresses: list[str], geo_dbs: tuple[str | None, str | None],
              n: int = 500, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` stored-report bodies made by the real pipeline from varied client reports."""
    rng = random.Random(seed)
    geo = open_geo(*geo_dbs)
    now = datetime.now(UTC)
    out = []
    try:
        for _ in range(n):
            addr = rng.choice(addresses)
            host = f"[{addr}]" if ":" in addr else addr
            payload = make_report(
                endpoint=f"{rng.choice(PROTOS)}://{host}:{rng.randint(1, 65535)}",
                config={"prefix": f"p{rng.randint(0, 99)}", "transport": "tcp"},
                duration_ms=rng.randint(0, 30000),
                failure=rng.choice(FAILURES),
            )
            report, endpoint = validate(payload, now, 7 * 86400, 300)
            enriched = enrich(report, endpoint, rng.choice(addresses), geo, now, None)
            out.append(scrub(enriched, False))
    finally:
        geo.close()
    return out


def prefill(database_url: str, n: int, addresses: list[str],
            geo_dbs: tuple[str | None, str | None] = (None, None),
            destinations: tuple[str, ...] = (), seed: int = 0, max_age: float = 6 * 86400,
            batch: int = 50_000) -> float:
    """Insert ``n`` reports (and one pending relay per destination each); returns seconds.

    Times are spread over the last ``max_age`` seconds. Pending relays are due now, oldest
    first, as a backlog left by an outage of the secondary collector would be.
    """
    started = time.monotonic()
    open_store(database_url).close()  # the store's own schema
    rng = random.Random(seed)
    bodies = templates(addresses, geo_dbs, seed=seed)
    now = time.time()
    conn = sqlite3.connect(sqlite_path(database_url), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        done = 0
        while done < n:
            reports, relays = [], []
            for i in range(done, min(n, done + batch)):
                age = max_age * (n - i) / n
                received = now - age
                body = dict(bodies[i % len(bodies)])
                body["uuid"] = str(uuidlib.UUID(int=rng.getrandbits(128), version=4))
                moment = datetime.fromtimestamp(received, UTC)
                body["time"] = format_time(moment - timedelta(seconds=rng.randint(0, 600)))
                body["t_received"] = format_time(moment)
                reports.append((body["uuid"], received,
                                json.dumps(body, separators=(",", ":"), ensure_ascii=False)))
                relays.extend((body["uuid"], dest, received, now) for dest in destinations)
            conn.executemany("INSERT INTO reports (uuid, received, body) VALUES (?, ?, ?)",
                             reports)
            if relays:
                conn.executemany("INSERT INTO relays (uuid, destination, created, next_attempt)"
                                 " VALUES (?, ?, ?, ?)", relays)
            done += len(reports)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.monotonic() - started
