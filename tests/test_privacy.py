"""Privacy audit: after hostile input, limits, slow clients, faults, a crash and a reload, no
client IP is in the databases, the relayed requests or the logs; no endpoint address either
unless allow-public-endpoint is on.

The collector A relays to the fake OONI and, through a recording proxy, to a secondary
collector B; every byte each of them keeps on disk or writes to a log is searched.
"""

import ipaddress
import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from tunnel_telemetry.testing.fake_ooni import FakeOONI
from tunnel_telemetry.testing.reports import make_report

pytestmark = pytest.mark.e2e

TOKEN = "privacy-relay-token-0123456789"
# Client addresses (in the test geo databases, so geolocation really uses them) and others a
# client writes into X-Forwarded-For.
CLIENT_V4, CLIENT_V6, SPOOFED = "2.3.4.5", "2a01:4f8:1::1234", "9.9.9.9"
ENDPOINT_V4, ENDPOINT_V6, ENDPOINT_HOST = "1.1.1.77", "2a01:4f8:1::beef", "secret-proxy.example.org"


def spellings(address):
    """The ways an address may be written: compressed, exploded, IPv4-mapped."""
    parsed = ipaddress.ip_address(address)
    out = {str(parsed), parsed.exploded}
    if parsed.version == 4:
        out |= {f"::ffff:{parsed}"}
    return out


CLIENTS = set().union(*(spellings(a) for a in (CLIENT_V4, CLIENT_V6, SPOOFED)))
ENDPOINTS = set().union(*(spellings(a) for a in (ENDPOINT_V4, ENDPOINT_V6))) | {ENDPOINT_HOST}


class Recorder(ThreadingHTTPServer):
    """A reverse proxy in front of B that keeps every request A relays to it."""

    daemon_threads = True

    def __init__(self, target):
        self.seen: list[bytes] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.seen.append(self.requestline.encode() + bytes(self.headers) + body)
                with requests.post(target + self.path, data=body, timeout=30, headers={
                        k: v for k, v in self.headers.items()
                        if k.lower() in ("authorization", "content-type")}) as resp:
                    self.send_response(resp.status_code)
                    self.send_header("Content-Type", resp.headers.get("Content-Type", ""))
                    self.send_header("Content-Length", str(len(resp.content)))
                    self.end_headers()
                    self.wfile.write(resp.content)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.shutdown()
        self.server_close()
        self.thread.join()


def everything_on_disk(server):
    """Every file the server wrote: database, WAL, shared memory, locks, logs."""
    return b"".join(path.read_bytes() for path in sorted(Path(server.workdir).rglob("*"))
                    if path.is_file())


def find(haystack, needles):
    return sorted(n for n in needles if n.encode() in haystack)


def send(server, report, client, expect=None, extra_headers=None):
    headers = {"X-Forwarded-For": client, **(extra_headers or {})}
    with requests.post(server.url + "/report", json=report, headers=headers, timeout=10) as resp:
        if expect is not None:
            assert resp.status_code == expect, resp.text
        return resp.status_code


def a_report(endpoint=f"ss://{ENDPOINT_V4}:443", **fields):
    """The endpoint's address and the client's everywhere a client could write them."""
    address = endpoint.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
    return make_report(
        endpoint=endpoint, client_asn="AS30722", client_cc="IT",
        config={"server": address, "sni": address, "via": CLIENT_V4,
                "note": f"from {CLIENT_V6} to {address}", "prefix": "xx"},
        failure={"op": "tcp.connect", "msg": f"dial {address}:443 from {CLIENT_V4}: refused",
                 "posix_error": "ECONNREFUSED"},
        **fields)


@pytest.mark.parametrize("allow_public_endpoint", [False, True])
def test_no_address_leaks_anywhere(tt_server, geo_dbs, allow_public_endpoint):
    country, asn = geo_dbs
    allow = ["--allow-public-endpoint"] if allow_public_endpoint else []
    with FakeOONI() as fake:
        b = tt_server("--relay-tokens", TOKEN, "--workers", "1", "--collector-id", "b", *allow,
                      name="b")
        recorder = Recorder(b.url)
        try:
            # Rate limits count per worker (memory://): 13 each; CLIENT_V6's 34 POSTs overflow
            # one of the two workers, CLIENT_V4's 12 never do.
            a = tt_server("--workers", "2", "--proxy-hops", "1", "--collector-id", "a", "--debug",
                          "--geoip-country-db", str(country), "--geoip-asn-db", str(asn),
                          "--ooni-relay", "--ooni-api", fake.url, "--relay-url", recorder.url,
                          "--relay-token", TOKEN, "--relay-interval", "100ms",
                          "--relay-retry-min", "100ms", "--relay-retry-max", "300ms",
                          "--rate-limit", "26", "--rate-limit-burst", "13",
                          "--header-timeout", "1s", *allow, name="a")
            run_everything(a, fake)
            wait = time.monotonic() + 30
            while time.monotonic() < wait and (backlog(a) or fake.stats()["uuids"] < 12):
                time.sleep(0.1)
            assert backlog(a) == {} and fake.stats()["uuids"] >= 12
        finally:
            recorder.stop()
        a.stop()
        b.stop()
        relayed_to_ooni = fake.all_text().encode()
    relayed_to_b = b"".join(recorder.seen)
    assert relayed_to_b and relayed_to_ooni

    for name, data in [("A's files and logs", everything_on_disk(a)),
                       ("B's files and logs", everything_on_disk(b)),
                       ("requests relayed to OONI", relayed_to_ooni),
                       ("requests relayed to B", relayed_to_b)]:
        assert find(data, CLIENTS) == [], f"client address in {name}"
        if not allow_public_endpoint:
            assert find(data, ENDPOINTS) == [], f"endpoint address in {name}"
    # Logs never name even the socket peer (127.0.0.1 here); the one start-up line naming the
    # server's own listen address (issue 23) is the exception.
    for server in (a, b):
        lines = (server.stdout_path.read_bytes() + server.stderr_path.read_bytes()).splitlines()
        assert [line for line in lines if b"127.0.0.1" in line
                and b"] Listening at: http://127.0.0.1:" not in line] == []
    if allow_public_endpoint:  # the audit would see them: they are really there
        assert ENDPOINT_V4.encode() in everything_on_disk(a)
        assert ENDPOINT_V4.encode() in relayed_to_b


def backlog(server):
    with requests.get(server.url + "/healthz", timeout=10) as resp:
        return resp.json()["relay"]["backlog"]


def run_everything(a, fake):
    """Traffic that takes every path: accepted, rejected, limited, cut off, crashed, reloaded."""
    endpoints = [f"ss://{ENDPOINT_V4}:443", f"obfs4://[{ENDPOINT_V6}]:9001",
                 f"vless://{ENDPOINT_HOST}:443", f"ss://[::ffff:{ENDPOINT_V4}]:8388"]
    clients = [CLIENT_V4, CLIENT_V6, f"{SPOOFED}, {CLIENT_V4}", f"[{CLIENT_V6}]:4711"]
    for endpoint in endpoints:
        for client in clients:
            send(a, a_report(endpoint=endpoint), client, expect=201)
    # Rejected: the addresses inside invalid reports, bad JSON and bad HTTP.
    send(a, a_report(endpoint=f"ss://user:pw@{ENDPOINT_V4}:443"), CLIENT_V4, expect=400)
    send(a, a_report(endpoint=f"ss://[{ENDPOINT_V6}%eth0]:443"), CLIENT_V6, expect=400)
    send(a, a_report(time=f"at {CLIENT_V4}"), CLIENT_V4, expect=400)
    with requests.post(a.url + "/report", data=f'{{"x": "{CLIENT_V4}"'.encode(), timeout=10,
                       headers={"Content-Type": "application/json",
                                "X-Forwarded-For": CLIENT_V4}) as resp:
        assert resp.status_code == 400
    with socket.create_connection(("127.0.0.1", a.port), timeout=10) as sock:
        sock.sendall(f"GET /{CLIENT_V4} HTTP/1.1\r\nX-Forwarded-For: {CLIENT_V4}\r\n"
                     f"Bad Header: {ENDPOINT_V4}\r\n\r\n".encode())
        assert b"400" in sock.recv(1000)
    with requests.get(f"{a.url}/{CLIENT_V6}/{ENDPOINT_V4}?ip={CLIENT_V4}", timeout=10,
                      headers={"X-Forwarded-For": CLIENT_V4}) as resp:
        assert resp.status_code == 404
    # Rate limited (429) and the OONI relay failing for a while.
    fake.fail(503, times=5)
    statuses = [send(a, a_report(), CLIENT_V6) for _ in range(25)]
    assert 429 in statuses
    # A slow client cut off, a worker killed, the geo databases reloaded.
    with socket.create_connection(("127.0.0.1", a.port), timeout=10) as sock:
        sock.sendall(f"POST /report HTTP/1.1\r\nX-Forwarded-For: {CLIENT_V4}\r\n".encode())
        assert sock.recv(1000) == b""  # header-timeout: closed
    os.kill(a.worker_pids()[0], signal.SIGKILL)
    os.kill(a.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if send(a, a_report(), SPOOFED) == 201:
                break
        except requests.RequestException:
            pass
        time.sleep(0.2)
    with requests.get(a.url + "/healthz", timeout=10) as resp:
        assert json.dumps(resp.json())
