"""Gunicorn's stock gevent worker, with what a collector facing the internet needs on top.

``CollectorWorker`` is ``gunicorn.workers.ggevent.GeventWorker`` (a greenlet per connection:
a slow client holds no thread, only one of ``worker-connections`` places) and adds, each
through one of its public methods:

* deadlines (``timeout_ctx``, ``handle_request``): a TLS handshake and each request head must
  arrive within ``header-timeout`` of the connection's start or of the previous answer, or the
  connection is closed; a body must arrive within ``request-timeout`` and at
  ``min-upload-rate`` at least (after BODY_GRACE), or it gets a 408 and the connection closes.
  Processing after the body is read is never cut off;
* open connections capped per client address (IPv6: per /64) and per network (/24, /48) in
  each worker (``handle``), so a few networks cannot take the places every client shares;
  only when ``proxy-hops`` is 0, since behind a proxy every peer is the proxy;
* a declared chunk larger than ``max-report-size`` on POST /report refused with 413 at once;
* JSON instead of gunicorn's HTML for malformed HTTP (``handle_error``): a fixed message per
  kind of error, never the client's input, and logs with a reason code, never an address;
* what it refuses counted in ``tt_reports_rejected_total`` like the app's refusals:
  ``connection_refused``, ``slow_client_cut``, ``too_large``, ``malformed_http``,
  ``tls_error``, ``internal_error``;
* an answer leaves in one TCP segment where it fits (``handle_request`` corks the socket while
  gunicorn writes the status line and headers, then the body): two sends a response cost
  about a sixth of a report's CPU here (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import signal
import socket
import ssl
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import gevent
from gunicorn.http import errors as http_errors
from gunicorn.http.body import ChunkedReader
from gunicorn.workers.ggevent import GeventWorker

from .. import metrics
from ..web.errors import error_body

log = logging.getLogger(__name__)

BODY_GRACE = 2.0  # seconds of a body's upload that min-upload-rate does not count
BODY_STEP = 4096  # bytes a body is read in at most, each step with its own deadline
IDLE_GRACE = 1.0  # seconds a stopping worker still waits for requests on open connections

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


class Refused(BaseException):
    """A request the worker answers itself (408 slow body, 413 declared chunk). Not an
    Exception: raised inside the app's body read, it must pass the app's error handling
    and reach ``handle_error`` untouched. ``code`` is the reason code (logged and counted),
    ``detail`` what the log adds to it."""

    def __init__(self, status: int, message: str, code: str, detail: str) -> None:
        super().__init__(code)
        self.status, self.message, self.code, self.detail = status, message, code, detail


def http_error(exc: BaseException) -> tuple[int, str]:
    """Status and fixed message for an error met outside the app."""
    if isinstance(exc, Refused):
        return exc.status, exc.message
    for kind, status, message in _HTTP_ERRORS:
        if isinstance(exc, kind):
            return status, message
    return 500, "internal error, retry later"


def error_response(status: int, message: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 response with the JSON error body; the connection closes."""
    body = json.dumps(error_body(message)).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "Connection: close\r\n"
            + (f"Retry-After: {retry_after}\r\n" if retry_after is not None else "") +
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class ConnectionLimits:
    """Open connections per client (address, IPv6 /64) and per network (/24, /48).

    Counted in this worker's memory while a connection is open, by address prefix (never
    logged, dropped when its last connection closes); a cap of 0 is off."""

    def __init__(self, per_client: int, per_network: int) -> None:
        self.per_client, self.per_network = per_client, per_network
        self.clients: Counter[bytes] = Counter()
        self.networks: Counter[bytes] = Counter()

    @staticmethod
    def keys(addr: Any) -> tuple[bytes, bytes] | None:
        """The client's and its network's key, None for a peer without an IP address."""
        try:
            ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
        except (TypeError, ValueError, IndexError):
            return None
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        packed = ip.packed
        if ip.version == 4:
            return packed, packed[:3]
        return packed[:8], packed[:6]  # 8 and 6 bytes: never equal to an IPv4 key

    def open(self, addr: Any) -> tuple[bytes, bytes] | None | bool:
        """Count a new connection: its keys (give them to ``close``), None when not counted,
        False when its client or network already holds its share."""
        keys = self.keys(addr) if self.per_client or self.per_network else None
        if keys is None:
            return None
        client, network = keys
        if (self.per_client and self.clients[client] >= self.per_client) or \
                (self.per_network and self.networks[network] >= self.per_network):
            return False
        self.clients[client] += 1
        self.networks[network] += 1
        return keys

    def close(self, keys: tuple[bytes, bytes]) -> None:
        client, network = keys
        for counter, key in ((self.clients, client), (self.networks, network)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]


class TimedBody:
    """A request body (wsgi.input) that must arrive by ``deadline`` and, after BODY_GRACE, at
    ``rate`` bytes a second at least (0: no rate); a read past either raises Refused(408)."""

    def __init__(self, body: Any, deadline: float, rate: float, length: int | None) -> None:
        self.body, self.deadline, self.rate, self.left = body, deadline, rate, length
        self.started = time.monotonic()
        self.received = 0

    def _timed(self, name: str, size: int | None, expected: int) -> Any:
        deadline = self.deadline
        if self.rate:
            deadline = min(deadline, self.started + BODY_GRACE
                           + (self.received + expected) / self.rate)
        left = deadline - time.monotonic()
        if left <= 0:
            raise _slow_body()
        with gevent.Timeout(left, _slow_body()):
            data = getattr(self.body, name)(size)
        self.received += len(data)
        if self.left is not None:
            self.left -= len(data)
        return data

    def read(self, size: int | None = None) -> bytes:
        """Up to ``size`` bytes (all with None), read BODY_STEP at a time."""
        wanted = size if size is not None and size >= 0 else None
        pieces: list[bytes] = []
        while wanted is None or wanted > 0:
            step = BODY_STEP if wanted is None else min(BODY_STEP, wanted)
            expected = step if self.left is None else min(step, self.left)
            piece = self._timed("read", step, expected) if expected else b""
            pieces.append(piece)
            if wanted is not None:
                wanted -= len(piece)
            if len(piece) < step:
                break
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def readline(self, size: int | None = None) -> bytes:
        return self._timed("readline", size, 1)

    def readlines(self, size: int | None = None) -> list[bytes]:
        lines = []
        while line := self.readline():
            lines.append(line)
        return lines

    def __iter__(self) -> Any:
        return iter(self.readline, b"")


def _slow_body() -> Refused:
    return Refused(408, "the request took too long to arrive", "slow_client_cut", "body")


def _chunk_limit(reader: ChunkedReader, limit: int) -> None:
    """Refuse a chunk declared larger than ``limit`` as soon as its size line is read."""
    parse = reader.parse_chunk_size

    def parse_chunk_size(unreader: Any, data: bytes | None = None) -> tuple[int, Any]:
        size, rest = parse(unreader, data)
        if size > limit:
            raise Refused(413, f"the report is larger than {limit} bytes", "too_large", "chunk")
        return size, rest

    reader.parse_chunk_size = parse_chunk_size


class HeadDeadline(gevent.Timeout):
    """``header-timeout`` for a request head, silent (the connection closes), which a
    stopping worker can end at once for connections waiting between requests."""

    def __init__(self, seconds: float, waiting: set[HeadDeadline]) -> None:
        super().__init__(seconds, False)
        self.waiting = waiting
        self.greenlet: Any = None

    def __enter__(self) -> HeadDeadline:
        self.greenlet = gevent.getcurrent()
        self.waiting.add(self)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> bool:
        self.waiting.discard(self)
        return super().__exit__(*exc)

    def end(self) -> None:
        """Expire now: the waiting connection closes as if its deadline had passed."""
        if self in self.waiting:
            gevent.kill(self.greenlet, self)


class CollectorWorker(GeventWorker):
    """gevent worker with deadlines, connection caps per network and JSON error answers."""

    header_timeout = 10.0
    request_timeout = 30.0
    min_upload_rate = 0.0
    max_report_size: int | None = None
    connections = ConnectionLimits(0, 0)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting: set[HeadDeadline] = set()  # connections waiting for a request head

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
        # (delivery.RelayHTTP), and the server's TLS context is made per process
        # (autotls.ReloadingSSLContext).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Monkey-patching ssl after ssl",
                                    category=Warning)
            super().patch()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        services = getattr(self.wsgi, "extensions", {}).get("tunnel_telemetry")
        config = getattr(services, "config", None)
        if config is None:
            return
        self.header_timeout = config.header_timeout
        self.request_timeout = config.request_timeout
        self.min_upload_rate = config.min_upload_rate
        self.max_report_size = config.max_report_size
        if config.proxy_hops == 0:  # behind a proxy, every peer is the proxy
            self.connections = ConnectionLimits(config.max_connections_per_client,
                                                config.max_connections_per_network)

    def timeout_ctx(self) -> Any:
        """The deadline for the next request head: the connection closes silently after it."""
        return HeadDeadline(self.header_timeout, self.waiting)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """Stop gracefully: requests in progress finish (up to graceful-timeout), connections
        waiting for a request are closed after IDLE_GRACE (one on its way is still served)."""
        super().handle_exit(sig, frame)
        gevent.spawn_later(IDLE_GRACE, lambda: [wait.end() for wait in list(self.waiting)])

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        keys = self.connections.open(addr)
        if keys is False:
            log.info("connection_refused: too many from one network")
            metrics.rejected("connection_refused")
            _answer_and_close(client, 429, "too many open connections from your network",
                              retry_after=1)
            return
        try:
            if isinstance(client, ssl.SSLSocket) and not self._handshake(client):
                client.close()
                return
            super().handle(listener, client, addr)
        finally:
            if keys:
                self.connections.close(keys)

    def _handshake(self, client: Any) -> bool:
        """A TLS handshake within header-timeout (the socket comes unshaken: autotls)."""
        with gevent.Timeout(self.header_timeout, False):
            try:
                client.do_handshake()
                return True
            except (OSError, ValueError):
                return False
        log.info("slow_client_cut tls")
        metrics.rejected("slow_client_cut")
        return False

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        if isinstance(req.body.reader, ChunkedReader) and req.path == "/report" \
                and self.max_report_size:
            _chunk_limit(req.body.reader, self.max_report_size)
        length = next((int(value) for name, value in req.headers
                       if name == "CONTENT-LENGTH"), None)
        req.body = TimedBody(req.body, time.monotonic() + self.request_timeout,
                             self.min_upload_rate, length)
        with corked(sock):
            return super().handle_request(listener_name, req, sock, addr)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        status, message = http_error(exc)
        # A reason code only: gunicorn's own message quotes the client's address and input.
        if isinstance(exc, Refused):
            log.info("%s %s", exc.code, exc.detail)
            metrics.rejected(exc.code)
        elif status >= 500:
            self.log.error("http error: %s", type(exc).__name__)
            metrics.rejected("internal_error")
        else:
            self.log.info("rejected http: %s", type(exc).__name__)
            metrics.rejected("tls_error" if isinstance(exc, ssl.SSLError) else "malformed_http")
        _answer_and_close(client, status, message)


@contextlib.contextmanager
def corked(sock: socket.socket) -> Iterator[None]:
    """Hold back partial TCP segments until the block ends (Linux's TCP_CORK; elsewhere, or
    on a socket that is not TCP, nothing changes)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


def _answer_and_close(sock: Any, status: int, message: str,
                      retry_after: int | None = None) -> None:
    """Best effort, never waiting long: the client may be slow or gone."""
    try:
        sock.settimeout(1.0)
        sock.sendall(error_response(status, message, retry_after))
    except (OSError, ValueError):
        pass
    finally:
        sock.close()
