"""Logging that cannot leak addresses: every record's text has IP addresses redacted."""

from __future__ import annotations

import logging
import sys

from .pipeline.scrub import scrub_text

_HANDLER_NAME = "tunnel_telemetry"
REDACTED_ATTR = "tt_redacted"  # set (via ``extra``) on a record whose text was built redacted


class RedactingFilter(logging.Filter):
    """Replace IP addresses in a record's final message (args included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, REDACTED_ATTR, False) and not record.args:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken log call must not break the request
            message = str(record.msg)
        redacted = scrub_text(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_text is None:
            record.exc_text = scrub_text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def setup_logging(debug: bool = False) -> None:
    """Send application logs to stderr through the redacting filter (once per process)."""
    # Our formats name the process, never a thread, a function or a line: skip collecting
    # those (the logging HOWTO's "Optimization"); a gevent worker would otherwise make a
    # thread object for every connection's greenlet that logs.
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    for handler in root.handlers:
        if handler.get_name() == _HANDLER_NAME:
            break
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"))
        root.addHandler(handler)
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    logging.getLogger("tunnel_telemetry").setLevel(logging.DEBUG if debug else logging.INFO)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
