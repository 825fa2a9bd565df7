"""The outcome of one relay attempt, the HTTP transport and how its failures are classified.

Shared by the OONI client and the collector-to-collector sender so that both follow the
same rules: connection errors, timeouts, 5xx and 429 are worth retrying (429 after its
``Retry-After``); any other 4xx is permanent.  Requests go out over urllib3 directly
(``RelayHTTP``): requests' per-call work (environment proxies, netrc, cookie and setting
merges) cost about three times the CPU of the HTTP exchange itself.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import urllib3
import urllib3.exceptions

DELIVERED, PENDING, FAILED, SKIPPED, EXPIRED = (
    "delivered", "pending", "failed", "skipped", "expired",
)
MAX_RETRY_AFTER = 24 * 3600.0
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


@dataclass(frozen=True)
class Outcome:
    """What happened to one report at one destination.

    ``state`` is the relay-queue state to record (delivered, pending = retry later, failed =
    permanent, skipped = never sent); ``reason`` is a short code for logs and responses;
    ``detail`` the secondary's own one-line explanation, if any.
    """

    state: str
    reason: str
    detail: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        """True when the report should be tried again later."""
        return self.state == PENDING

    @classmethod
    def delivered(cls, **result: Any) -> Outcome:  # noqa: ANN401
        """A success, with what the secondary returned (e.g. ``measurement_uid``)."""
        return cls(DELIVERED, "ok", result=result)

    @classmethod
    def retry(cls, reason: str, detail: str = "", retry_after: float | None = None) -> Outcome:
        """A failure worth retrying."""
        return cls(PENDING, reason, detail, retry_after=retry_after)

    @classmethod
    def failed(cls, reason: str, detail: str = "") -> Outcome:
        """A permanent failure: the report is kept but never sent there again."""
        return cls(FAILED, reason, detail)

    @classmethod
    def skipped(cls, reason: str) -> Outcome:
        """Not sent on purpose (the secondary would drop it, or already has it)."""
        return cls(SKIPPED, reason)

    def describe(self) -> str:
        """One line for logs and the store's error column: reason, then detail."""
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def one_line(text: object, limit: int = 200) -> str:
    """Make ``text`` safe for a log line or a response: printable ASCII, bounded length."""
    return _UNPRINTABLE.sub(" ", str(text)).strip()[:limit]


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def response_json(resp: urllib3.BaseHTTPResponse) -> Any:  # noqa: ANN401 - any JSON value
    """The answer's body as JSON; ValueError when it is not (UTF-8) JSON."""
    return json.loads(resp.data)


def response_detail(resp: urllib3.BaseHTTPResponse) -> str:
    """The secondary's explanation from a JSON error body (``detail`` or ``msg``), if any."""
    try:
        body = response_json(resp)
    except ValueError:
        return ""
    if isinstance(body, dict):
        for key in ("detail", "msg", "error", "message"):
            if isinstance(body.get(key), str):
                return one_line(body[key])
    return ""


def classify_response(resp: urllib3.BaseHTTPResponse) -> Outcome | None:
    """None for a 2xx answer, else the failure's Outcome (retry or permanent)."""
    status = resp.status
    if 200 <= status < 300:
        return None
    detail = response_detail(resp)
    if status == 429:
        return Outcome.retry("rate-limited", detail,
                             parse_retry_after(resp.headers.get("Retry-After")))
    if status >= 500:
        return Outcome.retry(f"http-{status}", detail,
                             parse_retry_after(resp.headers.get("Retry-After")))
    if 400 <= status < 500:
        return Outcome.failed(f"http-{status}", detail)
    return Outcome.retry(f"http-{status}", detail)  # 1xx / 3xx: not an answer we understand


class DeadlineReached(urllib3.exceptions.TimeoutError):
    """The attempt's time budget is spent before the next HTTP call."""


class BodyError(urllib3.exceptions.HTTPError):
    """The request body cannot be encoded as JSON (e.g. NaN)."""


# What a RelayHTTP call may raise for network or protocol trouble (classify_exception's input).
HTTP_ERRORS = (urllib3.exceptions.HTTPError, OSError)


def classify_exception(exc: BaseException) -> Outcome:
    """Network-level failures are always retried: timeouts, connection trouble (refused, reset,
    TLS verification, proxy), anything else as ``request-error``."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    # NewConnectionError derives from ConnectTimeoutError in urllib3: test it first.
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return Outcome.retry("connection-error")
    if isinstance(exc, urllib3.exceptions.TimeoutError | socket.timeout | TimeoutError):
        return Outcome.retry("timeout")
    if isinstance(exc, urllib3.exceptions.SSLError | urllib3.exceptions.ProtocolError
                  | urllib3.exceptions.ProxyError | OSError):
        return Outcome.retry("connection-error")
    return Outcome.retry("request-error", one_line(type(exc).__name__))


def json_body(value: Any) -> bytes:  # noqa: ANN401 - any JSON-able value
    """``value`` as a compact JSON request body (BodyError when it is not JSON-able)."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise BodyError(type(e).__name__) from None


class RelayHTTP:
    """POSTs to one secondary over keep-alive connections, thread-safe.

    No retries and no redirects (the relay has its own retry logic; a 3xx is an answer
    we do not understand, retried later); TLS is verified against the CA bundle requests
    would use (``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE``, else certifi's); a proxy named
    by the environment for ``base_url`` (``HTTPS_PROXY``, ``NO_PROXY``, ...) is used as
    requests did.  Keeps up to ``pool_size`` connections per host.

    Connections are made per process, on first use: none is shared with a forked worker, and
    in a gevent worker the TLS context comes from the ``ssl`` module as patched there (a
    context made before the patch would block the whole worker on every read).
    """

    def __init__(self, base_url: str, pool_size: int,
                 headers: Mapping[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Accept": "*/*", "Content-Type": "application/json",
                        **(headers or {})}
        self._kwargs: dict[str, Any] = {"maxsize": pool_size, "block": False, "retries": False}
        self._tls = urllib.parse.urlsplit(self.base_url).scheme == "https"
        if self._tls:
            self._kwargs.update(_ca_options())
        self._proxy = environment_proxy(self.base_url)
        self._prefix = urllib.parse.urlsplit(self.base_url).path
        self._pid: int | None = None
        self.manager: urllib3.PoolManager | None = None
        self.pool: urllib3.HTTPConnectionPool | None = None

    def _connect(self) -> None:
        """This process's connection pool (or proxy manager)."""
        kwargs = dict(self._kwargs)
        if self._tls:
            kwargs["ssl_context"] = _tls_context(kwargs.pop("ca_certs", None),
                                                 kwargs.pop("ca_cert_dir", None))
        proxy = self._proxy
        if proxy is None:
            # One host: its connection pool, without a manager's per-call URL parsing.
            self.pool = urllib3.connection_from_url(self.base_url, **kwargs)
        elif proxy.lower().startswith("socks"):
            from urllib3.contrib.socks import SOCKSProxyManager  # needs PySocks, as requests

            self.manager = SOCKSProxyManager(proxy, num_pools=4, **kwargs)
        else:
            self.manager = urllib3.ProxyManager(proxy, num_pools=4, **kwargs)
        self._pid = os.getpid()

    def post(self, path: str, body: bytes | None,
             timeout: tuple[float, float]) -> urllib3.BaseHTTPResponse:
        """POST ``body`` (JSON) to ``base_url + path``; the whole answer is read.

        Raises one of HTTP_ERRORS for network trouble (see classify_exception).
        """
        if self._pid != os.getpid():
            self._connect()
        options = {"body": body, "headers": self.headers, "retries": False, "redirect": False,
                   "preload_content": True,
                   "timeout": urllib3.Timeout(connect=timeout[0], read=timeout[1])}
        if self.pool is not None:
            return self.pool.urlopen("POST", self._prefix + path, **options)
        return self.manager.urlopen("POST", self.base_url + path, **options)

    def close(self) -> None:
        """Close every kept-alive connection of this process."""
        if self._pid != os.getpid():
            return
        if self.pool is not None:
            self.pool.close()
        if self.manager is not None:
            self.manager.clear()


def _tls_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    """A verifying client TLS context made from ``ssl`` as it is now (gevent's, once the
    worker patched it), with the CA bundle loaded once (not on every new connection)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile or capath:
        context.load_verify_locations(cafile=cafile, capath=capath)
    else:
        context.load_default_certs()
    return context


def _ca_options() -> dict[str, str]:
    """The CA bundle requests verifies against: its environment variables, else certifi's."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if not bundle:
        try:
            import certifi
        except ImportError:  # urllib3 then uses the system's CA store
            return {"cert_reqs": "CERT_REQUIRED"}
        bundle = certifi.where()
    key = "ca_cert_dir" if os.path.isdir(bundle) else "ca_certs"
    return {"cert_reqs": "CERT_REQUIRED", key: bundle}


def environment_proxy(url: str) -> str | None:
    """The proxy URL the environment names for ``url`` (None: connect directly).

    Read once per sender, where requests looked at the environment on every call.
    """
    try:
        import requests.utils
    except ImportError:
        return None
    proxies = requests.utils.get_environ_proxies(url)
    return requests.utils.select_proxy(url, proxies) if proxies else None


class Deadline:
    """A time budget shared by the HTTP calls of one attempt."""

    def __init__(self, seconds: float | None, cap: float) -> None:
        self.cap = cap
        self.end = None if seconds is None else time.monotonic() + seconds

    def timeout(self) -> tuple[float, float]:
        """(connect, read) timeouts for the next call: together at most ``cap`` and what is
        left of the budget; raises DeadlineReached when the budget is spent."""
        left = self.cap
        if self.end is not None:
            left = min(left, self.end - time.monotonic())
            if left <= 0.002:
                raise DeadlineReached("relay deadline reached")
        connect = min(left / 2, 10.0)
        return connect, left - connect
