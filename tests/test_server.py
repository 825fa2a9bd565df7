"""The access log of tt-server: the fast path writes what gunicorn's generic one would."""

import datetime
import logging

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
    log.now = log._stamp = lambda: "[25/Nov/2026:01:00:00 +0000]"
    req = type("Req", (), {"headers": [("X-FORWARDED-FOR", "81.2.69.160")], "method": "POST",
                           "path": path, "query": "", "version": (1, 1)})()
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "RAW_URI": path,
               "QUERY_STRING": "", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "81.2.69.160"}
    log.access(Resp(), req, environ, duration)
    getattr(log, "flush_access", lambda: None)()
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


def test_access_line_time_is_gunicorns(capsys):
    """The once-a-second timestamp is the one gunicorn's now() writes."""
    cfg = Config()
    log = ScrubbingLogger(cfg)
    for _ in range(3):  # a second boundary between the two calls: try again
        ours, theirs = log._stamp(), log.now()
        if ours == theirs:
            break
    assert ours == theirs


def test_access_lines_are_written_in_batches(capsys):
    """Buffered on a stream: nothing per request, everything by flush_access (or when full)."""
    from tunnel_telemetry import server

    cfg = Config()
    cfg.set("accesslog", "-")
    cfg.set("access_log_format", ACCESS_LOG_FORMAT)
    capsys.readouterr()
    log = ScrubbingLogger(cfg)
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/report", "SERVER_PROTOCOL": "HTTP/1.1"}

    def lines():
        for handler in log.access_log.handlers:
            handler.flush()
        return capsys.readouterr().out.splitlines()

    # pytest's log capture adds its own handlers to gunicorn's loggers: with any handler that
    # is not a plain stream or file, every line is written on its own.
    assert log._buffered == all(type(h) is logging.StreamHandler
                                for h in log.access_log.handlers)
    log.access_log.handlers = [h for h in log.access_log.handlers
                               if type(h) is logging.StreamHandler]
    log.setup(cfg)
    assert log._buffered
    log.access(Resp(), None, environ, ONE_SECOND)
    assert lines() == []
    log.flush_access()
    assert len(lines()) == 1
    for _ in range(server.FLUSH_LINES):
        log.access(Resp(), None, environ, ONE_SECOND)
    assert len(lines()) == server.FLUSH_LINES, "a full batch is written at once"
    log.flush_access()
    assert len(lines()) == 0, "nothing was left behind"
