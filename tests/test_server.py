"""The access log of tt-server: gunicorn's own, with the route for a path and no address."""

import datetime

import pytest
import requests
from gunicorn.config import Config

from tunnel_telemetry.server import ACCESS_LOG_FORMAT, ScrubbingLogger
from tunnel_telemetry.web import ROUTE_KEY


class Resp:
    status = "201 CREATED"
    sent = 512
    headers = [("Content-Type", "application/json")]
    response_length = 512


ONE_SECOND = datetime.timedelta(seconds=1, microseconds=2345)


def access_line(capsys, route, fmt=ACCESS_LOG_FORMAT, duration=ONE_SECOND, method="POST",
                protocol="HTTP/1.1"):
    cfg = Config()
    cfg.set("accesslog", "-")
    cfg.set("access_log_format", fmt)
    capsys.readouterr()
    log = ScrubbingLogger(cfg)  # binds the "-" handler to the captured stdout
    log.now = lambda: "[25/Nov/2026:01:00:00 +0000]"
    path = "/x:2001:db8::1/16843009"
    req = type("Req", (), {"headers": [("X-FORWARDED-FOR", "81.2.69.160")], "method": "POST",
                           "path": path, "query": "ip=81.2.69.160", "version": (1, 1)})()
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "RAW_URI": path + "?ip=1.2.3.4",
               "QUERY_STRING": "ip=1.2.3.4", "SERVER_PROTOCOL": protocol,
               "REMOTE_ADDR": "81.2.69.160", "HTTP_X_FORWARDED_FOR": "81.2.69.160",
               ROUTE_KEY: route}
    log.access(Resp(), req, environ, duration)
    for handler in log.access_log.handlers:
        handler.flush()
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("route, shown", [("/report", "/report"), (None, "-")])
def test_access_line_names_the_route_never_the_path(capsys, route, shown):
    assert access_line(capsys, route) == [
        f'[25/Nov/2026:01:00:00 +0000] "POST {shown} HTTP/1.1" 201 512 1002ms']


@pytest.mark.parametrize("method, protocol, shown", [
    ("GET", "HTTP/1.0", '"GET /report HTTP/1.0"'),
    ("81.2.69.160", "HTTP/1.1", '"- /report HTTP/1.1"'),  # gunicorn takes any token as method
    ("16843009", "HTTP/1.1", '"- /report HTTP/1.1"'),
    ("POST", "HTTP/1.1 81.2.69.160", '"POST /report -"'),
])
def test_methods_and_protocols_are_a_closed_vocabulary(capsys, method, protocol, shown):
    """Access lines skip the address search (VettedAccess): every word in them is the
    server's own or from a fixed list, so a method spelling an address shows as '-'."""
    line, = access_line(capsys, "/report", method=method, protocol=protocol)
    assert line == f'[25/Nov/2026:01:00:00 +0000] {shown} 201 512 1002ms'


def test_no_format_can_show_the_client(capsys):
    """Address, headers, query and environ are not atoms: a format naming them gets '-'."""
    fmt = '%(h)s %(r)s %(q)s %({x-forwarded-for}i)s %({remote_addr}e)s %(a)s %(D)s %(p)s'
    line, = access_line(capsys, "/report", fmt)
    assert line.startswith("- POST /report HTTP/1.1 - - - - 1002345 <")
    assert "81.2" not in line and "1.2.3.4" not in line and "2001" not in line


@pytest.mark.parametrize("flags, accesslog", [({}, "-"), ({"access-log": False}, None),
                                              ({"access-log": "yes"}, "-")])
def test_access_log_option(flags, accesslog):
    from tunnel_telemetry.config import Config
    from tunnel_telemetry.server import gunicorn_options

    assert gunicorn_options(Config.from_mapping(flags))["accesslog"] == accesslog


@pytest.mark.e2e
def test_client_paths_stay_out_of_access_and_debug_logs(tt_server):
    """Issue 21.3: a path spelling addresses appears nowhere in the real server's logs."""
    server = tt_server("--workers", "1", "--debug")
    for method in ("GET", "POST", "16843009"):
        with requests.request(method, server.url + "/x:2001:db8::1/16843009?ip=16843009",
                              data=b"{}", timeout=10) as resp:
            assert resp.status_code in (404, 405)
    with requests.request("16843009", server.url + "/report", timeout=10) as resp:
        assert resp.status_code == 405
    with requests.post(server.url + "/report", data=b"{}", timeout=10,
                       headers={"Content-Type": "application/json"}) as resp:
        assert resp.status_code == 400
    server.stop()
    logs = server.logs()
    assert '"GET - HTTP/1.1" 404' in logs and '"POST /report HTTP/1.1" 400' in logs
    assert '"- - HTTP/1.1" 405' in logs  # a method spelling an address, on a known path
    assert "16843009" not in logs and "2001:db8" not in logs and "/x:" not in logs


@pytest.mark.parametrize("msg, args, shown", [
    ("Listening at: %s (%s)", ("http://0.0.0.0:8080", 4242),
     "Listening at: http://0.0.0.0:8080 (4242)"),
    ("Listening at: %s (%s)", ("https://[::]:443", 7), "Listening at: https://[::]:443 (7)"),
    ("Listening at: %s", ("http://127.0.0.1:8080",), "Listening at: http://127.0.0.1:8080"),
    # Any other line is redacted, addresses in its arguments included.
    ("Invalid request from ip=%s", ("81.2.69.160",), "Invalid request from ip=[scrubbed]"),
    ("Listening at: http://81.2.69.160:80 (1)", (), "Listening at: http://[scrubbed]"),
])
def test_the_start_up_line_shows_the_listen_address(capsys, msg, args, shown):
    cfg = Config()
    cfg.set("errorlog", "-")
    capsys.readouterr()
    log = ScrubbingLogger(cfg)
    log.info(msg, *args)
    for handler in log.error_log.handlers:
        handler.flush()
    err = capsys.readouterr().err
    assert shown in err, err
    assert "81.2.69.160" not in err
