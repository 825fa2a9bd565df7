"""Gunicorn worker for the collector: gevent, hardened against slow clients, JSON errors.

Why gevent. Every request waits on something: the group commit's fsync and, with the relay
on, OONI's answer (50-100 ms). gthread threads give that concurrency, but each of a
request's blocking steps hands the GIL to another of the worker's threads, and at thousands
of requests a second those hand-offs took more CPU than the collector's own work (13-14
context switches per report). A greenlet per connection waits without an OS thread switch;
what cannot wait cooperatively (SQLite's statements and fsync) runs in gevent's thread pool,
one hand-off per group commit (``green.offload``). See docs/benchmarks.md for the figures.

Slow clients. A connection is a greenlet: a client that sends nothing, or trickles, holds no
thread, only one of ``worker-connections`` places. Deadlines free those too: a request's head
(and a TLS handshake) must arrive within ``header-timeout`` of its first byte, a kept-alive
connection may idle ``keepalive`` seconds (a new one ``header-timeout``) before it is closed
silently, and the body must be read within ``request-timeout`` of the request's start. An
overdue client that started a request gets a 408 (plain HTTP) and its connection is closed.
Processing after the body is read is never cut off, so a stored report is not half-answered.

Errors. Gunicorn answers malformed HTTP (bad request line, oversized headers, bad chunking)
itself with an HTML page naming the offending input; SPEC promises JSON and no echo of
client input, so this worker writes ``{"ok": false, ...}`` with a fixed message.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import mmap
import os
import signal
import socket
import ssl
import struct
import time
import warnings
from datetime import datetime
from functools import partial
from http import HTTPStatus
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer
from gevent.socket import wait_read
from gevent.ssl import SSLSocket as GreenSSLSocket
from gunicorn import http, util
from gunicorn.http import errors as http_errors
from gunicorn.http import wsgi
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.2  # seconds between flushes of the batched access log
BALANCE_SLOTS = 64  # workers the connection balance can see (a worker's slot: its age % 64)
BALANCE_FLOOR = 4  # a worker with fewer open connections always accepts
BALANCE_RETRY = 0.002  # seconds a worker that left a connection to another waits to look again
BALANCE_FRESH = 0.5  # seconds a worker's heartbeat counts: a stuck or dead one is not waited for
STOP_POLL = 0.05  # seconds between checks for a stop signal
SHUTDOWN_POLL = 0.1  # seconds between checks for finished requests when stopping
IDLE_GRACE = 1.0  # seconds a stopping worker still answers requests on kept-alive connections

# Most specific first: InvalidResponseHeader is an InvalidHeader raised for the app's fault.
_HTTP_ERRORS: tuple[tuple[type[BaseException], int, str], ...] = (
    (http_errors.InvalidResponseHeader, 500, "internal error, retry later"),
    (http_errors.InvalidResponseHeaderName, 500, "internal error, retry later"),
    (http_errors.ConfigurationProblem, 500, "internal error, retry later"),
    (http_errors.LimitRequestLine, 414, "the request line is too long"),
    (http_errors.LimitRequestHeaders, 431, "the request headers are too large"),
    (http_errors.UnsupportedTransferCoding, 501, "unsupported transfer coding"),
    (http_errors.ExpectationFailed, 417, "unsupported Expect header"),
    (http_errors.ForbiddenProxyRequest, 403, "forbidden"),
    (http_errors.ParseException, 400, "malformed HTTP request"),
    (ssl.SSLError, 400, "TLS error"),
)


def http_error(exc: BaseException) -> tuple[int, str]:
    """Status and fixed message for an error gunicorn met outside the app."""
    for kind, status, message in _HTTP_ERRORS:
        if isinstance(exc, kind):
            return status, message
    return 500, "internal error, retry later"


def error_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response with the SPEC's JSON error body; the connection closes."""
    body = json.dumps({"ok": False, "msg": message, "errors": []}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "Connection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class SlowClient(BaseException):
    """A client missed a deadline. Not an Exception: raised inside the app's body read, it
    must reach the worker untouched, not become the app's own error answer."""

    def __init__(self, phase: str) -> None:
        super().__init__(phase)
        self.phase = phase


class _DeadlineBody:
    """The request body (wsgi.input): every read ends with SlowClient at ``deadline``."""

    def __init__(self, body: Any, deadline: float) -> None:
        self._body = body
        self._deadline = deadline

    def _call(self, name: str, *args: Any) -> Any:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise SlowClient("body")
        with gevent.Timeout(left, SlowClient("body")):
            return getattr(self._body, name)(*args)

    def read(self, *args: Any) -> bytes:
        return self._call("read", *args)

    def readline(self, *args: Any) -> bytes:
        return self._call("readline", *args)

    def readlines(self, *args: Any) -> list[bytes]:
        return self._call("readlines", *args)

    def __iter__(self) -> _DeadlineBody:
        return self

    def __next__(self) -> bytes:
        return self._call("__next__")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._body, name)


def _buffered(parser: Any) -> bool:
    """Whether the parser already holds bytes of the next request (pipelining)."""
    return parser.unreader.buf.seek(0, io.SEEK_END) > 0


class _Response(wsgi.Response):
    """gunicorn's response, writing its head together with the first body bytes: one write
    (one loopback or TCP segment) for a small answer instead of two."""

    _head: bytes | None = None

    @property
    def head_written(self) -> bool:
        """Whether any byte of this answer went out."""
        return self.headers_sent and self._head is None

    def send_headers(self) -> None:
        if self.headers_sent:
            return
        lines = self.default_headers()
        lines.extend(f"{name}: {value}\r\n" for name, value in self.headers)
        self._head = ("".join(lines) + "\r\n").encode("latin-1")
        self.headers_sent = True

    def _flush_head(self) -> None:
        head, self._head = self._head, None
        if head:
            util.write(self.sock, head)

    def _emit_body(self, data: bytes) -> None:
        if self._head and not self.chunked:
            head, self._head = self._head, None
            util.write(self.sock, head + data)
            return
        self._flush_head()
        super()._emit_body(data)

    def write_file(self, respiter: Any) -> Any:
        self.send_headers()
        self._flush_head()
        return super().write_file(respiter)

    def close(self) -> None:
        self.send_headers()
        self._flush_head()
        super().close()


class Balance:
    """Open connections per worker, in memory the master shares with every worker it forks.

    Workers race to accept each new connection; when many arrive at once (a proxy's or a load
    generator's keep-alive pool) one worker can end up with twice the connections of another
    and queue requests while the other idles. A worker holding more than the least loaded live
    worker (plus a little slack) leaves new connections to it for a moment. Each slot is
    written by its own worker only; readers take what they see (no lock)."""

    _ROW = struct.Struct("<qqd")  # pid, open connections, heartbeat (time.monotonic)

    def __init__(self) -> None:
        self.buf = mmap.mmap(-1, BALANCE_SLOTS * self._ROW.size)  # shared across fork
        self.slot: int | None = None
        self.open = 0

    def join(self, age: int) -> None:
        self.slot = age % BALANCE_SLOTS
        self.open = 0
        self.beat()

    def leave(self) -> None:
        if self.slot is not None:
            self._ROW.pack_into(self.buf, self.slot * self._ROW.size, 0, 0, 0.0)
            self.slot = None

    def beat(self) -> None:
        """Publish this worker's slot: alive now, with its open connections."""
        if self.slot is not None:
            self._ROW.pack_into(self.buf, self.slot * self._ROW.size, os.getpid(), self.open,
                                time.monotonic())

    def opened(self, delta: int) -> None:
        self.open += delta
        self.beat()  # at once: in a burst the others must see it before the next accept

    def should_wait(self) -> bool:
        """Whether another live worker holds clearly fewer open connections than this one."""
        if self.open < BALANCE_FLOOR or self.slot is None:
            return False
        now = time.monotonic()
        fewest = None
        for index, (pid, count, beat) in enumerate(self._ROW.iter_unpack(self.buf)):
            if pid and index != self.slot and now - beat < BALANCE_FRESH:
                fewest = count if fewest is None else min(fewest, count)
        return fewest is not None and self.open > fewest + 1 + self.open // 8


BALANCE = Balance()  # made at import, in the master: its forks share the memory


class _BalancedServer(StreamServer):
    """gevent's StreamServer, leaving new connections to a less loaded worker (Balance)."""

    balance: Balance | None = None

    def do_read(self) -> Any:
        balance = self.balance
        if balance is not None and balance.should_wait():
            self.stop_accepting()
            self._balance_timer = self.loop.timer(BALANCE_RETRY)
            self._balance_timer.start(self._look_again)
            return None
        accepted = super().do_read()
        if accepted and balance is not None:
            balance.opened(1)
        return accepted

    def _look_again(self) -> None:
        if self.started and not self.closed:
            self.start_accepting()


class CollectorWorker(GeventWorker):
    """gevent worker with request deadlines, JSON error answers and logs that name no client."""

    header_timeout = 10.0
    request_timeout = 30.0
    balance: Balance | None = None

    def init_process(self) -> None:
        # Until gunicorn installs this worker's handlers (after gevent's patching, ~0.1 s), a
        # stop signal would reach the master's handlers copied by the fork and be lost.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._stop_early)
        super().init_process()

    def _stop_early(self, sig: int, frame: Any) -> None:
        self.alive = False

    def patch(self) -> None:
        # The app is preloaded, so ssl was imported before this patch. What depends on it is
        # handled: HTTPS client pools are made per process from the patched module
        # (delivery.RelayHTTP), and served connections are wrapped in gevent's SSLSocket
        # whatever module made the context (_tls).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Monkey-patching ssl after ssl",
                                    category=Warning)
            super().patch()

    def run(self) -> None:
        services = getattr(self.wsgi, "extensions", {}).get("tunnel_telemetry")
        config = getattr(services, "config", None)
        self.header_timeout = getattr(config, "header_timeout", self.header_timeout)
        self.request_timeout = getattr(config, "request_timeout", self.request_timeout)
        # gunicorn's settings, read once (each read is a lookup through its Config).
        self.is_ssl, self.keepalive = self.cfg.is_ssl, self.cfg.keepalive
        self.pre_request_hook, self.post_request_hook = self.cfg.pre_request, self.cfg.post_request
        self.waiting: set[Any] = set()  # kept-alive connections between requests
        self.balance = BALANCE if self.cfg.workers > 1 else None
        if self.balance is not None:
            self.balance.join(self.age)
        servers = []
        for listener in self.sockets:
            listener.setblocking(1)
            # The name is read now: a connection accepted just before a graceful stop is served
            # after the listener was closed.
            server = _BalancedServer(listener,
                                     handle=partial(self.handle, listener.getsockname()),
                                     spawn=Pool(self.worker_connections))
            if self.balance is not None:
                server.max_accept = 1  # leave the next connection to an idle worker
                server.balance = self.balance
            server.start()
            servers.append(server)
        flusher = gevent.spawn(self._flush_access_log)
        try:
            beat = 0.0
            while self.alive:  # a stop signal is seen within STOP_POLL
                if time.monotonic() - beat >= 1.0:
                    self.notify()
                    beat = time.monotonic()
                if self.balance is not None:
                    self.balance.beat()
                gevent.sleep(STOP_POLL)
            if self.balance is not None:
                self.balance.leave()  # a stopping worker takes no new connections
            self._stop(servers)
        finally:
            flusher.kill()

    def _stop(self, servers: list[StreamServer]) -> None:
        """Stop accepting, close idle kept-alive connections, let requests in progress (and
        connections accepted but not yet served) finish up to graceful-timeout, then end the
        rest."""
        for server in servers:
            server.close()
        started = time.monotonic()
        deadline = started + self.cfg.graceful_timeout
        while time.monotonic() < deadline:
            # A request already on its way over a kept-alive connection is still answered
            # (with Connection: close) for a moment; then idle connections are closed.
            if time.monotonic() - started > IDLE_GRACE:
                gevent.killall(list(self.waiting), block=False)
            if all(server.pool.free_count() == server.pool.size for server in servers):
                return
            self.notify()
            gevent.sleep(SHUTDOWN_POLL)
        self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
        for server in servers:
            server.stop(timeout=1)

    def _flush_access_log(self) -> None:
        flush = getattr(self.log, "flush_access", None)
        while flush is not None:
            gevent.sleep(FLUSH_INTERVAL)
            flush()

    # -- one connection ----------------------------------------------------------------------

    def handle(self, listener_name: Any, client: Any, addr: Any) -> None:
        client.setblocking(1)
        req = None
        try:
            if self.is_ssl:
                client = self._tls(client)
            parser = http.get_parser(self.cfg, client, addr)
            kept = False  # served a request already: between requests, it may be closed
            while self._next_request_started(client, parser, kept):
                req = None
                with gevent.Timeout(self.header_timeout, SlowClient("head")):
                    req = next(parser)
                if req.body is not None:
                    req.body = _DeadlineBody(req.body, time.monotonic() + self.request_timeout)
                if not self.handle_request(listener_name, req, client, addr):
                    break
                kept = True
                # Let the worker's other connections run: a client that sends its next request
                # at once would otherwise be served again and again while they wait.
                gevent.sleep(0)
        except SlowClient as exc:
            if not self.is_ssl and exc.phase != "tls":
                _send_408(client, exc.phase)
            else:
                log.info("slow_client_cut %s", exc.phase)
        except (StopIteration, http_errors.NoMoreData, gevent.GreenletExit):
            pass
        except ssl.SSLError as exc:
            if exc.args and exc.args[0] == ssl.SSL_ERROR_EOF:
                self.log.debug("ssl connection closed")
            else:
                self.handle_error(req, client, addr, exc)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.info("socket error: %s %s", type(exc).__name__,
                              errno.errorcode.get(exc.errno or 0, "-"))
        except Exception as exc:  # noqa: BLE001 - malformed HTTP and the like: a JSON answer
            self.handle_error(req, client, addr, exc)
        finally:
            util.close(client)
            if self.balance is not None:
                self.balance.opened(-1)

    def _tls(self, client: Any) -> Any:
        """Wrap in TLS with the current certificate (autotls.ReloadingSSLContext: reloaded on
        renewal) and complete the handshake within header-timeout.

        The socket is gevent's SSLSocket whatever the context: the context may have been made
        in the master before gevent patched ``ssl`` here, and its own wrap_socket would give a
        standard SSLSocket, which blocks the whole worker (or drops the connection)."""
        with gevent.Timeout(self.header_timeout, SlowClient("tls")):
            client = GreenSSLSocket(sock=client, server_side=True,
                                    do_handshake_on_connect=False,
                                    suppress_ragged_eofs=self.cfg.suppress_ragged_eofs,
                                    _context=ssl_context(self.cfg))
            client.do_handshake()
        return client

    def _next_request_started(self, client: Any, parser: Any, kept: bool) -> bool:
        """Wait for the first byte of the next request, up to keepalive seconds on a kept-alive
        connection (header-timeout on a new one); False when the client closed or sent nothing
        (close without an answer) or the worker is stopping (kept-alive ones only)."""
        if _buffered(parser) or (self.is_ssl and client.pending()):
            return True
        idle = self.keepalive if kept else self.header_timeout
        me = gevent.getcurrent()
        if kept:
            if not self.alive:
                return False
            self.waiting.add(me)
        try:
            if self.is_ssl:
                wait_read(client.fileno(), timeout=idle)
                return True
            client.settimeout(idle)
            try:
                return bool(client.recv(1, socket.MSG_PEEK))
            finally:
                client.settimeout(None)
        except (TimeoutError, OSError):
            return False
        finally:
            self.waiting.discard(me)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool:
        """Serve one request; False when the connection must close.

        AsyncWorker's, with the response head written together with the body (_Response) and
        gunicorn's settings read once per worker, not per request.
        """
        started = datetime.now()
        environ: dict[str, Any] = {}
        resp = None
        try:
            self.pre_request_hook(self, req)
            resp, environ = wsgi.create(req, sock, addr, listener_name, self.cfg,
                                        response_class=_Response)
            environ["wsgi.multithread"] = True
            self.nr += 1
            if self.nr >= self.max_requests and self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
            if not self.alive or not self.keepalive:
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            try:
                if isinstance(respiter, environ["wsgi.file_wrapper"]):
                    resp.write_file(respiter)
                else:
                    for item in respiter:
                        resp.write(item)
                resp.close()
            finally:
                self.log.access(resp, req, environ, datetime.now() - started)
                if hasattr(respiter, "close"):
                    respiter.close()
            return not resp.should_close()
        except (gevent.GreenletExit, SystemExit):
            return False
        except OSError:
            raise
        except Exception:
            if resp is not None and resp.head_written:
                # Too late for an error answer: the client has part of this one.
                self.log.error("error after the answer started")
                return False
            raise
        finally:
            try:
                self.post_request_hook(self, req, environ, resp)
            except Exception:  # noqa: BLE001 - as gunicorn: a hook must not fail the worker
                self.log.error("post_request hook failed")

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        status, message = http_error(exc)
        # Reason code only: gunicorn's own message quotes the client's address and input.
        if status >= 500:
            self.log.error("http error: %s", type(exc).__name__)
        else:
            self.log.info("rejected http: %s", type(exc).__name__)
        try:
            client.settimeout(1.0)
            client.sendall(error_response(status, message))
        except Exception:  # noqa: BLE001 - the client may be gone; nothing more to do
            self.log.debug("failed to send the error response")


def _send_408(sock: Any, phase: str) -> None:
    """Best effort, never waiting: the client is too slow to be waited for."""
    log.info("slow_client_cut %s", phase)
    try:
        sock.settimeout(0)
        sock.send(error_response(408, "the request took too long to arrive"))
    except OSError:
        pass
