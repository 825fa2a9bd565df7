"""Probing for real on loopback: success, refused, timeout, TLS failures and success, DNS."""

import errno
import socket
import ssl
import threading

import pytest

from tunnel_telemetry.client import InvalidReport, validate_report
from tunnel_telemetry.client.probe import posix_error_name, probe, uses_tls
from tunnel_telemetry.testing.listeners import (
    Listener,
    full_backlog,
    make_certificate,
    server_context,
)


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("cert"), ("localhost", "tt.test"))


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(report, endpoint):
    validate_report(report)
    assert report["endpoint"] == endpoint
    assert isinstance(report["duration_ms"], int) and report["duration_ms"] >= 0
    return report["failure"]


def test_listening_port_is_success():
    with Listener("hold") as lst:
        endpoint = f"ss://127.0.0.1:{lst.port}"
        report = probe(endpoint, timeout=2)
    assert check(report, endpoint) is None


def test_host_name_is_resolved_locally():
    with Listener("hold") as lst:
        endpoint = f"ss://localhost:{lst.port}"  # /etc/hosts; ::1 may be tried and refused first
        report = probe(endpoint, timeout=2)
    assert check(report, endpoint) is None


def test_closed_port_is_econnrefused():
    endpoint = f"ss://127.0.0.1:{closed_port()}"
    fail = check(probe(endpoint, timeout=2), endpoint)
    assert fail == {"op": "tcp.connect", "posix_error": "ECONNREFUSED", "msg": "Connection refused"}


def test_no_answer_is_etimedout():
    with full_backlog() as port:
        endpoint = f"ss://127.0.0.1:{port}"
        report = probe(endpoint, timeout=0.3)
    fail = check(report, endpoint)
    assert fail["op"] == "tcp.connect" and fail["posix_error"] == "ETIMEDOUT"
    assert report["duration_ms"] >= 250


def test_tls_against_plain_tcp_service():
    with Listener("garbage") as lst:
        endpoint = f"tls://127.0.0.1:{lst.port}"
        fail = check(probe(endpoint, timeout=2), endpoint)
    assert fail["op"] == "tls.handshake"
    assert "posix_error" not in fail  # an OpenSSL error, not a POSIX one
    assert "wrong version number" in fail["msg"].lower() or "record" in fail["msg"].lower()


def test_tls_reset_is_econnreset():
    with Listener("reset") as lst:
        endpoint = f"https://127.0.0.1:{lst.port}"
        fail = check(probe(endpoint, timeout=2), endpoint)
    assert fail["op"] == "tls.handshake" and fail["posix_error"] == "ECONNRESET"


def test_tls_no_answer_is_etimedout():
    with Listener("hold") as lst:
        endpoint = f"wss://127.0.0.1:{lst.port}"
        fail = check(probe(endpoint, timeout=0.3), endpoint)
    assert fail["op"] == "tls.handshake" and fail["posix_error"] == "ETIMEDOUT"


def test_tls_success_with_sni_and_verification(cert):
    certfile, keyfile = cert
    with Listener("tls", server_context(certfile, keyfile)) as lst:
        endpoint = f"vless+tls://localhost:{lst.port}"
        report = probe(endpoint, timeout=2, cafile=str(certfile))
        assert check(report, endpoint) is None
        report = probe(f"tls://127.0.0.1:{lst.port}", timeout=2, cafile=str(certfile),
                       server_name="tt.test")
        assert report["failure"] is None
        report = probe(f"tls://127.0.0.1:{lst.port}", timeout=2, cafile=str(certfile))
        assert report["failure"] is None  # IP address in the certificate, no SNI sent
    assert lst.server_names == ["localhost", "tt.test", None]


def test_tls_untrusted_certificate_fails_unless_insecure(cert):
    certfile, keyfile = cert
    with Listener("tls", server_context(certfile, keyfile)) as lst:
        endpoint = f"trojan://localhost:{lst.port}"
        fail = check(probe(endpoint, timeout=2), endpoint)
        assert fail["op"] == "tls.handshake"
        assert "certificate verify failed" in fail["msg"]
        assert probe(endpoint, timeout=2, verify=False)["failure"] is None


def test_wrong_name_fails_verification(cert):
    certfile, keyfile = cert
    with Listener("tls", server_context(certfile, keyfile)) as lst:
        endpoint = f"https://127.0.0.1:{lst.port}"
        report = probe(endpoint, timeout=2, cafile=str(certfile), server_name="other.test")
    assert report["failure"]["op"] == "tls.handshake"
    assert "other.test" in report["failure"]["msg"] or "mismatch" in report["failure"]["msg"]


def test_tls_can_be_forced_or_skipped():
    with Listener("garbage") as lst:
        assert probe(f"https://127.0.0.1:{lst.port}", tls=False, timeout=2)["failure"] is None
        forced = probe(f"ss://127.0.0.1:{lst.port}", tls=True, timeout=2)["failure"]
    assert forced["op"] == "tls.handshake"


def test_dns_failure_is_reported():
    def resolver(host, port, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    endpoint = "ss://proxy.example.org:443"
    fail = check(probe(endpoint, timeout=1, resolver=resolver), endpoint)
    assert fail == {
        "op": "dns.resolve",
        "posix_error": "EAI_NONAME",
        "msg": "Name or service not known",
    }


def test_dns_timeout_is_reported():
    release = threading.Event()

    def resolver(host, port, **kw):
        release.wait(5)
        raise socket.gaierror(socket.EAI_AGAIN, "late")

    try:
        fail = probe("ss://slow.example.org:443", timeout=0.2, resolver=resolver)["failure"]
    finally:
        release.set()
    assert fail["op"] == "dns.resolve" and fail["posix_error"] == "ETIMEDOUT"


def test_report_fields_are_passed_through():
    with Listener("hold") as lst:
        report = probe(
            f"ss://127.0.0.1:{lst.port}",
            config={"prefix": "xx"},
            client_asn="AS64500",
            client_cc="NO",
        )
    assert report["config"] == {"prefix": "xx"}
    assert (report["client_asn"], report["client_cc"]) == ("AS64500", "NO")


@pytest.mark.parametrize("bad", ["ss://user:pw@1.2.3.4:443", "1.2.3.4:443", "ss://1.2.3.4:0"])
def test_bad_endpoint(bad):
    with pytest.raises(InvalidReport):
        probe(bad)


@pytest.mark.parametrize(
    "proto,tls",
    [
        ("https", True), ("tls", True), ("wss", True), ("trojan", True), ("dot", True),
        ("vless+tls", True), ("vmess+wss", True), ("ss", False), ("obfs4", False),
        ("vless", False), ("http", False), ("wireguard", False),
    ],
)
def test_uses_tls(proto, tls):
    assert uses_tls(proto) is tls


@pytest.mark.parametrize(
    "exc,name",
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "ECONNREFUSED"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "ECONNRESET"),
        (OSError(errno.EHOSTUNREACH, "no route"), "EHOSTUNREACH"),
        (OSError(errno.ENETUNREACH, "unreachable"), "ENETUNREACH"),
        (TimeoutError(), "ETIMEDOUT"),
        (socket.gaierror(socket.EAI_AGAIN, "again"), "EAI_AGAIN"),
        (ssl.SSLError(1, "bad"), None),
        (ValueError("x"), None),
    ],
)
def test_posix_error_name(exc, name):
    assert posix_error_name(exc) == name
