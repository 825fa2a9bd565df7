"""The access log of tt-server: the fast path writes what gunicorn's generic one would."""

import datetime

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger as GunicornLogger

from tunnel_telemetry.server import ACCESS_LOG_FORMAT, ScrubbingLogger


class Resp:
    status = "201 CREATED"
    sent = 512
    headers = [("Content-Type", "application/json")]
    response_length = 512


ONE_SECOND = datetime.timedelta(seconds=1, microseconds=2345)


def access_line(logger_class, path, capsys, duration=ONE_SECOND):
    cfg = Config()
    cfg.set("accesslog", "-")
    cfg.set("access_log_format", ACCESS_LOG_FORMAT)
    capsys.readouterr()
    log = logger_class(cfg)  # binds the "-" handler to the captured stdout
    log.now = lambda: "[25/Nov/2026:01:00:00 +0000]"
    req = type("Req", (), {"headers": [("X-FORWARDED-FOR", "81.2.69.160")], "method": "POST",
                           "path": path, "query": "", "version": (1, 1)})()
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "RAW_URI": path,
               "QUERY_STRING": "", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "81.2.69.160"}
    log.access(Resp(), req, environ, duration)
    for handler in log.access_log.handlers + log.error_log.handlers:
        handler.flush()
    return capsys.readouterr().out.splitlines()


def test_fast_access_line_is_gunicorns(capsys):
    fast = access_line(ScrubbingLogger, "/report", capsys)
    assert fast == access_line(GunicornLogger, "/report", capsys)
    assert fast == ['[25/Nov/2026:01:00:00 +0000] "POST /report HTTP/1.1" 201 512 1002ms']


@pytest.mark.parametrize("path, shown", [
    ('/a"b', "/a\\x22b"),
    ("/x\n1.2.3.4 - forged", "/x\\x0a[scrubbed] - forged"),
    ("/81.2.69.160", "/[scrubbed]"),
])
def test_fast_access_line_escapes_and_redacts(capsys, path, shown):
    assert access_line(ScrubbingLogger, path, capsys, datetime.timedelta(milliseconds=3)) == [
        f'[25/Nov/2026:01:00:00 +0000] "POST {shown} HTTP/1.1" 201 512 3ms']


@pytest.mark.parametrize("flags, accesslog", [({}, "-"), ({"access-log": False}, None),
                                              ({"access-log": "yes"}, "-")])
def test_access_log_option(flags, accesslog):
    from tunnel_telemetry.config import Config
    from tunnel_telemetry.server import gunicorn_options

    assert gunicorn_options(Config.from_mapping(flags))["accesslog"] == accesslog
