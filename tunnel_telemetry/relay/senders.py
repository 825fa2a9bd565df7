"""Senders: deliver reports to one destination each (OONI, another collector's POST /relay)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .. import __version__
from .http import (
    HTTP_ERRORS,
    Deadline,
    RelayHTTP,
    classify_exception,
    classify_response,
    json_body,
    response_detail,
    response_json,
    sent_without_answer,
)
from .ooni import OONIClient, explorer_link, probe_location
from .outcome import Outcome, is_destination_failure, one_line

if TYPE_CHECKING:
    from ..config import Config

OONI = "ooni"
COLLECTOR = "collector:"
ROUNDS_PER_BATCH = 4  # a concurrent sender claims this many times its concurrency at once
MAX_POOL_THREADS = 256

# What a collector forwards to another collector (allow-list: fail closed).
RELAYED_KEYS = (
    "report-type", "uuid", "time", "t_received", "collector_id", "proto", "endpoint_port",
    "endpoint_asn", "endpoint_cc", "client_asn", "client_cc", "config", "duration_ms",
    "failure", "sampling_rate", "ooni-measurement-id", "ooni-measurement-link",
)
ENDPOINT_KEYS = ("endpoint", "endpoint_addr")


def relayable(report: Mapping[str, Any], allow_public_endpoint: bool) -> dict[str, Any]:
    """The stored report as sent to another collector (endpoint address only when allowed)."""
    keys = RELAYED_KEYS + (ENDPOINT_KEYS if allow_public_endpoint else ())
    return {k: report[k] for k in keys if k in report}


class Sender(Protocol):
    """Delivers reports to one destination.

    ``batched``: ``send`` takes a whole claimed batch in one call (one HTTP request for all);
    otherwise the retry loop calls ``send`` with one report at a time from up to
    ``concurrency`` threads at once, so ``send`` must be thread-safe.
    """

    destination: str
    batch_size: int
    batched: bool
    concurrency: int

    def precheck(self, report: Mapping[str, Any]) -> Outcome | None:
        """A skip (decided from the report alone: stored with it, never sent there), or None
        to send."""

    def send(self, reports: list[dict[str, Any]], budget: float, stop: Callable[[], bool],
             previous: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Outcome]:
        """Outcomes by uuid for the reports attempted (those left out were not sent).

        ``previous``: by uuid, what the last attempt recorded (``Claim.result``), e.g. that a
        report may have arrived already.
        """

    def report_fields(self, outcome: Outcome) -> dict[str, Any]:
        """Fields to merge into the stored report after a delivery."""

    def maintenance(self) -> None:
        """Periodic housekeeping (from the retry loop)."""

    def close(self) -> None:
        """Release connections."""


class OONISender:
    """Relay to OONI's collector, one measurement per report over reused open reports."""

    destination = OONI
    batched = False

    def __init__(self, config: Config) -> None:
        self.concurrency = config.relay_concurrency
        self.batch_size = ROUNDS_PER_BATCH * self.concurrency
        # Keep-alive connections for the retry loop's and the first attempts' threads.
        self.client = OONIClient(config.ooni_api, collector_id=config.collector_id,
                                 allow_public_endpoint=config.allow_public_endpoint,
                                 timeout=config.relay_attempt_timeout,
                                 pool_size=self.concurrency + pool_threads(config))

    def precheck(self, report: Mapping[str, Any]) -> Outcome | None:
        if report.get("ooni-measurement-id"):
            return Outcome.skipped("already-in-ooni")  # relayed to us after OONI got it
        asn, cc = probe_location(report)
        if asn == "AS0" or cc == "ZZ":
            return Outcome.skipped("client-location-unknown")  # OONI would drop it
        return None

    def send(self, reports: list[dict[str, Any]], budget: float, stop: Callable[[], bool],
             previous: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        for report in reports:
            if stop():
                break
            end = time.monotonic() + budget
            outcome = None
            last = (previous or {}).get(report["uuid"]) or {}
            if last.get("maybe") and isinstance(last.get("report_id"), str):
                # OONI may have it (no answer in time, or {}): look before sending it again.
                outcome = self.client.confirm(report, last["report_id"], timeout=budget)
            if outcome is None:
                outcome = self.client.send(report, timeout=max(0.0, end - time.monotonic()))
            out[report["uuid"]] = outcome
            if is_destination_failure(outcome):
                break
        return out

    def report_fields(self, outcome: Outcome) -> dict[str, Any]:
        uid = outcome.result.get("measurement_uid")
        if not uid:
            return {}
        return {"ooni-measurement-id": uid, "ooni-measurement-link": explorer_link(uid)}

    def maintenance(self) -> None:
        self.client.close_stale()

    def close(self) -> None:
        self.client.close()


class CollectorSender:
    """Relay to another tunnel-telemetry collector's ``POST /relay``, in batches."""

    def __init__(self, base_url: str, config: Config) -> None:
        self.base_url = base_url.rstrip("/")
        self.destination = COLLECTOR + base_url
        self.batch_size = config.relay_batch
        self.batched = True  # a batch is one request
        self.concurrency = 1
        self.allow_public_endpoint = config.allow_public_endpoint
        self.timeout = config.relay_attempt_timeout
        headers = {"User-Agent": f"tunnel-telemetry/{__version__}"}
        if config.relay_token:
            headers["Authorization"] = f"Bearer {config.relay_token}"
        self.http = RelayHTTP(self.base_url, 1 + pool_threads(config), headers)

    def precheck(self, report: Mapping[str, Any]) -> Outcome | None:
        return None

    def send(self, reports: list[dict[str, Any]], budget: float, stop: Callable[[], bool],
             previous: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Outcome]:
        if not reports or stop():
            return {}
        body = [relayable(r, self.allow_public_endpoint) for r in reports]
        uuids = [r["uuid"] for r in reports]
        try:
            resp = self.http.post("/relay", json_body(body),
                                  Deadline(budget, self.timeout).timeout())
        except HTTP_ERRORS as e:
            if sent_without_answer(e):  # it may have stored them: wait before sending again
                return dict.fromkeys(uuids, Outcome.maybe_delivered("timeout", "no answer in time"))
            return dict.fromkeys(uuids, classify_exception(e))
        if resp.status_code in (401, 403):
            # A token problem is the operator's to fix; the backlog waits for it.
            return dict.fromkeys(uuids, Outcome.retry("unauthorized", response_detail(resp)))
        bad = classify_response(resp)
        if bad is not None:
            return dict.fromkeys(uuids, bad)
        try:
            answer = response_json(resp)
            stored = {str(u) for u in answer.get("stored", [])}
            rejected = {str(item.get("uuid")): item for item in answer.get("rejected", [])
                        if isinstance(item, dict)}
        except (ValueError, AttributeError, TypeError):
            return dict.fromkeys(uuids, Outcome.retry("bad-answer", "not a /relay answer"))
        out = {}
        for u in uuids:
            if u in stored:
                out[u] = Outcome.delivered()
            elif u in rejected:
                errors = rejected[u].get("errors") or [{}]
                first = errors[0] if isinstance(errors[0], dict) else {}
                out[u] = Outcome.failed("rejected", one_line(
                    f"{first.get('path', '')} {first.get('message', '')}".strip()))
            else:
                out[u] = Outcome.retry("not-acknowledged")
        return out

    def report_fields(self, outcome: Outcome) -> dict[str, Any]:
        return {}

    def maintenance(self) -> None:
        """Nothing to do."""

    def close(self) -> None:
        self.http.close()


def is_batched(sender: Sender) -> bool:
    """True when the sender takes a whole batch per ``send`` call (the default)."""
    return bool(getattr(sender, "batched", True))


def sender_concurrency(sender: Sender) -> int:
    """How many single-report ``send`` calls the sender takes at once."""
    return 1 if is_batched(sender) else max(1, int(getattr(sender, "concurrency", 1)))


def pool_threads(config: Config) -> int:
    """Pool threads (greenlets) for first attempts: relay-concurrency per destination
    (capped)."""
    dests = (1 if config.ooni_relay else 0) + len(config.relay_url)
    return max(1, min(MAX_POOL_THREADS, config.relay_concurrency * max(1, dests)))


def make_sender(dest: str, config: Config) -> Sender:
    """The sender for a destination name (``ooni`` or ``collector:<base url>``)."""
    if dest == OONI:
        return OONISender(config)
    return CollectorSender(dest[len(COLLECTOR):], config)
