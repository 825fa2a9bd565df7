import pytest

from tunnel_telemetry.web.proxy import ENVIRON_KEY, ProxyHeaders, parse_address


def resolve(hops, header, headers, peer="10.0.0.9"):
    seen = {}

    def app(environ, start_response):
        seen["ip"] = environ[ENVIRON_KEY]
        return []

    environ = {"REMOTE_ADDR": peer}
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    ProxyHeaders(app, hops, header)(environ, lambda *a: None)
    return None if seen["ip"] is None else str(seen["ip"])


@pytest.mark.parametrize("hops, header, headers, expected", [
    # Default: the socket peer; any forwarding header ignored.
    (0, "X-Forwarded-For", {"X-Forwarded-For": "2.3.4.5"}, "10.0.0.9"),
    (0, "X-Real-IP", {"X-Real-IP": "2.3.4.5"}, "10.0.0.9"),
    # One trusted hop appends the connecting address: the client's own entries are ignored.
    (1, "X-Forwarded-For", {"X-Forwarded-For": "6.6.6.6, 2.3.4.5"}, "2.3.4.5"),
    (1, "X-Forwarded-For", {"X-Forwarded-For": "2.3.4.5"}, "2.3.4.5"),
    (2, "X-Forwarded-For", {"X-Forwarded-For": "6.6.6.6, 2.3.4.5, 10.1.1.1"}, "2.3.4.5"),
    (2, "X-Forwarded-For", {"X-Forwarded-For": "2.3.4.5"}, None),
    (1, "X-Forwarded-For", {}, None),
    (1, "X-Forwarded-For", {"X-Forwarded-For": "garbage"}, None),
    (1, "X-Forwarded-For", {"X-Forwarded-For": "6.6.6.6,[2001:db8::5]:1234"}, "2001:db8::5"),
    (1, "X-Forwarded-For", {"X-Forwarded-For": "::ffff:2.3.4.5"}, "2.3.4.5"),
    (1, "X-Real-IP", {"X-Real-IP": "2.3.4.5"}, "2.3.4.5"),
    (1, "CF-Connecting-IP", {"CF-Connecting-IP": "2001:db8::7"}, "2001:db8::7"),
    (1, "CF-Connecting-IP", {"X-Forwarded-For": "2.3.4.5"}, None),
    (1, "Forwarded", {"Forwarded": 'for=6.6.6.6, for="[2001:db8::1]:4711";proto=https'},
     "2001:db8::1"),
    (1, "Forwarded", {"Forwarded": "for=6.6.6.6;by=x, for=2.3.4.5"}, "2.3.4.5"),
    (2, "Forwarded", {"Forwarded": "for=2.3.4.5, for=_hidden"}, "2.3.4.5"),
    (1, "Forwarded", {"Forwarded": "for=unknown"}, None),
])
def test_client_ip(hops, header, headers, expected):
    assert resolve(hops, header, headers) == expected


@pytest.mark.parametrize("value, expected", [
    ("1.2.3.4", "1.2.3.4"), ("1.2.3.4:80", "1.2.3.4"), ("[::1]:80", "::1"),
    ('"[2001:db8::1]"', "2001:db8::1"), ("2001:db8::1", "2001:db8::1"), ("x", None), ("", None),
])
def test_parse_address(value, expected):
    assert parse_address(value) == expected


def test_an_ignored_proxy_header_is_pointed_out_once(caplog):
    """Behind a proxy with proxy-hops 0 every client is the proxy: one rate limit for all and
    the proxy's location. The operator is told once (without any address)."""
    middleware = ProxyHeaders(lambda environ, start_response: [], 0, "X-Forwarded-For")
    with caplog.at_level("WARNING", logger="tunnel_telemetry.web.proxy"):
        middleware({"REMOTE_ADDR": "10.0.0.9"}, lambda *a: None)
        assert not caplog.records
        for _ in range(3):
            middleware({"REMOTE_ADDR": "10.0.0.9", "HTTP_X_FORWARDED_FOR": "2.3.4.5"},
                       lambda *a: None)
    [record] = caplog.records
    assert "proxy_header_ignored" in record.getMessage() and "proxy-hops" in record.getMessage()
    assert "2.3.4.5" not in record.getMessage() and "10.0.0.9" not in record.getMessage()
