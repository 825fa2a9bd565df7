"""The relay's HTTP transport (urllib3): failure classes, TLS verification, proxies, redirects."""

import datetime
import ipaddress
import socket
import ssl
import uuid as uuidlib

import pytest
import urllib3.exceptions as ue
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tunnel_telemetry.relay import http as delivery
from tunnel_telemetry.relay import ooni
from tunnel_telemetry.relay.http import (
    BodyError,
    DeadlineReached,
    RelayHTTP,
    classify_exception,
)
from tunnel_telemetry.testing.fake_ooni import FakeOONI
from tunnel_telemetry.testing.scripted import Reply, ScriptedCollector, closed_port_url

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
              "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
              "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


def stored(**over):
    r = {"report-type": "tunnel-telemetry", "uuid": str(uuidlib.uuid4()),
         "time": "2024-04-18T09:59:58Z", "t_received": "2024-04-18T10:00:01Z", "proto": "ss",
         "endpoint_port": 443, "endpoint_asn": "AS13335", "endpoint_cc": "AU",
         "client_asn": "AS30722", "client_cc": "IT", "config": {}, "duration_ms": 250,
         "failure": None, "sampling_rate": 1}
    r.update(over)
    return r


# -- exception mapping -------------------------------------------------------------------------

@pytest.mark.parametrize("exc, reason", [
    (ue.NewConnectionError(None, "refused"), "connection-error"),  # a ConnectTimeoutError too
    (ue.NameResolutionError("ooni.invalid", None, socket.gaierror()), "connection-error"),
    (ue.ConnectTimeoutError(), "timeout"),
    (ue.ReadTimeoutError(None, "/report", "read timed out"), "timeout"),
    (DeadlineReached("relay deadline reached"), "timeout"),
    (TimeoutError(), "timeout"),
    (ue.SSLError("certificate verify failed"), "connection-error"),
    (ue.ProtocolError("Connection aborted.", ConnectionResetError()), "connection-error"),
    (ue.ProxyError("proxy down", OSError()), "connection-error"),
    (ConnectionRefusedError(), "connection-error"),
    (ue.MaxRetryError(None, "/report", ue.ConnectTimeoutError()), "timeout"),
    (ue.MaxRetryError(None, "/report", ue.NewConnectionError(None, "x")), "connection-error"),
    (ue.LocationValueError("bad url"), "request-error"),
    (BodyError("ValueError"), "request-error"),
    (ue.DecodeError(), "request-error"),
])
def test_exceptions_map_to_retryable_outcomes(exc, reason):
    assert isinstance(exc, delivery.HTTP_ERRORS)
    out = classify_exception(exc)
    assert (out.state, out.reason, out.retryable) == ("pending", reason, True)


def test_deadline_spent_raises_a_timeout():
    with pytest.raises(DeadlineReached):
        delivery.Deadline(0.0, 30.0).timeout()


def test_unencodable_body_is_a_request_error():
    with pytest.raises(BodyError):
        delivery.json_body({"x": float("nan")})


# -- answers -----------------------------------------------------------------------------------

def test_redirects_are_not_followed(monkeypatch):
    with ScriptedCollector(Reply(307, {"detail": "moved"},
                                 headers={"Location": "http://127.0.0.1:9/report"})) as srv:
        c = ooni.OONIClient(srv.url, timeout=5)
        try:
            out = c.send(stored())
        finally:
            c.close()
        assert (out.state, out.reason) == ("pending", "http-307")
        assert [r.path for r in srv.requests] == ["/report"]


@pytest.mark.parametrize("op", ["open", "submit"])
def test_answer_that_is_not_json_is_retried(op):
    replies = [Reply(200, b"<html>captive portal</html>")]
    if op == "submit":
        replies.insert(0, Reply(200, {"report_id": "20240418T100000Z_x_IT_30722_n1_abc"}))
    with ScriptedCollector(*replies) as srv:
        c = ooni.OONIClient(srv.url, timeout=5)
        try:
            out = c.send(stored())
        finally:
            c.close()
    assert (out.state, out.reason) == ("pending", "bad-answer")


def test_retry_after_and_detail_are_read_from_the_answer():
    with ScriptedCollector(Reply(429, {"detail": "slow down"}, headers={"Retry-After": "9"}),
                           Reply(422, {"detail": "bad probe_cc"})) as srv:
        c = ooni.OONIClient(srv.url, timeout=5)
        try:
            first, second = c.send(stored()), c.send(stored())
        finally:
            c.close()
    assert (first.state, first.reason, first.retry_after) == ("pending", "rate-limited", 9.0)
    assert first.detail == "open: slow down"
    assert (second.state, second.reason, second.detail) == ("failed", "http-422",
                                                            "open: bad probe_cc")


def test_requests_carry_json_user_agent_and_keep_the_connection():
    with FakeOONI() as fake:
        c = ooni.OONIClient(fake.url, timeout=5)
        try:
            for _ in range(3):
                assert c.send(stored()).state == "delivered"
        finally:
            c.close()
        assert fake.stats()["connections"] == 1
        first = fake.requests[0]
        assert first.headers["Content-Type"] == "application/json"
        assert first.headers["User-Agent"].startswith("tunnel-telemetry/")


def test_no_retries_inside_one_attempt():
    with ScriptedCollector(Reply(action="close"), Reply(200, {"report_id": "r1"})) as srv:
        c = ooni.OONIClient(srv.url, timeout=5)
        try:
            out = c.send(stored())
        finally:
            c.close()
        assert (out.state, out.reason) == ("pending", "connection-error")
        assert len(srv.requests) == 1  # urllib3 did not try again by itself


# -- TLS -----------------------------------------------------------------------------------------

def self_signed(tmp_path):
    """A certificate for 127.0.0.1 (key file, cert file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


@pytest.fixture
def tls_fake(tmp_path):
    key_file, cert_file = self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    with FakeOONI() as fake:
        server = fake._server
        server.socket = ctx.wrap_socket(server.socket, server_side=True)  # same descriptor
        yield fake, f"https://127.0.0.1:{fake.port}", cert_file


def test_https_certificate_is_verified(tls_fake):
    fake, url, _ = tls_fake
    c = ooni.OONIClient(url, timeout=5)
    try:
        out = c.send(stored())
    finally:
        c.close()
    assert (out.state, out.reason) == ("pending", "connection-error")
    assert fake.stats()["requests"] == 0  # nothing was sent over the unverified connection


def test_https_with_a_trusted_bundle_delivers(tls_fake, monkeypatch):
    fake, url, cert_file = tls_fake
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_file))  # as requests honoured it
    c = ooni.OONIClient(url, timeout=5)
    try:
        out = c.send(stored())
    finally:
        c.close()
    assert out.state == "delivered", out
    assert fake.stats()["submissions"] == 1


# -- proxies from the environment ----------------------------------------------------------------

def test_environment_proxy_is_used(monkeypatch):
    def answer(rec):
        if rec.path.endswith("/report"):
            return Reply(200, {"report_id": "20240418T100000Z_x_IT_30722_n1_abc"})
        return Reply(200, {"measurement_uid": "20240418100001.123456_IT_tunneltelemetry_ab"})

    with ScriptedCollector(default=answer) as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        c = ooni.OONIClient("http://ooni.invalid", timeout=5)
        try:
            out = c.send(stored())
        finally:
            c.close()
    assert out.state == "delivered", out
    assert [r.path for r in proxy.requests] == [
        "http://ooni.invalid/report",
        "http://ooni.invalid/report/20240418T100000Z_x_IT_30722_n1_abc",
        "http://ooni.invalid/report/20240418T100000Z_x_IT_30722_n1_abc/close"]


def test_no_proxy_is_respected(monkeypatch):
    with ScriptedCollector() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        url = closed_port_url()
        http = RelayHTTP(url, 2)
        try:
            with pytest.raises(delivery.HTTP_ERRORS) as info:
                http.post("/report", b"{}", (2.0, 2.0))
        finally:
            http.close()
        assert classify_exception(info.value).reason == "connection-error"
        assert proxy.requests == []


def test_base_url_path_is_kept():
    with ScriptedCollector(Reply(200, {"report_id": "20240418T100000Z_x_IT_30722_n1_abc"}),
                           Reply(200, {"measurement_uid": "20240418100001.1_IT_x"})) as srv:
        c = ooni.OONIClient(srv.url + "/api/", timeout=5)
        try:
            assert c.send(stored()).state == "delivered"
        finally:
            c.close()
        assert [r.path for r in srv.requests][:2] == [
            "/api/report", "/api/report/20240418T100000Z_x_IT_30722_n1_abc"]


def test_closed_transport_is_a_retryable_error():
    http = RelayHTTP(closed_port_url(), 1)
    http.close()
    with pytest.raises(delivery.HTTP_ERRORS) as info:
        http.post("/report", b"{}", (1.0, 1.0))
    assert classify_exception(info.value).retryable
