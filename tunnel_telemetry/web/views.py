"""HTTP API: POST /report runs validate -> enrich -> scrub -> store -> relay, then answers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from .. import __version__, metrics
from ..errors import ReportError
from ..geo_update import health as geo_health
from ..pipeline.enrich import enrich
from ..pipeline.outline import SCHEMA as OUTLINE_SCHEMA
from ..pipeline.outline import is_outline, translate
from ..pipeline.scrub import scrub
from ..pipeline.validate import parse_json, validate
from ..protocol.schema import load_schema
from ..store import dumps
from .limits import body_read
from .proxy import ENVIRON_KEY
from .relayed import MAX_BATCH, check_token, receive_batch

if TYPE_CHECKING:
    from flask import Request
    from werkzeug.local import LocalProxy

    from . import Services

log = logging.getLogger(__name__)

bp = Blueprint("collector", __name__)

DECOY = """<!doctype html>
<html><head><meta charset="utf-8"><title>Welcome</title></head>
<body><h1>It works!</h1><p>This server is up and running.</p></body></html>
"""


def services() -> Services:
    """The per-process services built by create_app."""
    return current_app.extensions["tunnel_telemetry"]


# Content-Type values clients send (checked as they are, without parsing them again).
_PLAIN_JSON = frozenset(("application/json", "application/json; charset=utf-8",
                         "application/json;charset=utf-8", "application/json; charset=UTF-8"))


_IDENTITY = frozenset(("identity", ""))


def read_json_body(limit: int) -> Any:
    """The request's JSON body, or a ReportError (415, 413, 400)."""
    # One context lookup, not one per attribute.
    req = cast("LocalProxy[Request]", request)._get_current_object()
    environ = req.environ
    if environ.get("CONTENT_TYPE") not in _PLAIN_JSON:
        if req.mimetype != "application/json":
            raise ReportError("content_type", "Content-Type must be application/json")
        params = req.mimetype_params
        if params and params.get("charset", "utf-8").lower() not in ("utf-8", "utf8"):
            raise ReportError("content_type", "only the utf-8 charset is accepted")
    coding = environ.get("HTTP_CONTENT_ENCODING")
    if coding is not None and coding.strip().lower() not in _IDENTITY:
        # Not decoded (a small gzip body can inflate to gigabytes): say so, RFC 7694.
        raise ReportError("content_encoding", "Content-Encoding is not supported: send the "
                          "report uncompressed")
    length = req.content_length
    if length is not None and length > limit:
        raise ReportError("too_large", f"the report is larger than {limit} bytes")
    # One read() may return less than asked (chunked bodies arrive in pieces): loop, and stop
    # at limit + 1 bytes so an oversized or endless body is never read to its end.
    chunks: list[bytes] = []
    size = 0
    # A server that ends the body itself (gunicorn: Content-Length or chunked framing) is read
    # directly; the loop below never reads more than limit + 1 bytes either way.
    stream = environ["wsgi.input"] if environ.get("wsgi.input_terminated") else req.stream
    try:
        while size <= limit:
            try:
                chunk = stream.read(limit + 1 - size)
            except HTTPException:
                raise
            except Exception as exc:  # noqa: BLE001 - the server's body reader: bad chunking
                log.info("unreadable body: %s", type(exc).__name__)
                raise ReportError("bad_body", "the request body could not be read") from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size == length:  # all of it: no read just to be told so
                break
    finally:
        body_read(environ)
    if size > limit:
        raise ReportError("too_large", f"the report is larger than {limit} bytes")
    if length is not None and size != length:
        raise ReportError("bad_body", "the body is shorter than its Content-Length")
    return parse_json(chunks[0] if len(chunks) == 1 else b"".join(chunks))


@bp.post("/report")
def post_report() -> tuple[Response, int]:
    svc = services()
    config = svc.config
    payload = read_json_body(config.max_report_size)
    now = datetime.now(UTC)
    if is_outline(payload):  # outline-sdk's test-connectivity: its own shape, translated
        report, endpoint = translate(payload, now, config.max_report_age,
                                     config.max_clock_skew, svc.report_id_key)
    else:
        report, endpoint = validate(payload, now, config.max_report_age, config.max_clock_skew)
    enriched = enrich(report, endpoint, request.environ.get(ENVIRON_KEY), svc.geo, now,
                      config.collector_id)
    clean = scrub(enriched, config.allow_public_endpoint, config.scrub_allow_config_keys)
    metrics.scrubbed(enriched, clean)
    text = dumps(clean)
    with metrics.store_commit():
        stored, created = svc.store.add(clean, svc.relay.enqueue(clean), body=text)
    metrics.accepted(created)
    extra = svc.relay.after_store(stored, created)
    log.debug("report %s", "accepted" if created else "duplicate")
    if created:  # the report as stored, encoded once, and the relay's fields (none of its keys)
        if extra:
            text = text[:-1] + "," + dumps(extra)[1:]
        return Response(text + "\n", mimetype="application/json"), 201
    return jsonify({**stored, **extra}), 201


@bp.post("/relay")
def post_relay() -> tuple[Response, int]:
    """Reports relayed by a primary collector (bearer token from relay-tokens)."""
    svc = services()
    check_token(request.headers.get("Authorization"), svc.config.relay_tokens)
    limit = MAX_BATCH * svc.config.max_report_size
    request.max_content_length = limit + 1  # read_json_body reads limit + 1 to detect "over"
    body = receive_batch(read_json_body(limit), svc.store, svc.relay, svc.config)
    metrics.relayed(body)
    return jsonify(body), 200


@bp.get("/")
def index() -> Response:
    return Response(DECOY, mimetype="text/html")


@bp.get("/version")
def version() -> Response:
    return jsonify({"version": __version__, "commit": services().commit})


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    svc = services()
    store_ok = svc.store.ping()
    label = public_labels(svc.relay.destinations())
    backlog = svc.store.backlog() if store_ok else None
    health = svc.relay.health()
    if "backing_off_s" in health:
        health["backing_off_s"] = {label(d): v for d, v in health["backing_off_s"].items()}
    body: dict[str, Any] = {
        "ok": store_ok,
        "store": {"backend": svc.store.backend, "ok": store_ok,
                  **({"disk": disk} if (disk := svc.store.disk()) else {})},
        "geo": geo_health(svc.geo.info(), svc.config.geo_stale_after),
        "relay": {"destinations": [label(d) for d in svc.relay.destinations()],
                  "backlog": {label(d): v for d, v in backlog.items()} if backlog else backlog,
                  **health},
        "retention": svc.housekeeping.health(),
    }
    return jsonify(body), 200 if store_ok else 503


def public_labels(destinations: list[str]) -> Callable[[str], str]:
    """Name relay destinations for a public page: secondary collectors by position, no URL."""
    names = {d: f"collector-{i}" for i, d in
             enumerate((d for d in destinations if d != "ooni"), start=1)}
    return lambda dest: dest if dest == "ooni" else names.get(dest, "collector-unconfigured")


@bp.get("/report.schema.json")
def report_schema() -> Response:
    response = jsonify(load_schema())
    response.mimetype = "application/schema+json"
    return response


@bp.get("/outline-report.schema.json")
def outline_report_schema() -> Response:
    """The schema POST /report enforces on outline-sdk test-connectivity reports."""
    response = jsonify(load_schema(OUTLINE_SCHEMA))
    response.mimetype = "application/schema+json"
    return response
