"""Gunicorn worker for the collector: gthread, hardened against slow clients, JSON errors.

Slow clients. Gunicorn 27's gthread worker hands every new connection to a pool thread that
waits up to 5 s for a first byte and then reads the headers blocking, with no deadline: a
client that trickles its headers, or a few that send nothing, hold all ``threads`` of a
worker. This worker instead reads each request head in its event loop (no thread is used
until the head is complete, up to ``header-timeout``; plain HTTP, new and kept-alive
connections alike). What still runs in a thread is bounded by a watchdog: a TLS handshake and
head (``header-timeout``) and body reads (``request-timeout`` from the request's start). An
overdue client gets a 408 (plain HTTP) and its socket shut down, which frees the thread.
Processing after the body is read is never cut off, so a stored report is not half-answered.

Errors. Gunicorn answers malformed HTTP (bad request line, oversized headers, bad chunking)
itself with an HTML page naming the offending input; SPEC promises JSON and no echo of
client input, so this worker writes ``{"ok": false, ...}`` with a fixed message.
"""

from __future__ import annotations

import errno
import json
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from functools import partial
from http import HTTPStatus
from typing import Any

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import TConn, ThreadWorker

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024  # head bytes buffered in the event loop before a thread takes over
WATCH_INTERVAL = 0.2  # seconds between watchdog rounds

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


class _Watched:
    """A request a pool thread is serving: its deadline and what it is doing."""

    __slots__ = ("conn", "start", "deadline", "phase", "reading", "cut")

    def __init__(self, conn: Any, start: float, deadline: float) -> None:
        self.conn = conn
        self.start = start
        self.deadline = deadline
        self.phase = "head"  # head -> body (the app runs; reads are watched) -> done
        self.reading = False
        self.cut = False


class _WatchedBody:
    """The request body (wsgi.input), marking when a thread is blocked reading it."""

    def __init__(self, body: Any, watched: _Watched) -> None:
        self._body = body
        self._watched = watched

    def _call(self, name: str, *args: Any) -> Any:
        self._watched.reading = True
        try:
            return getattr(self._body, name)(*args)
        finally:
            self._watched.reading = False

    def read(self, *args: Any) -> bytes:
        return self._call("read", *args)

    def readline(self, *args: Any) -> bytes:
        return self._call("readline", *args)

    def readlines(self, *args: Any) -> list[bytes]:
        return self._call("readlines", *args)

    def __iter__(self) -> _WatchedBody:
        return self

    def __next__(self) -> bytes:
        return self._call("__next__")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._body, name)


def _head_complete(head: bytearray, searched: int) -> bool:
    """Whether the head ends (blank line) in the bytes after ``searched``; linear overall."""
    start = max(0, searched - 3)
    return head.find(b"\n\r\n", start) >= 0 or head.find(b"\n\n", start) >= 0


class CollectorWorker(ThreadWorker):
    """gthread worker with request deadlines, JSON error answers and logs that name no client."""

    header_timeout = 10.0
    request_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heading: deque[Any] = deque()  # connections whose head the event loop reads
        self.watched: dict[int, _Watched] = {}
        self.watched_lock = threading.Lock()
        self.local = threading.local()

    def run(self) -> None:
        services = getattr(self.wsgi, "extensions", {}).get("tunnel_telemetry")
        config = getattr(services, "config", None)
        self.header_timeout = getattr(config, "header_timeout", self.header_timeout)
        self.request_timeout = getattr(config, "request_timeout", self.request_timeout)
        threading.Thread(target=self._watch, name="tt-deadlines", daemon=True).start()
        super().run()

    # -- the event loop reads request heads ------------------------------------------------

    def accept(self, listener: Any) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._read_head(TConn(self.cfg, client_sock, client_addr, listener.getsockname()))

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        """A kept-alive connection starts its next request: read its head here too."""
        if self.cfg.is_ssl:
            super().on_client_socket_readable(conn, client)
            return
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._read_head(conn)

    def _read_head(self, conn: Any) -> None:
        conn.sock.setblocking(False)
        conn.head = bytearray()
        conn.timeout = time.monotonic() + self.header_timeout
        self.heading.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self._on_head_readable, conn))

    def _on_head_readable(self, conn: Any, client: Any) -> None:
        if self.cfg.is_ssl:  # the handshake needs a thread; the watchdog bounds it
            self._hand_off(conn)
            return
        try:
            data = conn.sock.recv(MAX_HEAD)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_heading(conn)
            return
        searched = len(conn.head)
        conn.head += data
        if len(conn.head) >= MAX_HEAD or _head_complete(conn.head, searched):
            self._hand_off(conn)

    def _unwatch_heading(self, conn: Any) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            self.heading.remove(conn)
        except ValueError:
            pass

    def _hand_off(self, conn: Any) -> None:
        self._unwatch_heading(conn)
        conn.data_ready = True
        self.enqueue_req(conn)

    def _drop_heading(self, conn: Any) -> None:
        self._unwatch_heading(conn)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        while self.heading and self.heading[0].timeout <= now:
            conn = self.heading[0]
            if conn.head:
                _send_408(conn.sock, "head")
            self._drop_heading(conn)

    # -- threads: hand the buffered head to the parser, watch deadlines --------------------

    def handle(self, conn: Any) -> Any:
        now = time.monotonic()
        watched = _Watched(conn, now, now + self.header_timeout)
        self.local.watched = watched
        with self.watched_lock:
            self.watched[id(watched)] = watched
        try:
            head = getattr(conn, "head", None)
            if head:
                conn.head = bytearray()
                conn.sock.setblocking(True)
                conn.init()
                conn.parser.unreader.unread(bytes(head))
            return super().handle(conn)
        finally:
            with self.watched_lock:
                self.watched.pop(id(watched), None)
            self.local.watched = None

    def handle_request(self, req: Any, conn: Any) -> Any:
        watched = getattr(self.local, "watched", None)
        if watched is not None:
            watched.phase = "body"
            watched.deadline = watched.start + self.request_timeout
            if getattr(req, "body", None) is not None:
                req.body = _WatchedBody(req.body, watched)
        try:
            return super().handle_request(req, conn)
        finally:
            if watched is not None:
                watched.phase = "done"

    def _watch(self) -> None:
        flush_access = getattr(self.log, "flush_access", None)
        while True:
            time.sleep(WATCH_INTERVAL)
            if flush_access is not None:
                flush_access()
            now = time.monotonic()
            with self.watched_lock:
                due = [w for w in self.watched.values()
                       if not w.cut and now > w.deadline and (w.phase == "head" or w.reading)]
                for watched in due:
                    watched.cut = True
            for watched in due:
                self._cut(watched)

    def _cut(self, watched: _Watched) -> None:
        """Answer 408 and shut the socket down: the blocked read returns and frees the thread."""
        sock = watched.conn.sock
        if not self.cfg.is_ssl:
            _send_408(sock, watched.phase)
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        status, message = http_error(exc)
        # Reason code only: gunicorn's own message quotes the client's address and input.
        if status >= 500:
            self.log.error("http error: %s", type(exc).__name__)
        else:
            self.log.info("rejected http: %s", type(exc).__name__)
        try:
            util.write_nonblock(client, error_response(status, message))
        except Exception:  # noqa: BLE001 - the client may be gone; nothing more to do
            self.log.debug("failed to send the error response")


def _send_408(sock: Any, phase: str) -> None:
    """Best effort, never blocking: the client is too slow to be waited for."""
    log.info("slow_client_cut %s", phase)
    try:
        socket.socket.send(sock, error_response(408, "the request took too long to arrive"),
                           socket.MSG_DONTWAIT)
    except OSError:
        pass
