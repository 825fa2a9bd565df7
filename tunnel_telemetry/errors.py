"""Errors carry a short reason code; views turn them into a JSON answer in one place."""

from __future__ import annotations


class ReportError(Exception):
    """A request that cannot be accepted; ``code`` is logged, ``msg`` is shown to the client."""

    status = 400

    def __init__(
        self,
        code: str,
        msg: str,
        errors: list[dict[str, str]] | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(code)
        self.code = code
        self.msg = msg
        self.errors = errors or []
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON error body of SPEC: ok, msg, errors."""
        return {"ok": False, "msg": self.msg, "errors": self.errors}


class StoreUnavailable(ReportError):
    """The report could not be stored durably: the client should retry."""

    status = 503

    def __init__(self, code: str = "store_unavailable", retry_after: int = 5) -> None:
        super().__init__(code, "the report could not be stored, retry later",
                         headers={"Retry-After": str(retry_after)})
