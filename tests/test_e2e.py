"""End to end: the real tt-server (gunicorn, several workers) on loopback, driven over HTTP."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import requests

from tunnel_telemetry.testing.reports import iso, make_report
from tunnel_telemetry.testing.server import TTServer

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


def post(server, payload, headers=None, timeout=10):
    headers = {"Content-Type": "application/json", **(headers or {})}
    return requests.post(server.url + "/report", data=json.dumps(payload), headers=headers,
                         timeout=timeout)


def db_rows(db_path):
    conn = sqlite3.connect(db_path)
    try:
        rows = conn.execute("SELECT uuid, body FROM reports").fetchall()
        return {uid: json.loads(body) for uid, body in rows}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, geo_dbs):
    """One collector for the read-mostly tests: 2 workers, geo DBs, one trusted proxy hop."""
    country, asn = geo_dbs
    workdir = tmp_path_factory.mktemp("e2e")
    with TTServer(workdir, ["--workers", "2", "--collector-id", "e2e",
                            "--geoip-country-db", str(country), "--geoip-asn-db", str(asn),
                            "--proxy-hops", "1",
                            "--database-url", f"sqlite:///{workdir}/reports.db"]) as srv:
        yield srv


def test_seed_readme_curl_example(tmp_path, tt_server):
    """The original README's example, with curl, against a default collector."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    srv = tt_server("--database-url", f"sqlite:///{tmp_path}/r.db", "--collector-id",
                    "uenohphi7oqueiZohl2V")
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"report-type": "tunnel-telemetry", "time": iso(),
                                  "endpoint": "ss://1.1.1.1:443", "config": {"prefix": "xx"}}))
    out = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", "-X", "POST", "-H",
         "Content-Type: application/json", "-H", "X-Forwarded-For: 2.3.4.5", "-d",
         f"@{report}", f"{srv.url}/report"], capture_output=True, text=True, timeout=30,
        check=True)
    body, status = out.stdout.rsplit("\n", 1)
    assert status == "201"
    stored = json.loads(body)
    assert stored["collector_id"] == "uenohphi7oqueiZohl2V"
    assert (stored["proto"], stored["endpoint_port"], stored["config"]) == ("ss", 443,
                                                                           {"prefix": "xx"})
    # proxy-hops defaults to 0: the forged header is ignored, the loopback peer is unknown.
    assert (stored["client_asn"], stored["client_cc"]) == ("AS0", "ZZ")
    assert uuid.UUID(stored["uuid"])
    assert db_rows(tmp_path / "r.db")[stored["uuid"]] == stored


@pytest.mark.parametrize("change, status, path", [
    ({"report-type": None}, 400, "$['report-type']"),
    ({"time": None}, 400, "$.time"),
    ({"endpoint": None}, 400, "$.endpoint"),
    ({"report-type": "other"}, 400, "$['report-type']"),
    ({"time": iso(timedelta(minutes=10))}, 400, "$.time"),
    ({"time": iso(timedelta(days=-8))}, 400, "$.time"),
    ({"time": "2024-04-12T00:00:00"}, 400, "$.time"),
    ({"endpoint": "ss://1.1.1.1:0"}, 400, "$.endpoint"),
    ({"endpoint": "ss://2001:db8::1:443"}, 400, "$.endpoint"),
])
def test_rejections(server, change, status, path):
    payload = make_report()
    for key, value in change.items():
        if value is None:
            payload.pop(key)
        else:
            payload[key] = value
    resp = post(server, payload, {"X-Forwarded-For": "2.3.4.5"})
    assert resp.status_code == status
    body = resp.json()
    assert body["ok"] is False and body["msg"]
    assert path in [e["path"] for e in body["errors"]]


@pytest.mark.parametrize("headers, status", [
    ({"Content-Type": "text/plain"}, 415),
    ({"Content-Type": "application/json"}, 400),
])
def test_not_json(server, headers, status):
    resp = requests.post(server.url + "/report", data=b"hello", headers=headers, timeout=10)
    assert resp.status_code == status and resp.json()["ok"] is False


def test_too_large(server):
    resp = requests.post(server.url + "/report", data=b"[" + b" " * (70 * 1024) + b"]",
                         headers={"Content-Type": "application/json"}, timeout=10)
    assert resp.status_code == 413 and resp.json()["ok"] is False


@pytest.mark.parametrize("endpoint, asn, cc", [
    ("ss://1.1.1.1:443", "AS13335", "AU"),
    ("obfs4://[2a01:4f8:1::99]:9001", "AS64500", "DE"),
    ("ss://[::ffff:1.1.1.1]:443", "AS13335", "AU"),
    ("vless://proxy.example.org:443", "AS0", "ZZ"),
])
def test_endpoint_geolocation(server, endpoint, asn, cc):
    resp = post(server, make_report(endpoint=endpoint), {"X-Forwarded-For": "2.3.4.5"})
    assert resp.status_code == 201
    body = resp.json()
    assert (body["endpoint_asn"], body["endpoint_cc"]) == (asn, cc)
    assert "endpoint" not in body and "endpoint_addr" not in body


@pytest.mark.parametrize("forwarded, asn, cc", [
    ("6.6.6.6, 2.3.4.5", "AS50304", "NO"),  # the client's own entry is never believed
    ("2.3.4.5", "AS50304", "NO"),
    ("6.6.6.6, 2a01:4f8:1::77", "AS64500", "DE"),
    ("2.3.4.5, 6.6.6.6", "AS666", "US"),
])
def test_proxy_hops_one(server, forwarded, asn, cc):
    resp = post(server, make_report(), {"X-Forwarded-For": forwarded})
    assert resp.status_code == 201
    assert (resp.json()["client_asn"], resp.json()["client_cc"]) == (asn, cc)


def test_proxy_hops_zero_ignores_header(tmp_path, tt_server, geo_dbs):
    country, asn = geo_dbs
    srv = tt_server("--database-url", f"sqlite:///{tmp_path}/r.db",
                    "--geoip-country-db", str(country), "--geoip-asn-db", str(asn))
    body = post(srv, make_report(), {"X-Forwarded-For": "2.3.4.5"}).json()
    assert (body["client_asn"], body["client_cc"]) == ("AS0", "ZZ")  # the loopback peer


def test_client_self_geolocation_wins(server):
    body = post(server, make_report(client_asn="AS3320", client_cc="DE"),
                {"X-Forwarded-For": "2.3.4.5"}).json()
    assert (body["client_asn"], body["client_cc"]) == ("AS3320", "DE")


def test_idempotent_uuid(server):
    report_id = str(uuid.uuid4())
    answers = [post(server, make_report(uuid=report_id), {"X-Forwarded-For": "2.3.4.5"})
               for _ in range(4)]
    assert {a.status_code for a in answers} == {201}
    assert len({a.text for a in answers}) == 1
    rows = db_rows(server.workdir / "reports.db")
    assert list(rows).count(report_id) == 1


def test_get_endpoints(server):
    assert requests.get(server.url + "/", timeout=5).headers["Content-Type"].startswith(
        "text/html")
    assert requests.get(server.url + "/version", timeout=5).json()["version"] == "0.1.0"
    health = requests.get(server.url + "/healthz", timeout=5).json()
    assert health["ok"] is True and health["store"]["backend"] == "sqlite"
    assert {g["database_type"] for g in health["geo"]} >= {"GeoLite2-Country", "GeoLite2-ASN"}
    assert all(g["build_date"] for g in health["geo"])
    schema = requests.get(server.url + "/report.schema.json", timeout=5).json()
    assert schema["required"] == ["report-type", "time", "endpoint"]


@pytest.mark.parametrize("victim", ["worker", "master"])
def test_report_survives_kill_9(tmp_path, victim):
    db = tmp_path / "r.db"
    srv = TTServer(tmp_path / "srv", ["--workers", "2", "--database-url", f"sqlite:///{db}"])
    srv.start()
    try:
        acknowledged = []
        for _ in range(20):
            resp = post(srv, make_report())
            assert resp.status_code == 201
            acknowledged.append(resp.json()["uuid"])
        if victim == "worker":
            for pid in srv.worker_pids():
                os.kill(pid, signal.SIGKILL)
        else:
            srv.kill()
    finally:
        srv.stop()
    rows = db_rows(db)
    assert set(acknowledged) <= set(rows)
    assert len(rows) == 20


def test_sigterm_shuts_down_cleanly(tmp_path):
    srv = TTServer(tmp_path, ["--workers", "2", "--database-url", f"sqlite:///{tmp_path}/r.db"])
    srv.start()
    assert srv.stop(signal.SIGTERM) == 0


def test_bad_option_exits_2_before_serving(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tunnel_telemetry.cli",
                          "--listen", f"127.0.0.1:{TTServer(tmp_path).port}", "--geoip-asn-db",
                          str(tmp_path / "missing.mmdb"), "--database-url",
                          f"sqlite:///{tmp_path}/r.db"],
                         capture_output=True, text=True, timeout=30, env={**os.environ,
                                                                           "TT_CONFIG": ""})
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "geoip-asn-db" in out.stderr


def test_procfile_runs_with_port(tmp_path):
    """`web: gunicorn app:app` from the Procfile, configured by the environment like Heroku."""
    command = (REPO / "Procfile").read_text().split("web:", 1)[1].strip()
    port = TTServer(tmp_path).port
    bindir = str(Path(sys.executable).parent)
    env = {"PORT": str(port), "DATABASE_URL": f"sqlite:///{tmp_path}/r.db", "WORKERS": "2",
           "COLLECTOR_ID": "dyno", "PATH": bindir + os.pathsep + os.environ["PATH"]}
    srv = TTServer(tmp_path / "procfile", command=["sh", "-c", f"exec {command}"], env=env,
                   port=port, cwd=REPO)
    srv.start()
    try:
        body = post(srv, make_report()).json()
        assert body["collector_id"] == "dyno"
    finally:
        srv.stop(signal.SIGINT)
    assert "POST /report" in srv.logs() and "127.0.0.1" not in srv.logs()
    assert body["uuid"] in db_rows(tmp_path / "r.db")


def test_privacy_nothing_leaks(tmp_path, tt_server, geo_dbs):
    """Known client and endpoint addresses go in; none come out in the DB or any log line."""
    country, asn = geo_dbs
    db = tmp_path / "r.db"
    srv = tt_server("--workers", "2", "--database-url", f"sqlite:///{db}", "--proxy-hops", "1",
                    "--geoip-country-db", str(country), "--geoip-asn-db", str(asn), "--debug")
    clients = ["2.3.4.5", "2a01:4f8:1::77", "6.6.6.6"]
    endpoints = {"ss://1.1.1.1:443": "1.1.1.1", "obfs4://[2a01:4f8:1::99]:9001": "2a01:4f8:1::99",
                 "vless://secret-proxy.example.org:443": "secret-proxy.example.org"}
    secrets = ["hunter2-password"]
    for i, (endpoint, addr) in enumerate(endpoints.items()):
        client_ip = clients[i % len(clients)]
        report = make_report(
            endpoint=endpoint,
            config={"prefix": "xx", "password": secrets[0], "via": client_ip, "server": addr},
            failure={"op": "tcp.connect",
                     "msg": f"dial {addr} from {client_ip}: connection refused"})
        resp = post(srv, report, {"X-Forwarded-For": f"6.6.6.6, {client_ip}"})
        assert resp.status_code == 201, resp.text
        body = resp.json()
        if addr != "secret-proxy.example.org":
            assert body["endpoint_asn"] != "AS0"  # the address was used before it was dropped
        assert body["client_asn"] != "AS0"
    # Rejected and malformed requests are logged too: they must not leak either.
    post(srv, make_report(endpoint="ss://1.1.1.1:0"), {"X-Forwarded-For": clients[0]})
    with requests.Session() as session:
        session.post(srv.url + "/report", data=b"{bad", timeout=5,
                     headers={"Content-Type": "application/json",
                              "X-Forwarded-For": clients[1]})
    srv.stop(signal.SIGINT)
    haystack = srv.logs().encode()
    for path in tmp_path.glob("r.db*"):
        haystack += path.read_bytes()
    assert b"POST /report" in haystack  # the access log was really written
    for needle in [*clients, *endpoints.values(), *secrets]:
        assert needle.encode() not in haystack, needle
