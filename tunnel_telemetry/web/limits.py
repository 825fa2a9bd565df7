"""Abuse controls: a per-client rate limit (the ``limits`` library) and in-flight caps.

The rate limit is a sliding window counter in the storage named by rate-limit-storage:
``memory://`` (the default) counts in each worker process alone, so a client gets up to
``workers`` times the budget; ``redis://`` or ``memcached://`` holds one count for every
worker and instance using it. When that storage does not answer, requests are let in (and a
warning is logged): an outage of the limiter must not stop the collector.

The in-flight caps count requests in progress in this worker process: a count kept in a
shared store would be left too high by every worker killed mid-request.

A client is known only by a keyed hash: HMAC-SHA256 of its address (IPv6: its /64) under
rate-limit-key, or a random key made at start-up (in the gunicorn master, before the fork,
so all workers share it) and held only in memory. No address reaches the storage.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from limits import RateLimitItemPerSecond
from limits.errors import ConfigurationError, StorageError
from limits.storage import Storage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from ..config import Config, ConfigError
from ..errors import Busy

if TYPE_CHECKING:
    from flask import Flask, Request
    from werkzeug.local import LocalProxy

    from .proxy import Address

log = logging.getLogger(__name__)

STORAGE_TIMEOUT = 0.5  # seconds a shared storage may take to connect or answer (URL can override)
SKIP_AFTER_FAILURE = 5.0  # seconds requests go in unchecked after the storage failed to answer
WARN_EVERY = 60.0  # seconds between two warnings that the storage does not answer
GLOBAL = ""  # the key of the whole process's in-flight count


class Slots:
    """Requests in progress in this process: at most ``cap`` per key."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def enter(self, key: str = GLOBAL) -> bool:
        with self._lock:
            if self._counts[key] >= self.cap:
                return False
            self._counts[key] += 1
            return True

    def leave(self, key: str = GLOBAL) -> None:
        with self._lock:
            self._counts[key] -= 1
            if self._counts[key] <= 0:
                del self._counts[key]

    def count(self, key: str = GLOBAL) -> int:
        return self._counts[key]


def open_storage(url: str) -> Storage:
    """The ``limits`` storage for ``url`` (connections are made on first use)."""
    scheme = url.split(":", 1)[0]
    options: dict[str, Any] = {}
    if scheme.startswith("redis"):
        options = {"socket_connect_timeout": STORAGE_TIMEOUT, "socket_timeout": STORAGE_TIMEOUT}
    elif scheme == "memcached":
        options = {"connect_timeout": STORAGE_TIMEOUT, "timeout": STORAGE_TIMEOUT}
    try:
        storage = storage_from_string(url, wrap_exceptions=True, **options)
    except (ConfigurationError, ValueError, TypeError) as exc:  # never the URL: a password
        raise ConfigError(f"rate-limit-storage: {type(exc).__name__}: cannot use this "
                          f"{scheme}:// URL") from None
    if not isinstance(storage, Storage):  # an async+ storage: the limiter here is synchronous
        raise ConfigError(f"rate-limit-storage: cannot use an asynchronous {scheme}:// storage")
    return storage


@dataclass
class Ticket:
    """What admit() took for one request, given back by release()."""

    client: str
    global_slot: bool = False
    client_slot: bool = False


class Limits:
    """The abuse controls of one collector; each part is None when its option is 0."""

    def __init__(self, config: Config) -> None:
        key = config.rate_limit_key
        self._key = key.encode() if key else secrets.token_bytes(32)
        self.storage: Storage | None = None
        self.limiter: SlidingWindowCounterRateLimiter | None = None
        self.item: RateLimitItemPerSecond | None = None
        if config.rate_limit:
            # At most `burst` requests in a window of burst/rate minutes: `rate` a minute in
            # the long run, `burst` at once.
            window = max(1, round(60 * config.rate_limit_burst / config.rate_limit))
            self.item = RateLimitItemPerSecond(config.rate_limit_burst, window)
            self.storage = open_storage(config.rate_limit_storage)
            self.limiter = SlidingWindowCounterRateLimiter(self.storage)
        self.inflight = Slots(config.max_in_flight) if config.max_in_flight else None
        self.client_inflight = Slots(config.max_in_flight_per_client) \
            if config.max_in_flight_per_client else None
        self._warned = -WARN_EVERY
        self._down_until = 0.0

    def client_key(self, ip: Address | str | None) -> str:
        """A keyed hash of the client address (an ``ipaddress`` object or text; IPv6: its /64),
        as 16 hex digits."""
        address: Address | None
        if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            address = ip
        else:
            try:
                address = ipaddress.ip_address(ip or "")
            except ValueError:
                address = None
        if address is None:
            raw = b"?"
        else:
            if address.version == 6 and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            raw = b"4" + address.packed if address.version == 4 else b"6" + address.packed[:8]
        return hmac.digest(self._key, raw, "sha256")[:8].hex()

    def check_storage(self) -> None:
        """Warn at start-up when a shared storage does not answer (requests are let in)."""
        if self.storage is not None and not self.storage.check():
            self._storage_failed()

    def _storage_failed(self) -> None:
        """Let requests in unchecked for a while: a hung storage costs one timeout per
        SKIP_AFTER_FAILURE, not one per request."""
        now = time.monotonic()
        self._down_until = now + SKIP_AFTER_FAILURE
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning("rate_limit_storage_unavailable: rate-limit-storage does not answer; "
                        "requests are not rate limited until it does")

    def _rate_wait(self, client: str) -> float:
        """0 when ``client`` may send one more request now (counted), else seconds to wait."""
        limiter, item = self.limiter, self.item
        if limiter is None or item is None or (
                self._down_until and time.monotonic() < self._down_until):
            return 0.0
        try:
            if limiter.hit(item, "report", client):
                return 0.0
            reset = limiter.get_window_stats(item, "report", client).reset_time
        except (StorageError, OSError):  # OSError: pymemcache's are not all wrapped
            self._storage_failed()
            return 0.0
        return max(1.0, reset - time.time())

    def admit(self, ip: Address | str | None, per_client: bool = True) -> Ticket:
        """Let a request in, or raise Busy (429 for this client, 503 for everyone).

        ``per_client=False`` applies the global cap only (authenticated collector traffic).
        """
        ticket = Ticket(self.client_key(ip))
        if per_client and self.client_inflight is not None:
            if not self.client_inflight.enter(ticket.client):
                raise Busy("client_busy", "too many requests in progress from this address",
                           retry_after=1)
            ticket.client_slot = True
        if self.inflight is not None:
            if not self.inflight.enter():
                self.release(ticket)
                raise Busy("busy", "the collector is busy, retry later", retry_after=2)
            ticket.global_slot = True
        if per_client and self.limiter is not None:
            wait = self._rate_wait(ticket.client)
            if wait > 0:
                self.release(ticket)
                raise Busy("rate_limited", "too many reports from this address, retry later",
                           retry_after=wait)
        return ticket

    def release_client(self, ticket: Ticket) -> None:
        """The body is in: a client's slot guards uploads, not the processing that follows
        (relay waits, store contention), which many clients behind one NAT may share."""
        if ticket.client_slot and self.client_inflight is not None:
            self.client_inflight.leave(ticket.client)
            ticket.client_slot = False

    def release(self, ticket: Ticket) -> None:
        self.release_client(ticket)
        if ticket.global_slot and self.inflight is not None:
            self.inflight.leave()
            ticket.global_slot = False


def build_limits(config: Config) -> Limits:
    """The abuse controls for this configuration (a bad storage URL: ConfigError)."""
    limits = Limits(config)
    limits.check_storage()
    return limits


def init_app(app: Flask, limits: Limits) -> None:
    """Admit every POST through ``limits`` before its body is read; release it afterwards.

    The per-client limits apply to POST /report, the public endpoint; POST /relay carries a
    primary collector's token (checked before its body is read) and counts against the
    in-flight cap only, so one primary draining a backlog is not throttled as a client.
    """
    from flask import request

    from .proxy import ENVIRON_KEY

    @app.before_request
    def _admit() -> None:
        req = cast("LocalProxy[Request]", request)._get_current_object()
        if req.method == "POST":
            environ = req.environ
            environ[TICKET_KEY] = limits.admit(environ.get(ENVIRON_KEY),
                                               per_client=req.path == "/report")
            environ[LIMITS_KEY] = limits

    @app.teardown_request
    def _release(exc: BaseException | None) -> None:
        ticket = request.environ.pop(TICKET_KEY, None)
        if ticket is not None:
            limits.release(ticket)


TICKET_KEY = "tunnel_telemetry.ticket"  # what admit() took for this request (WSGI environ)
LIMITS_KEY = "tunnel_telemetry.limits"


def body_read(environ: dict[str, Any]) -> None:
    """Called once the request body is read: give back the client's slot."""
    ticket = environ.get(TICKET_KEY)
    if ticket is not None:
        environ[LIMITS_KEY].release_client(ticket)
