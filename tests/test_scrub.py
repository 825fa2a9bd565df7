import pytest

from tunnel_telemetry.scrub import PLACEHOLDER, contains_ip, scrub, scrub_text, secret_key


@pytest.mark.parametrize("key, dropped", [
    ("prefix", False), ("cipher", False), ("method", False), ("sni", False), ("alpn", False),
    ("password", True), ("Password", True), ("serverPassword", True), ("server_key", True),
    ("uuid", True), ("vlessUUID", True), ("publicKey", True), ("shortId", True),
    ("auth-token", True), ("psk", True), ("secret", True), ("user", True), ("host", True),
])
def test_secret_keys(key, dropped):
    assert secret_key(key) is dropped


@pytest.mark.parametrize("text, expected", [
    ("dial tcp 1.2.3.4:443: refused", f"dial tcp {PLACEHOLDER}:443: refused"),
    ("dial tcp [2001:db8::1]:443", f"dial tcp [{PLACEHOLDER}]:443"),
    ("from ::ffff:9.9.9.9 ok", f"from {PLACEHOLDER} ok"),
    ("via fe80::1%eth0 x", f"via {PLACEHOLDER} x"),
    ("from 2a01:4f8:1::77: refused", f"from {PLACEHOLDER}: refused"),
    ("from ::1: refused", f"from {PLACEHOLDER}: refused"),
    ("at 12:34:56 version 1.2.3", "at 12:34:56 version 1.2.3"),
    ("no address here", "no address here"),
])
def test_scrub_text(text, expected):
    assert scrub_text(text) == expected


def test_contains_ip():
    assert contains_ip("10.0.0.1")
    assert not contains_ip("xx")


def _enriched(**overrides):
    report = {
        "report-type": "tunnel-telemetry", "uuid": "u", "time": "t", "t_received": "t",
        "endpoint": "vless://proxy.example.org:443", "endpoint_addr": "proxy.example.org",
        "proto": "vless", "endpoint_port": 443, "endpoint_asn": "AS0", "endpoint_cc": "ZZ",
        "client_asn": "AS0", "client_cc": "ZZ",
        "config": {"prefix": "xx", "password": "hunter2", "peer": "x", "via": "8.8.8.8",
                   "sni": "proxy.example.org", "front": "cdn.example.net"},
        "duration_ms": 1,
        "failure": {"op": "tcp.connect", "msg": "dial proxy.example.org (5.6.7.8): refused"},
        "sampling_rate": 1,
    }
    report.update(overrides)
    return report


def test_scrub_hides_endpoint_by_default():
    out = scrub(_enriched(), allow_public_endpoint=False)
    assert "endpoint" not in out and "endpoint_addr" not in out
    assert out["config"] == {"prefix": "xx", "front": "cdn.example.net"}
    assert out["failure"]["msg"] == f"dial {PLACEHOLDER} ({PLACEHOLDER}): refused"
    assert "proxy.example.org" not in repr(out)


def test_scrub_keeps_endpoint_when_allowed():
    out = scrub(_enriched(), allow_public_endpoint=True)
    assert out["endpoint"] == "vless://proxy.example.org:443"
    assert out["endpoint_addr"] == "proxy.example.org"
    assert out["config"] == {"prefix": "xx", "sni": "proxy.example.org",
                             "front": "cdn.example.net"}
    assert out["failure"]["msg"] == f"dial proxy.example.org ({PLACEHOLDER}): refused"


def test_scrub_does_not_mutate_input():
    report = _enriched()
    scrub(report, allow_public_endpoint=False)
    assert report["endpoint_addr"] == "proxy.example.org"
