"""Serve the collector with gunicorn, in-process (tt-server) or via gunicorn.conf.py."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from .. import metrics
from ..logs import REDACTED_ATTR, RedactingFilter
from ..pipeline.scrub import scrub_text

# No %(h)s (remote address), no headers, no query string: nothing that identifies a client.
ACCESS_LOG_FORMAT = '%(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'
FLUSH_LINES = 64  # access lines written together at most
FLUSH_SECONDS = 0.2  # and at the latest this long after the first of them


class ScrubbingLogger(GunicornLogger):
    """Gunicorn's logger with IP addresses redacted from error and access logs.

    Gunicorn itself writes client addresses into some messages ("Invalid request from ip=...").
    """

    _stamp_cache: tuple[int, str] = (0, "")
    _buffered = False

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        # Plain streams and files get access lines in batches (one write per FLUSH_LINES lines
        # or FLUSH_SECONDS, see flush_access); a syslog or custom handler gets one per request.
        self._buffered = bool(self.access_log.handlers) and all(
            type(h) in (logging.StreamHandler, logging.FileHandler)
            for h in self.access_log.handlers)
        self._pending: list[str] = []
        self._pending_lock = threading.Lock()
        self._flushed = time.monotonic()
        if not getattr(self, "_fork_hook", False):  # setup() runs again on every SIGHUP
            os.register_at_fork(after_in_child=self._after_fork)
            self._fork_hook = True
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                    handler.addFilter(RedactingFilter())

    def access(self, resp: Any, req: Any, environ: dict, request_time: Any) -> None:
        """Log one request in ACCESS_LOG_FORMAT, built directly from the fields it names.

        Gunicorn's generic version builds a dict of every header and environ key per request
        (~10% of a report's CPU under load); any other format still goes through it.
        """
        if not self.cfg.accesslog or self.cfg.access_log_format != ACCESS_LOG_FORMAT:
            super().access(resp, req, environ, request_time)
            return
        status = resp.status
        if isinstance(status, str):
            status = status.split(None, 1)[0]
        millis = request_time.seconds * 1000 + request_time.microseconds // 1000
        path = environ.get("PATH_INFO", "")
        if path not in _KNOWN_PATHS:  # anything a client typed: escaped, addresses redacted
            path = scrub_text(_UNSAFE.sub(_escape, path))
        line = '%s "%s %s %s" %s %s %sms' % (  # noqa: UP031 - one string, no record args
            self._stamp(), environ.get("REQUEST_METHOD"), path,
            environ.get("SERVER_PROTOCOL"), status, getattr(resp, "sent", None), millis)
        if not self._buffered:
            self._write([line])
            return
        with self._pending_lock:
            self._pending.append(line)
            if (len(self._pending) < FLUSH_LINES
                    and time.monotonic() - self._flushed < FLUSH_SECONDS):
                return
            lines, self._pending = self._pending, []
            self._flushed = time.monotonic()
        self._write(lines)

    def flush_access(self) -> None:
        """Write the access lines held back (the worker calls this every 0.2 s and on exit)."""
        if not self._buffered:
            return
        with self._pending_lock:
            lines, self._pending = self._pending, []
            self._flushed = time.monotonic()
        if lines:
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        try:
            self.access_log.info("\n".join(lines), extra=_REDACTED)
        except Exception:  # noqa: BLE001 - as gunicorn: a log failure must not fail a request
            self.error("access log failed")

    def _after_fork(self) -> None:
        self._pending_lock = threading.Lock()
        self._pending = []

    def _stamp(self) -> str:
        """Gunicorn's ``[%d/%b/%Y:%H:%M:%S %z]``, formatted once a second."""
        now = int(time.time())
        cached = self._stamp_cache
        if cached[0] != now:
            cached = self._stamp_cache = (now, time.strftime("[%d/%b/%Y:%H:%M:%S %z]",
                                                             time.localtime(now)))
        return cached[1]


_KNOWN_PATHS = frozenset(("/report", "/relay", "/healthz", "/", "/version",
                          "/report.schema.json"))
_REDACTED = {REDACTED_ATTR: True}  # built from checked parts: RedactingFilter can skip it
_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f]')


def _escape(match: re.Match) -> str:
    """\\xNN for a quote, backslash or control character of a path (no forged log lines)."""
    return f"\\x{ord(match.group(0)):02x}"


def _services(worker: Any) -> Any:
    app = getattr(worker, "wsgi", None)
    return getattr(app, "extensions", {}).get("tunnel_telemetry")


def post_worker_init(worker: Any) -> None:
    """Start per-worker background work (relay retry loop) after the fork."""
    svc = _services(worker)
    if svc is not None:
        svc.start()


def worker_exit(server: Any, worker: Any) -> None:
    """Release per-worker resources (open relay reports, connections) on shutdown."""
    flush = getattr(worker.log, "flush_access", None)
    if flush is not None:
        flush()
    svc = _services(worker)
    if svc is not None:
        try:
            svc.close()
        except Exception:  # noqa: BLE001 - shutting down anyway
            logging.getLogger(__name__).warning("close failed on worker exit")


def on_reload(arbiter: Any) -> None:
    """SIGHUP: reopen the geo databases in the master; the workers forked next use them.

    The app is preloaded in the master, so workers inherit its readers: reopening there, before
    gunicorn replaces the workers, makes an updated database live without a restart. A file
    that cannot be opened keeps the current one (logged as geo_reload_failed).
    """
    app = getattr(arbiter.app, "callable", None)
    svc = getattr(app, "extensions", {}).get("tunnel_telemetry")
    if svc is not None:
        svc.geo.reload()


def gunicorn_options(config: Any) -> dict[str, Any]:
    """Gunicorn settings for a Config; shared by tt-server and gunicorn.conf.py."""
    options: dict[str, Any] = {
        "bind": [config.listen],
        "workers": config.workers or os.cpu_count() or 1,
        # gevent with deadlines and JSON error pages (see worker.py).
        "worker_class": "tunnel_telemetry.server.worker.CollectorWorker",
        "worker_connections": config.worker_connections,
        "preload_app": True,
        "accesslog": "-" if config.access_log else None,
        "errorlog": "-",
        "access_log_format": ACCESS_LOG_FORMAT,
        "logger_class": "tunnel_telemetry.server.ScrubbingLogger",
        "loglevel": "debug" if config.debug else "info",
        "timeout": 30,
        "graceful_timeout": 20,
        "keepalive": 5,
        "post_worker_init": post_worker_init,
        "worker_exit": worker_exit,
        "on_reload": on_reload,
        "child_exit": metrics.child_exit,  # a dead worker's metric files (multiprocess mode)
        "proc_name": "tt-server",
        # Gunicorn's control socket has one fixed path per user: several instances collide.
        "control_socket_disable": True,
    }
    if config.autotls or config.certfile:
        from ..tls.autotls import gunicorn_tls_options  # ACME/crypto imports only when needed

        options.update(gunicorn_tls_options(config))
    return options


class Server(BaseApplication):
    """Gunicorn running an already built app (preloaded: config errors surface before fork)."""

    def __init__(self, app: Any, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self.application


def prepare_tls(config: Any) -> None:
    """Before binding: get the autotls certificate (from cache or ACME) or check that
    certfile/keyfile load. Raises AutoTLSError / TLSConfigError with a one-line message.
    """
    if config.autotls:
        from ..tls.autotls import AutoTLS

        AutoTLS.from_config(config).ensure()
    elif config.certfile:
        from ..tls.autotls import check_cert_pair

        check_cert_pair(config.certfile, config.keyfile)


def serve(config: Any, app: Any | None = None, tls_prepared: bool = False) -> None:
    """Run gunicorn until SIGTERM / SIGINT; returns after a clean shutdown."""
    if app is None:
        from ..web import create_app

        app = create_app(config)
    if not tls_prepared:
        prepare_tls(config)
    Server(app, gunicorn_options(config)).run()
