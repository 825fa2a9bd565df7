"""The receiving side of ``POST /relay``: batches another collector relays to this one."""

from __future__ import annotations

import hmac
import logging
import uuid as uuidlib
from typing import TYPE_CHECKING, Any

from ..errors import ReportError
from ..pipeline.scrub import scrub
from ..protocol.fields import MAX_ASN, canonical_asn, parse_time
from ..protocol.schema import schema_errors
from ..relay import NullRelay, Relay
from ..relay.ooni import explorer_link
from ..store import Reports

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)

RELAYED_SCHEMA = "relayed-report.schema.json"
MAX_BATCH = 100  # reports per POST /relay, both directions


def check_token(header: str | None, accepted: tuple[str, ...]) -> None:
    """Accept ``Authorization: Bearer <token>`` for one of ``accepted`` (constant time)."""
    given = ""
    if header and header[:7].lower() == "bearer ":
        given = header[7:].strip()
    ok = False
    for token in accepted:  # compare with every token: the time does not tell which matched
        ok |= hmac.compare_digest(given.encode(), token.encode())
    if not (accepted and given and ok):
        raise ReportError("unauthorized", "a valid relay token is required")


def check_relayed(item: Any) -> list[dict[str, str]]:
    """Errors of one relayed report (empty when it is acceptable)."""
    if not isinstance(item, dict):
        return [{"path": "$", "message": "must be of type object"}]
    errors = schema_errors(item, RELAYED_SCHEMA)
    if errors:
        return errors
    for key in ("time", "t_received"):
        try:
            parse_time(item[key])
        except ValueError as e:
            errors.append({"path": f"$.{key}", "message": str(e)})
    for key in ("client_asn", "endpoint_asn"):
        if canonical_asn(item[key]) is None:
            errors.append({"path": f"$.{key}", "message": f"must be at most AS{MAX_ASN}"})
    uid, link = item.get("ooni-measurement-id"), item.get("ooni-measurement-link")
    if link is not None and (uid is None or link != explorer_link(uid)):
        errors.append({"path": "$.ooni-measurement-link",
                       "message": "must be the explorer link of ooni-measurement-id"})
    return errors


def receive_batch(payload: Any, store: Reports,  # noqa: ANN401 - any JSON value
                  relay: Relay | NullRelay, config: Config) -> dict[str, Any]:
    """Store a batch relayed by a primary collector; the answer of ``POST /relay``.

    The primary's geolocation and collector id are kept (the sender is never geolocated);
    each uuid is stored once and queued for this collector's own destinations.  The
    endpoint address is kept only when this collector allows public endpoints too, and
    config values are scrubbed again.
    """
    if not isinstance(payload, list):
        raise ReportError("not_array", "the body must be a JSON array of reports",
                          [{"path": "$", "message": "must be of type array"}])
    if not 1 <= len(payload) <= MAX_BATCH:
        raise ReportError("batch_size", f"send between 1 and {MAX_BATCH} reports per batch",
                          [{"path": "$", "message": f"must hold 1-{MAX_BATCH} items"}])
    stored: list[str] = []
    rejected: list[dict[str, Any]] = []
    created = 0
    for index, item in enumerate(payload):
        errors = check_relayed(item)
        if errors:
            uid = item.get("uuid") if isinstance(item, dict) else None
            rejected.append({
                "index": index,
                "uuid": uid.lower() if isinstance(uid, str) and _is_uuid(uid) else None,
                "errors": [{"path": f"$[{index}]{e['path'][1:]}", "message": e["message"]}
                           for e in errors],
            })
            continue
        report = scrub(dict(item, uuid=str(uuidlib.UUID(item["uuid"])),
                            client_asn=canonical_asn(item["client_asn"]),
                            endpoint_asn=canonical_asn(item["endpoint_asn"])),
                       config.allow_public_endpoint, config.scrub_allow_config_keys)
        kept, new = store.add(report, relay.enqueue(report, attempt_now=False))
        stored.append(kept["uuid"])
        created += new
    if created:
        relay.wake()
    log.info("relay batch: %d stored (%d new), %d rejected", len(stored), created, len(rejected))
    return {"ok": True, "stored": stored, "created": created, "rejected": rejected}


def _is_uuid(text: str) -> bool:
    try:
        uuidlib.UUID(text)
    except ValueError:
        return False
    return len(text) == 36
