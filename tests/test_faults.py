"""Faults around a running collector: a full, read-only or locked store; geo databases that are
truncated, replaced or missing while it runs (reloaded on SIGHUP without a restart)."""

import ipaddress
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tunnel_telemetry.testing.fake_ooni import FakeOONI
from tunnel_telemetry.testing.geodb import (
    synthetic_networks,
    write_asn_db,
    write_country_db,
    write_synthetic_dbs,
)
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import free_port, wait_for

pytestmark = pytest.mark.e2e


def post(server, report=None, address=None, timeout=10):
    headers = {"Connection": "close"}
    if address:
        headers["X-Forwarded-For"] = address
    with requests.post(server.url + "/report", json=report or make_report(), headers=headers,
                       timeout=timeout) as resp:
        return resp.status_code, resp.headers, resp.json()


def read_db(path):
    """(uuids of reports, relay rows (uuid, destination), integrity) read-only from the file."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        reports = [row[0] for row in conn.execute("SELECT uuid FROM reports")]
        relays = [tuple(row) for row in conn.execute("SELECT uuid, destination FROM relays")]
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    return reports, relays, integrity


def assert_retry_later(status, headers, body):
    assert status == 503, body
    assert int(headers["Retry-After"]) >= 1
    assert body == {"ok": False, "msg": "the report could not be stored, retry later",
                    "errors": []}


# ---------------------------------------------------------------------------------------------
# The store


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (root only): a disk that fills up or turns read-only on demand."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs",
                           str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    try:
        yield TinyFS(mount_point)
    finally:
        for command in (["umount", str(mount_point)], ["umount", "-l", str(mount_point)]):
            if os.path.ismount(mount_point):
                subprocess.run(command, capture_output=True)
        assert not os.path.ismount(mount_point)


class TinyFS:
    def __init__(self, path):
        self.path = path

    def __truediv__(self, name):
        return self.path / name

    def remount(self, options):
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True)


def relay_args():
    """Relay to an OONI that is not there, retrying much later: every relay row stays queued."""
    return ["--ooni-relay", "--ooni-api", f"http://127.0.0.1:{free_port()}",
            "--relay-retry-min", "1h", "--relay-retry-max", "2h"]


def big_report(report_uuid):
    return make_report(uuid=report_uuid, config={f"k{i}": "v" * 1000 for i in range(40)})


def test_full_disk_is_503_and_nothing_is_half_written(tiny_fs, tt_server):
    db = tiny_fs / "reports.db"
    server = tt_server("--workers", "2", "--database-url", f"sqlite:///{db}", *relay_args())
    stored, refused = [], []
    while len(refused) < 5 and len(stored) < 200:
        report_uuid = str(uuid.uuid4())
        status, headers, body = post(server, big_report(report_uuid))
        if status == 201:
            stored.append(report_uuid)
        else:
            assert_retry_later(status, headers, body)
            refused.append(report_uuid)
    assert stored and len(refused) == 5, "the disk never filled"
    with requests.get(server.url + "/healthz", timeout=10) as resp:
        assert resp.headers["Content-Type"] == "application/json"

    tiny_fs.remount("size=32m")  # space again: the refused reports are retried and stored
    for report_uuid in refused:
        status, _, body = post(server, big_report(report_uuid))
        assert status == 201, body
    server.stop(signal.SIGINT)
    reports, relays, integrity = read_db(db)
    assert integrity == "ok"
    assert sorted(reports) == sorted(stored + refused), "every 201 once, no refused leftovers"
    assert sorted(relays) == sorted((u, "ooni") for u in stored + refused)
    assert "Traceback" not in server.logs()
    assert "store error: OperationalError disk_full" in server.logs()


@pytest.fixture
def immutable(tmp_path):
    """chattr +i / -i: writes through open descriptors fail with EIO/EPERM, even as root."""
    probe = tmp_path / "probe"
    probe.write_text("x")
    if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable attribute")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    marked = set()

    def set_(paths, on):
        for path in paths:
            subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
            (marked.add if on else marked.discard)(path)

    yield set_
    set_(list(marked), False)


def test_store_io_errors_are_503_until_it_recovers(tmp_path, tt_server, immutable):
    db = tmp_path / "reports.db"
    server = tt_server("--workers", "1", "--database-url", f"sqlite:///{db}", *relay_args())
    first = str(uuid.uuid4())
    assert post(server, make_report(uuid=first))[0] == 201
    immutable([db, tmp_path / "reports.db-wal"], True)
    refused = str(uuid.uuid4())
    try:
        for _ in range(3):
            assert_retry_later(*post(server, make_report(uuid=refused)))
    finally:
        immutable([db, tmp_path / "reports.db-wal"], False)
    assert wait_for(lambda: post(server, make_report(uuid=refused))[0] == 201)
    server.stop(signal.SIGINT)
    reports, relays, integrity = read_db(db)
    assert integrity == "ok" and sorted(reports) == sorted([first, refused])
    assert sorted(relays) == sorted([(first, "ooni"), (refused, "ooni")])
    assert "store error: OperationalError io_error" in server.logs()


def test_healthz_says_the_disk_is_low_before_it_is_full(tiny_fs, tt_server):
    """On a real 1 MiB file system: /healthz is ok while there is room, 503 with "disk": "low"
    once less than min_free_mb is left (load balancers and alerts act on it), ok again when
    space comes back."""
    db = tiny_fs / "reports.db"
    server = tt_server("--workers", "2", "--database-url", f"sqlite:///{db}?min_free_mb=0.3")

    def health():
        with requests.get(server.url + "/healthz", timeout=10) as resp:
            return resp.status_code, resp.json()["store"]

    assert health() == (200, {"backend": "sqlite", "ok": True, "disk": "ok"})
    for _ in range(200):
        if health()[0] == 503:
            break
        status, headers, body = post(server, big_report(str(uuid.uuid4())))
        if status != 201:
            assert_retry_later(status, headers, body)
    assert health() == (503, {"backend": "sqlite", "ok": False, "disk": "low"})
    tiny_fs.remount("size=32m")
    assert health() == (200, {"backend": "sqlite", "ok": True, "disk": "ok"})


def test_deleted_database_is_503_not_acknowledged_into_the_void(tmp_path, tt_server):
    db = tmp_path / "reports.db"
    server = tt_server("--workers", "2", "--database-url", f"sqlite:///{db}")
    assert post(server)[0] == 201
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"reports.db{suffix}").unlink()
    for _ in range(6):  # whichever worker and thread answers
        assert_retry_later(*post(server))
    with requests.get(server.url + "/healthz", timeout=10) as resp:
        assert resp.status_code == 503 and resp.json()["store"]["ok"] is False
    assert not db.exists()
    # A thread that had the file open notices it is gone; a thread opening it anew cannot.
    logs = server.logs()
    assert "OperationalError gone" in logs or "OperationalError cannot_open" in logs


def test_locked_store_is_503_within_its_timeout(tmp_path, tt_server):
    db = tmp_path / "reports.db"
    server = tt_server("--workers", "1", "--database-url", f"sqlite:///{db}?timeout=0.5")
    assert post(server)[0] == 201
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
    try:
        locked = str(uuid.uuid4())
        assert_retry_later(*post(server, make_report(uuid=locked)))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert post(server, make_report(uuid=locked))[0] == 201
    server.stop(signal.SIGINT)
    reports, _, integrity = read_db(db)
    assert integrity == "ok" and len(reports) == 2 and locked in reports
    assert "store error: OperationalError locked" in server.logs()


# ---------------------------------------------------------------------------------------------
# Geo databases


def geo_args(country, asn, workers="2"):
    return ["--workers", workers, "--proxy-hops", "1", "--geoip-country-db", str(country),
            "--geoip-asn-db", str(asn)]


def test_geo_db_rewritten_in_place_does_not_crash_workers(tmp_path, tt_server):
    """cp over a mapped database, or a truncation, used to kill workers with SIGBUS."""
    country, asn = write_synthetic_dbs(tmp_path / "geo", n_networks=5000, seed=7)
    networks = [(net, cc, number) for net, cc, number in synthetic_networks(5000, 7)
                if ":" not in net][::20]
    server = tt_server(*geo_args(country, asn, workers="1"))
    workers = server.worker_pids()

    def check_all():
        for net, cc, number in networks:
            address = str(ipaddress.ip_network(net)[1])
            endpoint = f"ss://{ipaddress.ip_network(net)[-2]}:443"
            status, _, body = post(server, make_report(endpoint=endpoint), address)
            assert status == 201, body
            assert (body["client_asn"], body["client_cc"]) == (f"AS{number}", cc)
            assert (body["endpoint_asn"], body["endpoint_cc"]) == (f"AS{number}", cc)

    check_all()
    for path in (country, asn):
        with open(path, "r+b") as fh:
            fh.truncate(100)
    check_all()  # answers from the databases as they were opened
    assert server.worker_pids() == workers, "no worker died"
    assert "Traceback" not in server.logs()


def test_geo_dbs_reload_on_sighup_without_a_restart(tmp_path, tt_server):
    country, asn = tmp_path / "country.mmdb", tmp_path / "asn.mmdb"
    write_country_db(country, {"1.1.1.0/24": "AU"})
    write_asn_db(asn, {"1.1.1.0/24": (13335, "CLOUDFLARENET")})
    server = tt_server(*geo_args(country, asn))
    master = server.proc.pid

    def answer():
        status, _, body = post(server, address="1.1.1.7")
        assert status == 201, body
        return body["client_asn"], body["client_cc"]

    def hup_until(expected):
        before = set(server.worker_pids())
        os.kill(master, signal.SIGHUP)
        # The old workers answer (from the old databases) until they stop accepting (~1 s).
        assert wait_for(lambda: not before & set(server.worker_pids())), server.logs()[-2000:]
        assert wait_for(lambda: answer() == expected), (answer(), server.logs()[-2000:])
        assert [answer() for _ in range(10)] == [expected] * 10, "every worker has it"

    assert answer() == ("AS13335", "AU")
    # An update written next to the file and renamed over it: live after SIGHUP only.
    write_country_db(tmp_path / "new.mmdb", {"1.1.1.0/24": "NZ"})
    os.replace(tmp_path / "new.mmdb", country)
    assert answer() == ("AS13335", "AU")
    hup_until(("AS13335", "NZ"))
    # An update copied over the file in place (cp).
    write_country_db(tmp_path / "new.mmdb", {"1.1.1.0/24": "US"})
    write_asn_db(tmp_path / "new-asn.mmdb", {"1.1.1.0/24": (64500, "EXAMPLE")})
    country.write_bytes((tmp_path / "new.mmdb").read_bytes())
    asn.write_bytes((tmp_path / "new-asn.mmdb").read_bytes())
    hup_until(("AS64500", "US"))

    # Broken updates keep the databases in use: a half-copied file, then no file at all.
    good = country.read_bytes()
    country.write_bytes(good[: len(good) // 2])
    os.kill(master, signal.SIGHUP)
    assert wait_for(lambda: "geo_reload_failed geo_db_invalid" in server.logs())
    country.unlink()
    os.kill(master, signal.SIGHUP)
    assert wait_for(lambda: "geo_reload_failed geo_db_missing" in server.logs())
    assert [answer() for _ in range(10)] == [("AS64500", "US")] * 10

    assert server.proc.pid == master and server.proc.poll() is None, "never restarted"
    with requests.get(server.url + "/healthz", timeout=10) as resp:
        roles = [db["role"] for db in resp.json()["geo"]]
    assert roles == ["country", "asn"]
    assert "Traceback" not in server.logs()
    assert json.dumps(answer())  # still serving


# ---------------------------------------------------------------------------------------------
# OONI down, slow, answering garbage, then back


class Garbage(ThreadingHTTPServer):
    """Something else on OONI's address: 200 with an HTML page for every request."""

    daemon_threads = True

    def __init__(self, port):
        outer = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                outer.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b"<html><body>captive portal</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.shutdown()
        self.server_close()
        self.thread.join()


def backlog(server):
    with requests.get(server.url + "/healthz", timeout=5) as resp:
        return resp.json()["relay"]["backlog"]


IT = {"client_asn": "AS30722", "client_cc": "IT"}  # OONI drops AS0 / ZZ: give a location


def test_ooni_down_slow_and_garbage_then_back_drains_oldest_first_without_duplicates(
        tt_server):
    port = free_port()
    fakes = [FakeOONI(port=port).start()]
    server = tt_server("--workers", "1", "--ooni-relay", "--ooni-api", f"http://127.0.0.1:{port}",
                       "--relay-timeout", "200ms", "--relay-attempt-timeout", "2s",
                       "--relay-interval", "100ms", "--relay-retry-min", "100ms",
                       "--relay-retry-max", "500ms", "--relay-concurrency", "1")
    posted = []

    def post_some(n, expect):
        for _ in range(n):
            status, _, body = post(server, make_report(**IT))
            assert status == 201, body
            assert expect(body), body
            posted.append(body["uuid"])

    def pending(body):
        return body["relay"]["ooni"] == "pending"

    def delivered(body):
        return "ooni-measurement-id" in body

    garbage = None
    try:
        post_some(2, delivered)
        fakes[-1].stop()  # down: connection refused
        post_some(4, pending)
        time.sleep(0.5)
        fakes.append(FakeOONI(port=port, latency=0.6).start())  # slow, but answers in time
        post_some(2, pending)
        for fault in (503, "reset"):  # errors, then connections reset
            faults = fakes[-1].stats()["faults"]
            fakes[-1].fail(fault)
            post_some(3, pending)
            assert wait_for(lambda f=faults: fakes[-1].stats()["faults"] > f)
            fakes[-1].clear_faults()
        # Down again. A submission it is still sleeping on would be kept after its client
        # gave up (a real OONI can do that too: the collector cannot tell, and sends it again).
        # Refuse first, so that what this test counts as a duplicate is the drain's alone.
        fakes[-1].fail(503)
        assert wait_for(lambda: fakes[-1].stats()["in_flight"] == 0)
        fakes[-1].stop()
        garbage = Garbage(port)  # 200 with a web page
        post_some(4, pending)
        time.sleep(1.5)  # a while of garbage for the retry loop too
        garbage.stop()
        # Garbage is a destination failure: probed with backoff, not every report in turn.
        assert 0 < garbage.requests <= 20, garbage.requests
        garbage = None
        before = sum((f.uuids() for f in fakes), Counter())
        fakes.append(FakeOONI(port=port).start())  # back
        wait_for(lambda: sum((f.uuids() for f in fakes), Counter()).keys() >= set(posted),
                 timeout=30)
        assert wait_for(lambda: backlog(server) == {}, timeout=10)
        delivered_all = sum((f.uuids() for f in fakes), Counter())
        assert set(delivered_all) == set(posted)
        assert max(delivered_all.values()) == 1, "no duplicates"
        # The backlog went out oldest first once OONI was back.
        drained = [m.uuid for m in fakes[-1].measurements]
        order = [posted.index(u) for u in drained]
        assert order == sorted(order), order
        assert set(drained) == set(posted) - set(before)
        assert len(drained) >= 14
    finally:
        if garbage is not None:
            garbage.stop()
        for fake in fakes:
            fake.stop()
    logs = server.logs()
    for reason in ("connection-error", "http-503", "bad-answer"):
        assert reason in logs, reason
