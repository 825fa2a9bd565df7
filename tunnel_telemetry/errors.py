"""Errors carry a short reason code; ``web.errors`` turns them into HTTP answers in one place."""

from __future__ import annotations


class CollectorError(Exception):
    """A request the collector does not complete. ``code`` is logged, ``msg`` shown."""

    def __init__(self, code: str, msg: str, errors: list[dict[str, str]] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.msg = msg
        self.errors = errors or []
        self.retry_after = retry_after


class ReportError(CollectorError):
    """The request's fault (bad body, bad report, bad token): sending it again will not help."""


class Busy(CollectorError):
    """Over a limit (one client's, or the whole collector's): retry after ``retry_after``."""


class StoreUnavailable(CollectorError):
    """The report could not be stored durably: the client should retry."""

    def __init__(self, code: str = "store_unavailable", retry_after: float = 5) -> None:
        super().__init__(code, "the report could not be stored, retry later",
                         retry_after=retry_after)
