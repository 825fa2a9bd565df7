"""Relay end to end: real tt-server (gunicorn) processes on 127.0.0.1 and the fake OONI."""

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tunnel_telemetry.store import open_store
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import wait_until

pytestmark = pytest.mark.e2e

TOKEN = "e2e-relay-token-0123456789"
CLIENT_IP = "203.0.113.77"
ENDPOINT_IP = "198.51.100.9"
FAST = ["--relay-interval", "100ms", "--relay-retry-min", "100ms", "--relay-retry-max", "300ms"]
IT = {"client_asn": "AS30722", "client_cc": "IT"}


def post(server, **fields):
    resp = requests.post(f"{server.url}/report", json=make_report(**{**IT, **fields}),
                         headers={"X-Forwarded-For": CLIENT_IP}, timeout=10)
    assert resp.status_code == 201, resp.text
    return resp.json()


def db_of(server):
    return open_store(f"sqlite:///{server.workdir / 'tt-data' / 'reports.db'}")


def stored_bytes(server):
    """Every byte the server keeps on disk (database, WAL) and wrote to its logs."""
    data = b""
    for path in sorted(Path(server.workdir).rglob("*")):
        if path.is_file():
            data += path.read_bytes()
    return data


def backlog(server):
    return requests.get(f"{server.url}/healthz", timeout=5).json()["relay"]["backlog"]


def test_happy_path_and_privacy_of_what_ooni_receives(tt_server, fake):
    a = tt_server("--ooni-relay", "--ooni-api", fake.url, "--workers", "2", "--proxy-hops", "1",
                  "--collector-id", "e2e-a")
    bodies = [post(a, endpoint=f"ss://{ENDPOINT_IP}:443",
                   failure={"op": "tcp.connect", "msg": f"dial {ENDPOINT_IP}:443 from {CLIENT_IP}"})
              for _ in range(5)]
    for body in bodies:
        uid = body["ooni-measurement-id"]
        assert body["ooni-measurement-link"] == f"https://explorer.ooni.org/m/{uid}"
    s = fake.stats()
    assert (s["submissions"], s["uuids"], s["rejected"]) == (5, 5, 0)
    assert s["opens"] <= 2  # one open report per worker
    text = fake.all_text()
    assert CLIENT_IP not in text and ENDPOINT_IP not in text
    a.stop()
    on_disk = stored_bytes(a)
    assert CLIENT_IP.encode() not in on_disk and ENDPOINT_IP.encode() not in on_disk
    assert fake.stats()["open_reports"] == 0  # closed at shutdown


def test_restart_with_a_pending_backlog_that_drains(tt_server, fake):
    fake.fail(503)
    args = ["--ooni-relay", "--ooni-api", fake.url, "--workers", "2", *FAST]
    a = tt_server(*args)
    bodies = [post(a) for _ in range(10)]
    assert {b["relay"]["ooni"] for b in bodies} == {"pending"}
    a.stop()
    store = db_of(a)
    try:
        assert store.backlog()["ooni"]["pending"] == 10
    finally:
        store.close()
    fake.clear_faults()
    a.start()  # same working directory, same database
    wait_until(lambda: fake.stats()["uuids"] == 10, what="backlog drained")
    wait_until(lambda: backlog(a) == {}, what="empty backlog")
    assert fake.stats()["duplicates"] == 0
    store = db_of(a)
    try:
        assert all("ooni-measurement-id" in store.get(b["uuid"]) for b in bodies)
    finally:
        store.close()


def test_no_duplicate_delivery_across_workers_and_retry_loops(tt_server, fake):
    fake.fail(503, probability=0.4)
    fake.set_latency(0.01)
    a = tt_server("--ooni-relay", "--ooni-api", fake.url, "--workers", "4",
                  "--relay-interval", "50ms", "--relay-retry-min", "50ms",
                  "--relay-retry-max", "200ms")
    wait_until(lambda: len(a.worker_pids()) == 4, what="4 workers")
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda _: post(a), range(80)))
    wait_until(lambda: fake.stats()["uuids"] == 80, timeout=60, what="all delivered")
    wait_until(lambda: backlog(a) == {}, what="empty backlog")
    s = fake.stats()
    assert s["duplicates"] == 0, fake.uuids().most_common(3)
    assert s["faults"] > 0  # retries really happened
    assert {m.uuid for m in fake.measurements} == {b["uuid"] for b in bodies}


def test_relay_once_command_uses_the_servers_configuration_sources(tt_server, fake, tmp_path):
    fake.fail("reset")
    a = tt_server("--ooni-relay", "--ooni-api", fake.url, "--relay-retry-min", "1h")
    for _ in range(3):
        post(a)
    a.stop()
    fake.clear_faults()
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{a.workdir}/tt-data/reports.db",
           "OONI_RELAY": "true", "OONI_API": fake.url, "TT_CONFIG": ""}
    result = subprocess.run([sys.executable, "-m", "tunnel_telemetry.cli", "relay", "--once"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ooni: 3 delivered; 0 still pending" in result.stdout
    assert fake.stats()["uuids"] == 3


@pytest.mark.parametrize("a_allows", [False, True])
def test_chain_a_to_b_keeps_client_ip_and_endpoint_from_b(tt_server, fake, geo_dbs, a_allows):
    client_ip, endpoint_ip = "2.3.4.77", "1.1.1.9"  # known networks of the test geo databases
    b = tt_server("--relay-tokens", TOKEN, "--ooni-relay", "--ooni-api", fake.url,
                  "--collector-id", "secondary", *FAST, name="b")  # no geo databases at all
    a_args = ["--relay-url", b.url, "--relay-token", TOKEN, "--proxy-hops", "1",
              "--collector-id", "primary", "--geoip-country-db", str(geo_dbs[0]),
              "--geoip-asn-db", str(geo_dbs[1])] + (["--allow-public-endpoint"] if a_allows else [])
    a = tt_server(*a_args, name="a")
    resp = requests.post(f"{a.url}/report", timeout=10, headers={"X-Forwarded-For": client_ip},
                         json=make_report(endpoint=f"ss://{endpoint_ip}:443",
                                          failure={"op": "tls.handshake",
                                                   "msg": f"reset by {endpoint_ip}"}))
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert "relay" not in body  # delivered to B within the request
    assert ("endpoint" in body) is a_allows
    assert (body["client_asn"], body["client_cc"]) == ("AS50304", "NO")
    assert (body["endpoint_asn"], body["endpoint_cc"]) == ("AS13335", "AU")
    wait_until(lambda: fake.stats()["submissions"] == 1, what="B relayed on to OONI")
    store = db_of(b)
    try:
        # OONI answered; B records the measurement id right after.
        wait_until(lambda: "ooni-measurement-id" in store.get(body["uuid"]), what="B's link")
        at_b = store.get(body["uuid"])
    finally:
        store.close()
    expected = {k: v for k, v in body.items() if k not in ("endpoint", "endpoint_addr")}
    assert {k: v for k, v in at_b.items() if not k.startswith("ooni-")} == expected
    assert at_b["collector_id"] == "primary"  # the primary's, not B's
    assert at_b["ooni-measurement-link"].endswith(at_b["ooni-measurement-id"])
    [m] = fake.measurements
    assert m.uuid == body["uuid"] and m.content["annotations"]["collector_id"] == "primary"
    assert (m.content["probe_cc"], m.content["probe_asn"]) == ("NO", "AS50304")
    a.stop(signal.SIGINT)
    b.stop(signal.SIGINT)
    at_b_bytes = stored_bytes(b)  # database, WAL and logs of B
    assert client_ip.encode() not in at_b_bytes
    assert endpoint_ip.encode() not in at_b_bytes
    text = fake.all_text()
    assert client_ip not in text and endpoint_ip not in text
    assert client_ip.encode() not in stored_bytes(a)


def test_fallback_answers_survive_a_restart_and_are_confirmed_not_resent(tt_server, fake):
    """OONI's fastpath down: {} for every submission (kept in its fallback store). Nothing is
    sent twice, across a restart in the middle; once the wait is over each report is found
    through the measurements API and gets its explorer link."""
    fake.fail("fallback", ops=["submit"])
    args = ["--ooni-relay", "--ooni-api", fake.url, "--workers", "2", *FAST]
    a = tt_server(*args, "--relay-confirm-delay", "1h")
    bodies = [post(a) for _ in range(4)]
    assert {b["relay"]["ooni-reason"].split(":")[0] for b in bodies} == {"accepted-without-id"}
    a.stop()
    assert fake.stats()["submissions"] == 4
    fake.clear_faults()
    a.start()  # same database; the reports wait the hour: nothing is sent again
    assert backlog(a)["ooni"]["pending"] == 4
    a.stop()
    assert fake.stats()["submissions"] == 4
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{a.workdir}/tt-data/reports.db",
           "OONI_RELAY": "true", "OONI_API": fake.url, "TT_CONFIG": ""}
    result = subprocess.run([sys.executable, "-m", "tunnel_telemetry.cli", "relay", "--once"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ooni: 4 delivered; 0 still pending" in result.stdout  # confirmed, not resent
    s = fake.stats()
    assert (s["submissions"], s["duplicates"], s["fallback"]) == (4, 0, 4)
    store = db_of(a)
    try:
        assert all("ooni-measurement-link" in store.get(b["uuid"]) for b in bodies)
    finally:
        store.close()
