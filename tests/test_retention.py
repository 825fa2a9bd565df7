"""Retention: old reports are deleted, never one still waiting to be relayed."""

import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tunnel_telemetry import housekeeping
from tunnel_telemetry.cli import main
from tunnel_telemetry.store import Enqueue, open_store
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import free_port, wait_until

DESTS = ["ooni", "collector:https://b.example"]


@pytest.fixture
def db_url(each_backend_url):
    """Every test here runs on SQLite and on PostgreSQL."""
    return each_backend_url


def age(db_url, uuids, seconds):
    """Make reports look received ``seconds`` earlier."""
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url[len("sqlite:///"):]) as conn:
            conn.executemany("UPDATE reports SET received = received - ? WHERE uuid = ?",
                             [(seconds, u) for u in uuids])
    else:
        with psycopg.connect(db_url) as conn:
            conn.execute("UPDATE reports SET received = received - %s WHERE uuid = ANY(%s)",
                         (seconds, list(uuids)))


def add(store, *, finish=None, skipped=None, dests=DESTS):
    """A stored report; ``finish``: {destination: final state} recorded after a claim."""
    uid = str(uuid.uuid4())
    store.add({"uuid": uid, "report-type": "tunnel-telemetry"},
              Enqueue(dests, owner="me", lease_seconds=60, skipped=skipped or {}))
    for dest, state in (finish or {}).items():
        assert store.finish(uid, dest, "me", state)
    return uid


def scenario(store, db_url):
    """Old reports in every relay state, and new ones; (purgeable, kept)."""
    done = {"ooni": "delivered", DESTS[1]: "failed"}
    purgeable = [add(store, finish=done), add(store, dests=[]),
                 add(store, skipped={"ooni": "skip", DESTS[1]: "skip"}),
                 add(store, finish={"ooni": "expired", DESTS[1]: "delivered"})]
    kept_pending = [add(store, finish={"ooni": "delivered"}),  # the secondary still pending
                    add(store),
                    add(store, finish={"ooni": "pending"})]  # a retry scheduled
    age(db_url, purgeable + kept_pending, 1000)
    recent = [add(store, finish=done), add(store, dests=[])]
    return purgeable, kept_pending + recent


def test_purge_deletes_only_old_reports_without_pending_relays(store, db_url, monkeypatch):
    monkeypatch.setattr(housekeeping, "PURGE_BATCH", 3)  # several batches
    purgeable, kept = scenario(store, db_url)
    before = time.time() - 500
    assert housekeeping.purge(store, before, dry_run=True) == len(purgeable)
    assert store.count() == len(purgeable) + len(kept)
    assert housekeeping.purge(store, before) == len(purgeable)
    assert store.count() == len(kept)
    for uid in purgeable:
        assert store.get(uid) is None and store.relay_state(uid) == {}
    for uid in kept:
        assert store.get(uid) is not None
    assert housekeeping.purge(store, before) == 0
    assert sum(b["pending"] for b in store.backlog().values()) == 5  # 1 + 2 + 2


def test_purge_command(runner, store, db_url):
    purgeable, kept = scenario(store, db_url)
    result = runner.invoke(main, ["purge", "--older-than", "10m", "--dry-run",
                                  "--database-url", db_url])
    assert result.exit_code == 0, result.output
    assert result.output == f"{len(purgeable)} reports would be deleted\n"
    assert store.count() == len(purgeable) + len(kept)
    result = runner.invoke(main, ["--database-url", db_url, "purge", "--older-than", "10m"])
    assert result.output == f"{len(purgeable)} reports deleted\n"
    assert store.count() == len(kept)
    for args in (["--older-than", "0"], ["--older-than", "soon"], []):
        result = runner.invoke(main, ["purge", "--database-url", db_url, *args])
        assert result.exit_code == 2, result.output


@pytest.mark.parametrize("backend", ["sqlite"])
def test_retention_in_the_app(app_config, tmp_path):
    """One process: it leads, purges at start and every purge-interval; /healthz shows it."""
    from tunnel_telemetry.web import create_app

    app = create_app({**app_config, "retention": "10m", "purge-interval": "1s"})
    svc = app.extensions["tunnel_telemetry"]
    client = app.test_client()
    old = add(svc.store, dests=[])
    age(app_config["database-url"], [old], 3600)
    try:
        assert client.get("/healthz").get_json()["retention"]["retention_s"] == 600
        wait_until(lambda: svc.store.get(old) is None, 10, "the old report purged")
        wait_until(lambda: client.get("/healthz").get_json()["retention"]["purged"] == 1, 5,
                   "/healthz showing the purge")
        assert client.get("/healthz").get_json()["retention"]["last_purge"].endswith("Z")
    finally:
        svc.close()
    forever = create_app({**app_config, "retention": "0"})
    forever.test_client().get("/healthz")
    assert forever.extensions["tunnel_telemetry"].housekeeping._thread is None
    forever.extensions["tunnel_telemetry"].close()


def test_bad_retention_is_one_line(runner, tmp_path):
    result = runner.invoke(main, ["--retention", "forever", "--database-url",
                                  f"sqlite:///{tmp_path}/r.db"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "retention:" in result.output


@pytest.mark.e2e
def test_purge_under_load_loses_no_pending_relay(tt_server):
    """Two workers take reports while one of them purges: reports OONI would take wait for
    an OONI that is down (pending), the others (client network unknown: skipped) go once
    older than the retention; at no moment is a report missing that should not be."""
    retention = 1.0
    port = free_port()
    server = tt_server("--workers", "2", "--ooni-relay", "--ooni-api",
                       f"http://127.0.0.1:{free_port()}", "--relay-retry-min", "1h",
                       "--retention", f"{retention}s", "--purge-interval", "200ms",
                       "--metrics-listen", f"127.0.0.1:{port}")
    db = server.workdir / "tt-data" / "reports.db"
    acked: dict[str, tuple[str, float, float]] = {}  # uuid: (kind, sent, acknowledged)
    lock = threading.Lock()
    stop = threading.Event()

    def load(n):
        session = requests.Session()
        i = 0
        while not stop.is_set():
            kind = "pending" if (n + i) % 2 else "skipped"
            i += 1
            uid = str(uuid.uuid4())
            located = {"client_asn": "AS30722", "client_cc": "IT"} if kind == "pending" else {}
            sent = time.time()
            resp = session.post(server.url + "/report", json=make_report(uuid=uid, **located),
                                timeout=10)
            assert resp.status_code == 201, resp.text
            with lock:
                acked[uid] = (kind, sent, time.time())

    def check():
        """Every acknowledged report missing from the database may be missing."""
        with lock:
            known = dict(acked)
        start = time.time()
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            present = {row[0] for row in conn.execute("SELECT uuid FROM reports")}
        for uid, (kind, sent, _) in known.items():
            if uid not in present:
                assert kind == "skipped", "a report waiting for its relay was deleted"
                assert sent < start - retention, "a report younger than the retention"
        return present, known

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load, n) for n in range(4)]
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            check()
            time.sleep(0.1)
        stop.set()
        for future in futures:
            future.result()

    skipped = {u for u, (kind, _, _) in acked.items() if kind == "skipped"}
    pending = set(acked) - skipped
    assert len(skipped) > 20 and len(pending) > 20
    wait_until(lambda: not (check()[0] & skipped), 10, "every skipped report purged")
    present, _ = check()
    assert present == pending
    store = open_store(f"sqlite:///{db}")
    try:
        assert all(store.relay_state(u)["ooni"]["state"] == "pending" for u in pending)
        assert store.backlog()["ooni"]["pending"] == len(pending)
    finally:
        store.close()
    wait_until(lambda: requests.get(server.url + "/healthz", timeout=5).json()[
        "retention"]["purged"] == len(skipped), 5, "/healthz counting the purge")
    with requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    assert families["tt_reports_purged"].samples[0].value == len(skipped)
