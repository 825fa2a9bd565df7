"""Serve the collector with gunicorn, in-process (tt-server) or via gunicorn.conf.py."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from .. import metrics
from ..logs import REDACTED_ATTR, RedactingFilter
from ..web import ROUTE_KEY

if TYPE_CHECKING:
    from flask import Flask
    from gunicorn.arbiter import Arbiter
    from gunicorn.config import Config as GunicornConfig
    from gunicorn.http.message import Request as GunicornRequest
    from gunicorn.http.wsgi import Response as GunicornResponse
    from gunicorn.workers.base import Worker

    from ..config import Config
    from ..web import Services

Hook = Callable[["Arbiter"], None]  # a gunicorn server hook (when_ready, on_exit ...)

# No %(h)s (remote address), no headers, no query string: nothing that identifies a client.
# Gunicorn's start-up and reload lines: its listeners (and the pid).
LISTENING = ("Listening at: %s (%s)", "Listening at: %s")
ACCESS_LOG_FORMAT = '%(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'
# The methods and protocols an access line may name; gunicorn lets a client send other tokens
# (a method may be "1.2.3.4"), which show as "-".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT",
                     "TRACE"})
PROTOCOLS = frozenset({"HTTP/1.0", "HTTP/1.1"})


class VettedAccess(logging.Filter):
    """Access lines are made of atoms() only, each from a closed vocabulary (a method and a
    protocol from fixed lists, a route's rule, numbers and times of the server's own): mark
    them built redacted, so the redacting filter does not search them for addresses."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = record.getMessage(), None
        setattr(record, REDACTED_ATTR, True)
        return True


class ScrubbingLogger(GunicornLogger):
    """Gunicorn's logger, with IP addresses redacted from every record and access lines that
    know only a few harmless fields: the path is the route's rule (``/report``), never what
    the client typed (``-`` for a path no route matches), and no other word a client chose."""

    def setup(self, cfg: GunicornConfig) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                    handler.addFilter(RedactingFilter())
        if not any(isinstance(f, VettedAccess) for f in self.access_log.filters):
            self.access_log.addFilter(VettedAccess())

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        """The start-up line keeps the operator's own listen address (its listeners are the
        server's sockets, never client data); every other line is redacted."""
        if msg in LISTENING and args:
            kwargs["extra"] = {**kwargs.get("extra", {}), REDACTED_ATTR: True}
            msg, args = msg % args, ()
        super().info(msg, *args, **kwargs)

    def atoms(self, resp: GunicornResponse, req: GunicornRequest, environ: dict[str, Any],
              request_time: datetime.timedelta) -> dict[str, Any]:
        """The atoms an access_log_format may use; anything else (%(h)s, headers, environ,
        query) is ``-``."""
        status = resp.status
        if isinstance(status, str):
            status = status.split(None, 1)[0]
        method = environ.get("REQUEST_METHOD", "-")
        method = method if method in METHODS else "-"
        protocol = environ.get("SERVER_PROTOCOL", "-")
        protocol = protocol if protocol in PROTOCOLS else "-"
        route = route_of(environ)
        sent = getattr(resp, "sent", None)
        micros = request_time.seconds * 1_000_000 + request_time.microseconds
        return {"t": self.now(), "r": f"{method} {route} {protocol}", "s": status,
                "m": method, "U": route, "H": protocol, "B": sent,
                "b": "-" if sent is None else str(sent), "T": request_time.seconds,
                "D": micros, "M": micros // 1000, "p": f"<{os.getpid()}>",
                "L": f"{request_time.seconds}.{request_time.microseconds:06d}"}


def route_of(environ: dict[str, Any]) -> str:
    """The rule of the route that served this request (web.ROUTE_KEY), ``-`` if none did."""
    return environ.get(ROUTE_KEY) or "-"


def pre_request(worker: Worker, req: GunicornRequest) -> None:
    """Gunicorn's default logs each request's raw path at debug level: log nothing."""


def _services(worker: Worker) -> Services | None:
    app = getattr(worker, "wsgi", None)
    return getattr(app, "extensions", {}).get("tunnel_telemetry")


def post_worker_init(worker: Worker) -> None:
    """Start per-worker background work (relay retry loop) after the fork."""
    svc = _services(worker)
    if svc is not None:
        svc.start()


def worker_exit(server: Arbiter, worker: Worker) -> None:
    """Release per-worker resources (open relay reports, connections) on shutdown."""
    svc = _services(worker)
    if svc is not None:
        try:
            svc.close()
        except Exception:  # noqa: BLE001 - shutting down anyway
            logging.getLogger(__name__).warning("close failed on worker exit")


def on_reload(arbiter: Arbiter) -> None:
    """SIGHUP: reopen the geo databases in the master; the workers forked next use them.

    The app is preloaded in the master, so workers inherit its readers: reopening there, before
    gunicorn replaces the workers, makes an updated database live without a restart. A file
    that cannot be opened keeps the current one (logged as geo_reload_failed). Databases
    `tt-server geo update` installed in geo-dir since start-up are picked up too.
    """
    app = getattr(arbiter.app, "callable", None)
    svc = getattr(app, "extensions", {}).get("tunnel_telemetry")
    if svc is not None:
        svc.reload_geo()


def _chain(first: Hook | None, second: Hook) -> Hook:
    """One gunicorn server hook running two (TLS and the geo updater both use when_ready)."""
    if first is None:
        return second

    def both(server: Arbiter) -> None:
        first(server)
        second(server)

    return both


def geo_updater_options(config: Config, options: dict[str, Any]) -> dict[str, Any]:
    """With geo-update-interval: start the updater in the master when it is ready."""
    if not config.geo_update_interval:
        return {}
    from ..geo_update import Updater

    updater = Updater(config, config.geo_update_interval)
    return {"when_ready": _chain(options.get("when_ready"), lambda server: updater.start()),
            "on_exit": _chain(options.get("on_exit"), lambda server: updater.stop())}


def gunicorn_options(config: Config) -> dict[str, Any]:
    """Gunicorn settings for a Config; shared by tt-server and gunicorn.conf.py."""
    options: dict[str, Any] = {
        "bind": [config.listen],
        "workers": config.workers or os.cpu_count() or 1,
        # gunicorn's gevent worker, with deadlines, connection caps and JSON errors (worker.py).
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
        "keepalive": 5,  # on; the wait for a kept-alive request is header-timeout (worker.py)
        "pre_request": pre_request,
        "post_worker_init": post_worker_init,
        "worker_exit": worker_exit,
        "on_reload": on_reload,
        "child_exit": metrics.child_exit,  # a dead worker's metric files (multiprocess mode)
        "proc_name": "tt-server",
        "pidfile": config.pidfile,
        # Gunicorn's control socket has one fixed path per user: several instances collide.
        "control_socket_disable": True,
    }
    if config.autotls or config.certfile:
        from ..tls.autotls import gunicorn_tls_options  # ACME/crypto imports only when needed

        options.update(gunicorn_tls_options(config))
    options.update(geo_updater_options(config, options))
    return options


class Server(BaseApplication):
    """Gunicorn running an already built app (preloaded: config errors surface before fork)."""

    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.application


def prepare_tls(config: Config) -> None:
    """Before binding: get the autotls certificate (from cache or ACME) or check that
    certfile/keyfile load. Raises AutoTLSError / TLSConfigError with a one-line message.
    """
    if config.autotls:
        from ..tls.autotls import AutoTLS

        AutoTLS.from_config(config).ensure()
    elif config.certfile:
        from ..tls.autotls import check_cert_pair

        check_cert_pair(config.certfile, config.keyfile)


def serve(config: Config, app: Flask | None = None, tls_prepared: bool = False) -> None:
    """Run gunicorn until SIGTERM / SIGINT; returns after a clean shutdown."""
    if app is None:
        from ..web import create_app

        app = create_app(config)
    if not tls_prepared:
        prepare_tls(config)
    Server(app, gunicorn_options(config)).run()
