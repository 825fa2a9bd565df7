"""GET /aggregates (public, k-anonymous) and /dashboard (operator token): plots of the same
aggregates, drawn on the server, with the relay's backlog."""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import NotFound

from ..aggregate import (
    FORMAT,
    ROUND_TO,
    SOURCE,
    PeriodCache,
    build,
    check_document,
    iso,
    parse_query,
)
from ..errors import ReportError
from ..geo_update import attributions
from .plots import bar_chart, legend, line_chart
from .relayed import check_token
from .views import public_labels, read_json_body, services

bp = Blueprint("aggregates", __name__, template_folder="templates")
CACHE_KEY = "tunnel_telemetry.aggregates"
bp.record_once(lambda state: state.app.extensions.setdefault(CACHE_KEY, PeriodCache()))

TOP_SERIES = 6
TOP_BARS = 10
# The dashboard loads nothing: no script, font, image or style from anywhere.
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


MAX_RELAYED_BYTES = 16 * 1024 * 1024  # POST /aggregates: a year of days from a busy collector


@bp.get("/aggregates")
def get_aggregates() -> Response:
    """Closed periods only; a past range never changes, the latest until the next period
    closes, and the caching headers say so. ``?source=`` names a collector whose aggregates
    were relayed here: its periods of the range, as it sent them."""
    now = time.time()
    args = request.args.to_dict()
    source = args.pop("source", None)
    query = parse_query(args, now)
    if source is None:
        document = build(services().store, query, services().config.aggregate_k,
                         current_app.extensions[CACHE_KEY])
        if credits := attributions(services().geo.info()):
            document["attribution"] = credits  # the geo data's licences ask for it
    else:
        if not SOURCE.fullmatch(source):
            raise ReportError("bad_parameter", "source: not a collector-id",
                              [{"path": "source", "message": "not a collector-id"}])
        document = {"format": FORMAT, "source": source, "period": query.period,
                    "from": iso(query.start), "to": iso(query.end), "rounding": ROUND_TO,
                    "periods": services().store.relayed_aggregates(
                        source, query.period, query.start, query.end)}
    response = jsonify(document)
    next_close = query.end + query.width
    closed_range = query.end < int(now // query.width) * query.width
    response.cache_control.public = True
    response.cache_control.max_age = 86400 if closed_range else max(60, int(next_close - now))
    response.add_etag()
    return response.make_conditional(request)


@bp.post("/aggregates")
def post_aggregates() -> tuple[Response, int]:
    """Aggregates a primary collector relays (relay-aggregates-url there, relay-tokens here):
    kept per collector and period, published at GET /aggregates?source=..."""
    svc = services()
    check_token(request.headers.get("Authorization"), svc.config.relay_tokens)
    request.max_content_length = MAX_RELAYED_BYTES + 1
    payload = read_json_body(MAX_RELAYED_BYTES)
    source, period, periods = check_document(payload, svc.config.aggregate_k, time.time())
    stored = svc.store.add_relayed_aggregates(source, period, periods)
    return jsonify({"ok": True, "source": source, "period": period, "stored": stored}), 200


def check_operator(header: str | None, token: str | None) -> None:
    """The dashboard's token as a Bearer token or an HTTP Basic password (constant time);
    NotFound when the dashboard is off."""
    if not token:
        raise NotFound()
    given = ""
    if header and header[:7].lower() == "bearer ":
        given = header[7:].strip()
    elif header and header[:6].lower() == "basic ":
        try:
            given = base64.b64decode(header[6:].strip(), validate=True).decode().partition(
                ":")[2]
        except (binascii.Error, UnicodeDecodeError):
            given = ""
    if not (given and hmac.compare_digest(given.encode(), token.encode())):
        raise ReportError("dashboard_auth", "the dashboard needs the operator token")


def ratio_series(document: Mapping[str, Any], field: str,
                 top: int = TOP_SERIES) -> dict[str, list[float | None]]:
    """Weighted failure ratio per period for the ``top`` values of ``field`` by reports."""
    totals: dict[str, float] = {}
    per: dict[str, list[list[float]]] = {}
    count = len(document["periods"])
    for i, period in enumerate(document["periods"]):
        for cell in period["cells"]:
            label = cell[field]
            if label is None:
                continue
            slots = per.setdefault(label, [[0.0, 0.0] for _ in range(count)])
            slots[i][0] += cell["weighted"]
            slots[i][1] += cell["weighted"] if cell["outcome"] == "failure" else 0
            totals[label] = totals.get(label, 0) + cell["weighted"]
    chosen = sorted(totals, key=lambda label: (-totals[label], label))[:top]
    return {label: [fail / total if total else None for total, fail in per[label]]
            for label in chosen}


def failing_networks(document: Mapping[str, Any],
                     top: int = TOP_BARS) -> list[tuple[str, float, str]]:
    """Endpoint networks with the most (weighted) failures: (ASN, failures, text)."""
    fails: dict[str, float] = {}
    totals: dict[str, float] = {}
    for period in document["periods"]:
        for cell in period["cells"]:
            asn = cell["endpoint_asn"]
            if asn is None:
                continue
            totals[asn] = totals.get(asn, 0) + cell["weighted"]
            if cell["outcome"] == "failure":
                fails[asn] = fails.get(asn, 0) + cell["weighted"]
    chosen = sorted(fails, key=lambda asn: (-fails[asn], asn))[:top]
    return [(asn, fails[asn], f"{fails[asn]:.0f} of {totals[asn]:.0f} "
                              f"({round(100 * fails[asn] / totals[asn])}%)") for asn in chosen]


def reject_totals() -> dict[str, float] | None:
    """Rejected requests by reason code since start, summed over the workers, from the
    Prometheus counters (metrics-listen); None when metrics are off or not in this build."""
    try:
        from .. import metrics  # noqa: PLC0415 - optional: absent in builds without metrics
    except ImportError:
        return None
    if not metrics.enabled():
        return None
    return dict(metrics.totals().get("tt_reports_rejected_total", {}))


@bp.get("/dashboard")
def dashboard() -> Response:
    svc = services()
    check_operator(request.headers.get("Authorization"), svc.config.dashboard_token)
    args = {"period": request.args.get("period") or "day"}
    query = parse_query(args, time.time())
    document = build(svc.store, query, svc.config.aggregate_k, current_app.extensions[CACHE_KEY])
    labels = [p["start"][:10] if query.period == "day" else p["start"][5:16].replace("T", " ")
              for p in document["periods"]]
    charts = []
    for field, name in (("client_cc", "country"), ("client_asn", "network"),
                        ("proto", "protocol")):
        series = ratio_series(document, field)
        charts.append((f"Failure ratio per {name}", line_chart(
            f"failure-{field}", f"Failure ratio per {name}", labels, series), legend(series)))
    bars = failing_networks(document)
    label = public_labels(svc.relay.destinations())
    backlog = {label(dest): row for dest, row in svc.store.backlog().items()}
    html = render_template(
        "dashboard.html", document=document, charts=charts, labels=labels,
        failing=bar_chart("failing-endpoint-networks", "Top failing endpoint networks", bars)
        if bars else None, backlog=backlog, rejects=reject_totals(),
        attribution=attributions(svc.geo.info()),
        totals={name: sum(p[name] for p in document["periods"])
                for name in ("reports", "folded", "suppressed")})
    return Response(html, mimetype="text/html", headers=DASHBOARD_HEADERS)
