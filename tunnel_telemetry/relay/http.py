"""The relay's HTTP: one keep-alive session per destination and process, and how its answers
and failures become Outcomes.

Shared by the OONI client and the collector-to-collector sender so that both follow the same
rules: connection errors, timeouts, 5xx and 429 are worth retrying (after ``Retry-After``);
any other 4xx is permanent. No retries inside a call and no redirects: the relay queue
retries, durably, and a 3xx is an answer the relay does not understand (retried later).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import requests
import urllib3.exceptions

from .. import httpclient
from .outcome import Outcome, one_line


class DeadlineReached(urllib3.exceptions.TimeoutError):
    """The attempt's time budget is spent before the next HTTP call."""


class BodyError(urllib3.exceptions.HTTPError):
    """The request body cannot be encoded as JSON (e.g. NaN)."""


MAX_PREPARED = 256  # POST paths prepared per destination and process (one per OONI report id)
# What a RelayHTTP call may raise for network or protocol trouble (classify_exception's input).
HTTP_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


def sent_without_answer(exc: BaseException) -> bool:
    """True when the request went out and no answer came in time (the destination may have
    acted on it): a read timeout, not a connect timeout or a spent budget."""
    if isinstance(exc, requests.ReadTimeout):
        return True
    if isinstance(exc, requests.RequestException) and exc.args:
        exc = exc.args[0] if isinstance(exc.args[0], BaseException) else exc
    return isinstance(exc, urllib3.exceptions.ReadTimeoutError)


def classify_exception(exc: BaseException) -> Outcome:
    """Network-level failures are always retried: timeouts, connection trouble (refused, reset,
    TLS verification, proxy), anything else as ``request-error``."""
    if isinstance(exc, requests.Timeout):  # ConnectTimeout, ReadTimeout
        return Outcome.retry("timeout")
    if isinstance(exc, requests.RequestException) and exc.args and isinstance(
            exc.args[0], BaseException):
        exc = exc.args[0]  # requests wraps urllib3's error
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    # NewConnectionError derives from ConnectTimeoutError in urllib3: test it first.
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return Outcome.retry("connection-error")
    if isinstance(exc, urllib3.exceptions.TimeoutError | socket.timeout | TimeoutError):
        return Outcome.retry("timeout")
    if isinstance(exc, urllib3.exceptions.SSLError | urllib3.exceptions.ProtocolError
                  | urllib3.exceptions.ProxyError | requests.ConnectionError | OSError):
        return Outcome.retry("connection-error")
    return Outcome.retry("request-error", one_line(type(exc).__name__))


def response_json(resp: requests.Response) -> Any:  # noqa: ANN401 - any JSON value
    """The answer's body as JSON; ValueError when it is not (UTF-8) JSON."""
    return json.loads(resp.content)


def response_detail(resp: requests.Response) -> str:
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


def classify_response(resp: requests.Response) -> Outcome | None:
    """None for a 2xx answer, else the failure's Outcome (retry or permanent)."""
    status = resp.status_code
    if 200 <= status < 300:
        return None
    detail = response_detail(resp)
    if status == 429:
        return Outcome.retry("rate-limited", detail,
                             httpclient.parse_retry_after(resp.headers.get("Retry-After")))
    if status >= 500:
        return Outcome.retry(f"http-{status}", detail,
                             httpclient.parse_retry_after(resp.headers.get("Retry-After")))
    if 400 <= status < 500:
        return Outcome.failed(f"http-{status}", detail)
    return Outcome.retry(f"http-{status}", detail)  # 1xx / 3xx: not an answer we understand


def json_body(value: Any) -> bytes:  # noqa: ANN401 - any JSON-able value
    """``value`` as a compact JSON request body (BodyError when it is not JSON-able)."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise BodyError(type(e).__name__) from None


class RelayHTTP:
    """Requests to one secondary over keep-alive connections (``httpclient.session``),
    thread-safe; up to ``pool_size`` connections kept.

    The session is made per process on first use: no connection is shared with a forked
    worker, and the TLS context comes from ``ssl`` as the worker has it. A POST goes out as a
    copy of a request prepared once per path (``Session.send``): preparing and merging the
    session's settings on every call took about as much CPU as the exchange itself.
    """

    def __init__(self, base_url: str, pool_size: int,
                 headers: Mapping[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.pool_size = pool_size
        self.headers = {"Accept": "*/*", "Content-Type": "application/json", **(headers or {})}
        self._pid: int | None = None
        self._session: requests.Session | None = None
        self._prepared: dict[str, requests.PreparedRequest] = {}

    def _current(self) -> requests.Session:
        """This process's session (made on first use)."""
        if self._pid != os.getpid() or self._session is None:
            self._session = httpclient.session(self.base_url, pool_size=self.pool_size,
                                               headers=self.headers)
            self._prepared = {}
            self._pid = os.getpid()
        return self._session

    def _request(self, path: str, body: bytes | None) -> requests.PreparedRequest:
        """A POST of ``body`` to ``path``: a copy of the one prepared for the path."""
        template = self._prepared.get(path)
        if template is None:
            template = self._current().prepare_request(
                requests.Request("POST", self.base_url + path))
            if len(self._prepared) >= MAX_PREPARED:  # report ids change daily
                self._prepared = {}
            self._prepared[path] = template
        prepared = template.copy()
        prepared.prepare_body(body, None)
        return prepared

    def post(self, path: str, body: bytes | None,
             timeout: tuple[float, float]) -> requests.Response:
        """POST ``body`` (JSON) to ``base_url + path``; the whole answer is read.

        Raises one of HTTP_ERRORS for network trouble (see classify_exception).
        """
        session = self._current()
        return session.send(self._request(path, body), timeout=timeout, allow_redirects=False)

    def get(self, path: str, params: Mapping[str, str],
            timeout: tuple[float, float]) -> requests.Response:
        """GET ``base_url + path`` with a query (OONI's measurements API)."""
        return self._current().get(self.base_url + path, params=params, timeout=timeout,
                                   allow_redirects=False)

    def close(self) -> None:
        """Close every kept-alive connection of this process."""
        if self._pid == os.getpid() and self._session is not None:
            self._session.close()
            self._session = None


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
