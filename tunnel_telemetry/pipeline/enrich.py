"""Enrich step: geolocate the client and the endpoint, add server-owned fields.

Runs before scrubbing because it needs the addresses that scrubbing removes.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from ..protocol.fields import Endpoint, format_time

if TYPE_CHECKING:
    from .geo import Address


class GeoLookup(Protocol):
    def lookup(self, ip: str | Address | None) -> tuple[str, str]: ...


def enrich(
    report: dict[str, Any],
    endpoint: Endpoint,
    client_ip: str | Address | None,
    geo: GeoLookup,
    received: datetime,
    collector_id: str | None = None,
) -> dict[str, Any]:
    """Return the report with geolocation, parsed endpoint and server-owned fields, in order."""
    endpoint_asn, endpoint_cc = (
        geo.lookup(endpoint.address) if endpoint.address is not None else ("AS0", "ZZ")
    )
    client_asn, client_cc = geo.lookup(client_ip)
    out: dict[str, Any] = {
        "report-type": report["report-type"],
        "uuid": report["uuid"],
        "time": report["time"],
        "t_received": format_time(received),
    }
    if collector_id:
        out["collector_id"] = collector_id
    out.update({
        "endpoint": endpoint.text,
        "endpoint_addr": endpoint.host,
        "proto": endpoint.proto,
        "endpoint_port": endpoint.port,
        "endpoint_asn": endpoint_asn,
        "endpoint_cc": endpoint_cc,
        # A client that geolocated itself knows better: it may report through the tunnel.
        "client_asn": report.get("client_asn", client_asn),
        "client_cc": report.get("client_cc", client_cc),
        "config": report["config"],
        "duration_ms": report["duration_ms"],
        "failure": report["failure"],
        "sampling_rate": report["sampling_rate"],
    })
    return out
