"""Crash safety under load: SIGKILL workers and the master while clients post and the relay
runs; every report that got a 201 is stored exactly once and reaches OONI at least once."""

import os
import signal
import sqlite3
import threading
import time
import uuid

import pytest
import requests

from tunnel_telemetry.testing.fake_ooni import FakeOONI
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import wait_for

pytestmark = pytest.mark.e2e

IT = {"client_asn": "AS30722", "client_cc": "IT"}
CLIENTS = 4  # posting threads
LOOP_CONCURRENCY = 4  # relay-concurrency: first attempts, and retries, in flight per worker


class Load:
    """Client threads posting reports with their own uuids until stopped."""

    def __init__(self, url, threads=CLIENTS):
        self.url = url
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acknowledged: list[str] = []  # got a 201
        self.unanswered: list[str] = []  # sent, but no answer (the server was killed)
        self.other: list[int] = []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self):
        session = requests.Session()
        try:
            while not self.stop.is_set():
                report_uuid = str(uuid.uuid4())
                try:
                    with session.post(self.url + "/report", json=make_report(uuid=report_uuid,
                                                                             **IT),
                                      timeout=10) as resp:
                        status = resp.status_code
                except requests.RequestException:
                    with self.lock:
                        self.unanswered.append(report_uuid)
                    session.close()
                    session = requests.Session()
                    time.sleep(0.05)
                    continue
                with self.lock:
                    (self.acknowledged.append(report_uuid) if status == 201
                     else self.other.append(status))
        finally:
            session.close()

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def count(self):
        with self.lock:
            return len(self.acknowledged)


def expire_leases(db, pids):
    """End now the relay leases held by the processes ``pids``."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        with conn:
            for pid in pids:
                conn.execute("UPDATE relays SET lease_until = 0 WHERE state = 'pending' "
                             "AND lease_owner LIKE ?", (f"%:{pid}:%",))
    finally:
        conn.close()


def backlog(server):
    with requests.get(server.url + "/healthz", timeout=10) as resp:
        return resp.json()["relay"]["backlog"]


def test_sigkill_workers_and_master_under_load(tt_server):
    with FakeOONI(latency=0.02) as fake:
        server = tt_server("--workers", "2", "--ooni-relay",
                           "--relay-concurrency", str(LOOP_CONCURRENCY),
                           "--ooni-api", fake.url, "--relay-timeout", "0",
                           "--relay-attempt-timeout", "1s", "--relay-interval", "100ms",
                           "--relay-retry-min", "100ms", "--relay-retry-max", "500ms")
        kills = []  # (time, worker processes killed)
        killed: set[int] = set()  # pids of every process killed or orphaned
        with Load(server.url) as load:

            def progress(n=20):
                start = load.count()
                assert wait_for(lambda: load.count() >= start + n, timeout=30), server.logs()

            def kill_a_worker():
                kills.append((time.time(), 1))
                victim = server.worker_pids()[0]
                killed.add(victim)
                os.kill(victim, signal.SIGKILL)

            def kill_everything():
                kills.append((time.time(), len(server.worker_pids())))
                killed.update(server.worker_pids() + [server.proc.pid])
                server.kill()  # master and workers at once
                server.start()

            def kill_the_master():
                workers = server.worker_pids()
                kills.append((time.time(), 0))  # the workers stop cleanly
                killed.update(workers + [server.proc.pid])
                os.kill(server.proc.pid, signal.SIGKILL)
                server.proc.wait(10)
                # Orphaned workers notice and stop; then the collector is restarted.
                assert wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in workers),
                                timeout=30)
                server.start()

            progress()
            for crash in (kill_a_worker, kill_everything, kill_a_worker, kill_the_master,
                          kill_everything, kill_a_worker):
                crash()
                progress()
        acknowledged = set(load.acknowledged)
        assert len(acknowledged) == len(load.acknowledged) >= 140
        assert set(load.other) <= {503}, (load.other, [  # busy or store trouble: retry later
            line for line in server.logs().splitlines() if "ERROR" in line][-10:])

        # relay-timeout 0: every relay runs after the 201, so kills interrupt relays of
        # acknowledged reports. Leases held by killed processes run out (1 s + the 10 s
        # margin for a fresh report, 4 x 1 s + 10 s for the retry loop's batches), then the
        # backlog drains. Instead of waiting, the test moves those leases into the past, as
        # the clock would (lease expiry itself is tested in test_store.py).
        expire_leases(server.workdir / "tt-data" / "reports.db", killed)
        assert wait_for(lambda: acknowledged <= set(fake.uuids()), timeout=150), (
            len(acknowledged - set(fake.uuids())), server.logs()[-3000:])
        assert wait_for(lambda: backlog(server) == {}, timeout=150), backlog(server)
        server.stop()

        db = server.workdir / "tt-data" / "reports.db"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            stored = [row[0] for row in conn.execute("SELECT uuid FROM reports")]
            relays = dict(conn.execute("SELECT uuid, state FROM relays WHERE destination = 'ooni'"))
            integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            conn.close()
        assert integrity == "ok"
        assert len(stored) == len(set(stored))
        assert acknowledged <= set(stored), "every 201 is stored"
        assert set(stored) <= acknowledged | set(load.unanswered), "nothing stored from nowhere"
        assert all(relays[u] == "delivered" for u in acknowledged)

        delivered = fake.uuids()
        assert set(delivered) <= set(stored)
        # A duplicate is a report whose relay a kill interrupted: OONI had taken it (its first
        # copy arrived around the kill) but the killed process never recorded that. A worker
        # has up to LOOP_CONCURRENCY first attempts and as many retries in flight.
        first_seen = {}
        for measurement in fake.measurements:
            first_seen.setdefault(measurement.uuid, measurement.received)
        duplicates = {u: n for u, n in delivered.items() if n > 1}
        for report_uuid, copies in duplicates.items():
            assert copies == 2, (report_uuid, copies)
            assert any(at - 2.0 <= first_seen[report_uuid] <= at + 1.0 for at, _ in kills), (
                "a duplicate that no kill explains")
        assert len(duplicates) <= sum(n for _, n in kills) * 2 * LOOP_CONCURRENCY, (
            duplicates)
        # The only refusals: a submission cut in half by a kill, a report closed meanwhile.
        assert all(r.startswith(("submit 400: body is not JSON", "submit 404"))
                   for r in fake.rejections()), fake.rejections()
    logs = server.logs()
    assert "Traceback" not in logs
