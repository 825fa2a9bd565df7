"""The outcome of one relay attempt and how HTTP failures are classified.

Shared by the OONI client and the collector-to-collector sender so that both follow the
same rules: connection errors, timeouts, 5xx and 429 are worth retrying (429 after its
``Retry-After``); any other 4xx is permanent.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import requests

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


def response_detail(resp: requests.Response) -> str:
    """The secondary's explanation from a JSON error body (``detail`` or ``msg``), if any."""
    try:
        body = resp.json()
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
                             parse_retry_after(resp.headers.get("Retry-After")))
    if status >= 500:
        return Outcome.retry(f"http-{status}", detail,
                             parse_retry_after(resp.headers.get("Retry-After")))
    if 400 <= status < 500:
        return Outcome.failed(f"http-{status}", detail)
    return Outcome.retry(f"http-{status}", detail)  # 1xx / 3xx: not an answer we understand


def classify_exception(exc: requests.RequestException) -> Outcome:
    """Network-level failures are always retried."""
    if isinstance(exc, requests.Timeout):
        return Outcome.retry("timeout")
    if isinstance(exc, requests.ConnectionError):
        return Outcome.retry("connection-error")
    return Outcome.retry("request-error", one_line(type(exc).__name__))


class Deadline:
    """A time budget shared by the HTTP calls of one attempt."""

    def __init__(self, seconds: float | None, cap: float) -> None:
        self.cap = cap
        self.end = None if seconds is None else time.monotonic() + seconds

    def timeout(self) -> tuple[float, float]:
        """(connect, read) timeouts for the next call: together at most ``cap`` and what is
        left of the budget; raises Timeout when the budget is spent."""
        left = self.cap
        if self.end is not None:
            left = min(left, self.end - time.monotonic())
            if left <= 0.002:
                raise requests.Timeout("relay deadline reached")
        connect = min(left / 2, 10.0)
        return connect, left - connect
