"""The one map from an exception to an HTTP answer: JSON ``{"ok": false, "msg", "errors"}``."""

from __future__ import annotations

import logging
import math

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from .. import metrics
from ..errors import Busy, CollectorError, ReportError, StoreUnavailable

log = logging.getLogger(__name__)

# Reason codes whose answer is not 400 (the default for a ReportError).
STATUS_BY_CODE = {
    "content_type": 415,
    "content_encoding": 415,
    "too_large": 413,
    "unauthorized": 401,
    "dashboard_auth": 401,
    "rate_limited": 429,
    "client_busy": 429,
    "busy": 503,
}
EXTRA_HEADERS = {"unauthorized": {"WWW-Authenticate": 'Bearer realm="relay"'},
                 "dashboard_auth": {"WWW-Authenticate": 'Basic realm="dashboard"'},
                 "content_encoding": {"Accept-Encoding": "identity"}}


def status_of(exc: CollectorError) -> int:
    """The HTTP status for a collector error."""
    if isinstance(exc, StoreUnavailable):
        return 503
    if isinstance(exc, Busy):
        return STATUS_BY_CODE.get(exc.code, 503)
    return STATUS_BY_CODE.get(exc.code, 400)


def error_body(msg: str, errors: list[dict[str, str]] | None = None) -> dict:
    """The JSON error body of the protocol: ok, msg, errors."""
    return {"ok": False, "msg": msg, "errors": errors or []}


def answer(exc: CollectorError) -> Response:
    """The HTTP answer for a collector error."""
    response = jsonify(error_body(exc.msg, exc.errors))
    response.status_code = status_of(exc)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    response.headers.update(EXTRA_HEADERS.get(exc.code, {}))
    return response


def register(app: Flask) -> None:
    """Install the handlers: collector errors, HTTP errors (404, 405, 413...), the unexpected."""

    @app.errorhandler(CollectorError)
    def _collector_error(exc: CollectorError) -> Response:
        log.info("rejected: %s", exc.code)
        metrics.rejected(exc.code)
        return answer(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        if code == 413:  # werkzeug's own limit (MAX_CONTENT_LENGTH)
            metrics.rejected("too_large")
        reason = {413: "the report is too large"}.get(code, exc.name.lower())
        response = jsonify(error_body(reason))
        response.status_code = code
        if code == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.error("internal error: %s", type(exc).__name__)
        return jsonify(error_body("internal error, retry later")), 500


__all__ = ["ReportError", "answer", "error_body", "register", "status_of"]
