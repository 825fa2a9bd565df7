"""End to end: tt-server --autotls against a real pebble ACME server, and plain certfile/keyfile.

Pebble's VA resolves the host name through its mock DNS (127.0.0.1) and validates HTTP-01
against the running tt-server's challenge listener; clients then speak HTTPS trusting only
pebble's root.
"""

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from tunnel_telemetry.files import write_private
from tunnel_telemetry.testing.pebble import Pebble, pebble_missing, write_listener_cert
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import TTServer, free_port, wait_for
from tunnel_telemetry.tls.autotls import CertCache

pytestmark = pytest.mark.e2e
needs_pebble = pytest.mark.skipif(
    pebble_missing() is not None and not os.environ.get("TT_REQUIRE_PEBBLE"),
    reason=f"ACME tests need Debian's pebble: {pebble_missing()}",
)
REPO = Path(__file__).resolve().parent.parent
HOST = "localhost"  # pebble's mock DNS and the local resolver both say 127.0.0.1


def https_post(port, cafile, report=None):
    """POST /report on a fresh TLS connection that trusts only `cafile`; (status, serial)."""
    context = ssl.create_default_context(cafile=str(cafile))
    conn = http.client.HTTPSConnection(HOST, port, context=context, timeout=10)
    try:
        conn.connect()
        serial = x509.load_der_x509_certificate(conn.sock.getpeercert(True)).serial_number
        conn.request("POST", "/report", body=json.dumps(report or make_report()),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, serial
    finally:
        conn.close()


def served_serial(port, cafile):
    return https_post(port, cafile)[1]


def autotls_args(pebble, cache, db, *extra):
    return ["--autotls", "--hostname", HOST, "--autotls-cache-dir", str(cache),
            "--acme-directory", pebble.directory, "--acme-ca-bundle", str(pebble.ca_bundle),
            "--acme-http-port", str(pebble.http_port), "--database-url", f"sqlite:///{db}",
            "--workers", "2", *extra]


def https_server(tmp_path, name, args, cafile, port=None):
    return TTServer(tmp_path / name, args, scheme="https", host=HOST, verify=str(cafile),
                    port=port)


def booted(srv):
    """How many workers gunicorn has started (a restart or reload would start more)."""
    return srv.logs().count("Booting worker")


def cached(cache):
    return CertCache(cache, HOST).load()


@needs_pebble
def test_autotls_issue_serve_restart_reuse_and_forced_renewal(tmp_path):
    cache, db = tmp_path / "cache", tmp_path / "r.db"
    with Pebble(tmp_path / "pebble") as pebble:
        args = autotls_args(pebble, cache, db)
        port = free_port()

        # 1. First start: no certificate; pebble validates HTTP-01 against tt-server itself.
        srv = https_server(tmp_path, "first", args, pebble.root_file, port).start()
        try:
            status, serial = https_post(port, pebble.root_file)
            assert status == 201
        finally:
            srv.stop()
        assert f"validate w/ HTTP: http://{HOST}:{pebble.http_port}/" in pebble.log()
        assert pebble.count("POST /order-plz") == 1
        assert serial == cached(cache).serial
        assert "requesting a certificate for localhost" in srv.logs()
        # The peer (pebble's VA, 127.0.0.1) is never named; the server's own listen address is.
        assert [line for line in srv.logs().splitlines() if "127.0.0.1" in line
                and f"Listening at: https://127.0.0.1:{port} (" not in line] == []
        assert "renewal failed" not in srv.logs()  # a check cut off by the stop is no failure
        assert oct(os.stat(cache).st_mode & 0o777) == "0o700"
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in cache.iterdir()} == {
            "account-key.pem": "0o600", "localhost.pem": "0o600", "localhost.json": "0o600",
            ".lock": "0o600"}

        # 2. Restart with the CA frozen: served from the cache, no ACME request at all.
        log_before = pebble.log()
        pebble.pause()
        try:
            srv = https_server(tmp_path, "restart", args, pebble.root_file, port).start()
            assert https_post(port, pebble.root_file) == (201, serial)
        finally:
            pebble.resume()
        assert pebble.log() == log_before
        assert f"using cached certificate: localhost serial {serial:x}" in srv.logs()

        # 3. `tt-server renew` while serving: not due; --force gets a new certificate that
        # the running workers serve on their next connection, without a restart.
        try:
            assert wait_for(lambda: booted(srv) == 2)
            cli = [sys.executable, "-m", "tunnel_telemetry.cli", *args, "renew"]
            out = subprocess.run(cli, capture_output=True, text=True, timeout=60, env=srv.env)
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith(f"not due: localhost serial {serial:x}")
            out = subprocess.run([*cli, "--force"], capture_output=True, text=True, timeout=60,
                                 env=srv.env)
            assert out.returncode == 0, out.stderr
            new = cached(cache).serial
            assert new != serial and out.stdout.startswith(f"renewed: localhost serial {new:x}")
            assert https_post(port, pebble.root_file) == (201, new)
            assert booted(srv) == 2  # the running workers serve it: none was restarted
        finally:
            srv.stop(signal.SIGINT)
        assert pebble.count("POST /order-plz") == 2


@needs_pebble
def test_autotls_background_renewal_drops_no_request_then_backs_off(tmp_path):
    cache, db = tmp_path / "cache", tmp_path / "r.db"
    # Certificates live 2 days + 3 s: with renew-before-days 2 one becomes due 3 s after
    # it is issued, so the running server renews in the background within the test.
    with Pebble(tmp_path / "pebble", validity=2 * 86400 + 3) as pebble:
        port = free_port()
        srv = https_server(tmp_path, "first", autotls_args(pebble, cache, db,
                                                           "--renew-before-days", "1"),
                           pebble.root_file, port).start()
        srv.stop(signal.SIGINT)  # only the cached certificate matters here
        first = cached(cache)
        assert wait_for(lambda: first.remaining() < timedelta(days=2), timeout=15)

        args = autotls_args(pebble, cache, db, "--renew-before-days", "2",
                            "--autotls-check-interval", "2s")
        results, errors, stop = [], [], threading.Event()

        def hammer():
            while not stop.is_set():
                try:
                    results.append(https_post(port, pebble.root_file))
                except Exception as exc:  # noqa: BLE001 - recorded and asserted on
                    errors.append(repr(exc))

        # The CA is frozen while tt-server starts: start-up must not wait for the renewal
        # that is due, and clients get the old certificate until the new one is there.
        pebble.pause()
        srv = https_server(tmp_path, "renewing", args, pebble.root_file, port)
        thread = threading.Thread(target=hammer)
        try:
            srv.start()
            assert wait_for(lambda: booted(srv) == 2)
            thread.start()
            assert wait_for(lambda: len(results) >= 10), (errors[-3:], srv.logs()[-3000:])
            pebble.resume()
            assert wait_for(lambda: any(s != first.serial for _, s in results)), (
                len(results), errors[-3:], srv.logs()[-3000:], pebble.log()[-3000:])
            seen = len(results)
            wait_for(lambda: len(results) > seen + 20, timeout=5)
            stop.set()
            thread.join()
            renewed = cached(cache)
            assert errors == []
            assert {status for status, _ in results} == {201}
            serials = [s for _, s in results]
            assert serials[0] == first.serial and serials[-1] == renewed.serial
            switch = serials.index(renewed.serial)
            assert set(serials[:switch]) == {first.serial}
            assert set(serials[switch:]) == {renewed.serial}  # no going back to the old one
            logs = srv.logs()
            assert "using cached certificate" in logs
            assert logs.index("Listening at") < logs.index("(due)") < logs.index(
                "new certificate")
            # Picked up by the running workers: no worker was started besides the first two.
            assert booted(srv) == 2

            # The CA goes away: renewal fails, is retried with back-off, HTTPS keeps working.
            pebble.stop()
            assert wait_for(lambda: srv.logs().count("renewal failed") >= 2, timeout=30), (
                srv.logs()[-3000:])
            current = cached(cache)
            assert https_post(port, pebble.root_file) == (201, current.serial)
        finally:
            stop.set()
            if thread.is_alive():
                thread.join()
            pebble.resume()
            srv.stop(signal.SIGINT)
        failures = [line for line in srv.logs().splitlines() if "renewal failed" in line]
        assert "[acme_unreachable] (attempt 1)" in failures[0] and "retrying in 1s" in failures[0]
        assert "(attempt 2)" in failures[1] and "retrying in 2s" in failures[1]
        assert f"still serving localhost serial {current.serial:x}" in failures[0]


@needs_pebble
def test_procfile_gunicorn_with_autotls(tmp_path):
    """`gunicorn app:app` (gunicorn.conf.py) gets the certificate in on_starting too."""
    with Pebble(tmp_path / "pebble") as pebble:
        port = free_port()
        bindir = str(Path(sys.executable).parent)
        env = {"LISTEN": f"127.0.0.1:{port}", "AUTOTLS": "true", "HOSTNAME": HOST,
               "AUTOTLS_CACHE_DIR": str(tmp_path / "cache"), "ACME_DIRECTORY": pebble.directory,
               "ACME_CA_BUNDLE": str(pebble.ca_bundle), "ACME_HTTP_PORT": str(pebble.http_port),
               "DATABASE_URL": f"sqlite:///{tmp_path}/r.db", "WORKERS": "2",
               "PATH": bindir + os.pathsep + os.environ["PATH"]}
        command = (REPO / "Procfile").read_text().split("web:", 1)[1].strip()
        srv = TTServer(tmp_path / "procfile", command=["sh", "-c", f"exec {command}"], env=env,
                       port=port, cwd=REPO, scheme="https", host=HOST,
                       verify=str(pebble.root_file))
        srv.start(timeout=30)
        try:
            assert https_post(port, pebble.root_file) == (201, cached(tmp_path / "cache").serial)
        finally:
            srv.stop(signal.SIGINT)


def test_autotls_startup_fails_with_one_line_when_no_certificate(tmp_path):
    closed = free_port()
    cmd = [sys.executable, "-m", "tunnel_telemetry.cli", "--autotls", "--hostname", HOST,
           "--listen", f"127.0.0.1:{free_port()}", "--autotls-cache-dir", str(tmp_path / "c"),
           "--acme-directory", f"https://127.0.0.1:{closed}/dir",
           "--acme-http-port", str(free_port()), "--database-url", f"sqlite:///{tmp_path}/r.db"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TT_CONFIG": ""})
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("tt-server: error: autotls: https://")
    assert "unreachable" in last and "Connection refused" in last
    assert "Starting gunicorn" not in out.stderr


def test_certfile_keyfile_https_and_rotation_without_restart(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, cert, key = write_listener_cert(certs)
    other = tmp_path / "next"
    other.mkdir()
    ca2, cert2, key2 = write_listener_cert(other)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.read_bytes() + ca2.read_bytes())
    port = free_port()
    srv = https_server(tmp_path, "byo", ["--certfile", str(cert), "--keyfile", str(key),
                                         "--database-url", f"sqlite:///{tmp_path}/r.db",
                                         "--workers", "2"], bundle, port).start()
    try:
        first = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
        assert https_post(port, bundle) == (201, first)
        assert wait_for(lambda: booted(srv) == 2)
        # An operator's tool (certbot, ...) replaces the files: key first, then certificate.
        write_private(key, key2.read_bytes())
        assert https_post(port, bundle) == (201, first)  # mismatched pair: old one served
        write_private(cert, cert2.read_bytes())
        second = x509.load_pem_x509_certificate(cert2.read_bytes()).serial_number
        assert https_post(port, bundle) == (201, second)
        assert booted(srv) == 2
        os.kill(srv.proc.pid, signal.SIGHUP)  # a graceful reload serves the files as well
        assert wait_for(lambda: booted(srv) == 4)
        assert https_post(port, bundle) == (201, second)
    finally:
        srv.stop(signal.SIGINT)
