"""Gunicorn worker for the collector: gthread, but every error it writes itself is JSON.

Gunicorn answers malformed HTTP (bad request line, oversized headers, bad chunking) before
the app runs, with an HTML page naming the offending input. SPEC promises JSON errors and
no echo of client input, so this worker writes ``{"ok": false, ...}`` with a fixed message.
"""

from __future__ import annotations

import json
import ssl
from http import HTTPStatus
from typing import Any

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

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


class CollectorWorker(ThreadWorker):
    """gthread worker whose own error answers are JSON and whose logs name no client."""

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
