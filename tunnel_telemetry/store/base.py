"""What the collector needs from a store, and the parts both backends share."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

STATES = ("pending", "delivered", "failed", "expired", "skipped")
# What Store.aggregate returns per row: the period's start (epoch seconds), the report fields
# as stored (not yet checked: tunnel_telemetry.aggregate does), how many, and their weight.
AGGREGATE_COLUMNS = ("period", "client_cc", "client_asn", "proto", "endpoint_asn",
                     "endpoint_cc", "failed", "op", "posix_error", "count", "weighted")


class StoreError(Exception):
    """A store that cannot be opened; the message is one line."""


@dataclass(frozen=True)
class ExportFilter:
    """Which stored reports ``export`` yields: received in [since, until) (Unix time), and
    fields equal to the given values; ``failed`` True: only failures, False: only successes."""

    since: float | None = None
    until: float | None = None
    client_cc: str | None = None
    client_asn: str | None = None
    proto: str | None = None
    endpoint_asn: str | None = None
    failed: bool | None = None

    def fields(self) -> list[tuple[str, str]]:
        """(report key, value) pairs that must match exactly."""
        return [(key, value) for key in ("client_cc", "client_asn", "proto", "endpoint_asn")
                if (value := getattr(self, key)) is not None]


class Reports(Protocol):
    """The reports: stored once by uuid, read back, counted. Backends also say whether they
    are usable (``ping``, ``disk``)."""

    backend: str

    def add(self, report: dict[str, Any], queue: Enqueue | None = None, *,
            body: str | None = None) -> tuple[dict[str, Any], bool]:
        """Store ``report`` once by uuid (its uuid's first report wins): (stored, created).

        ``queue``: relay rows written in the same transaction (a report is never stored
        without them). ``body``: the report already encoded by ``dumps``.
        """

    def get(self, uuid: str) -> dict[str, Any] | None: ...

    def update_report(self, uuid: str, fields: dict[str, Any]) -> dict[str, Any] | None: ...

    def count(self) -> int: ...

    def aggregate(self, start: float, end: float, width: int) -> list[tuple]: ...

    def export(self, filters: ExportFilter) -> Iterator[dict[str, Any]]: ...

    def purge(self, before: float, limit: int) -> int: ...

    def purgeable(self, before: float) -> int: ...

    def add_relayed_aggregates(self, source: str, period: str,
                               periods: list[tuple[int, dict[str, Any]]]) -> int: ...

    def relayed_aggregates(self, source: str, period: str, start: float,
                           end: float) -> list[dict[str, Any]]: ...

    def ping(self) -> bool: ...

    def disk(self) -> str | None: ...

    def close(self) -> None: ...


# -- the relay queue: one row per report and destination --------------------------------------

@dataclass(frozen=True)
class Enqueue:
    """Relay rows to write with a new report: pending for each destination, leased to
    ``owner`` for ``lease_seconds`` when there is one (its first attempt, in the request), or
    already final (skipped, with the reason) for the destinations in ``skipped``."""

    destinations: Sequence[str]
    owner: str | None = None
    lease_seconds: float = 0.0
    skipped: Mapping[str, str] = field(default_factory=dict)

    def rows(self, uuid: str, now: float) -> list[tuple]:
        """The rows' values in the ``relays`` column order of ``add``'s insert."""
        return [relay_row(uuid, dest, now, self.owner, self.lease_seconds, self.skipped)
                for dest in self.destinations]


@dataclass(frozen=True)
class Claim:
    """A pending relay leased to one owner; ``result``: what the last attempt recorded (e.g.
    the OONI report id of a submission that may have arrived)."""

    uuid: str
    report: dict[str, Any]
    attempts: int
    created: float
    result: dict[str, Any] | None = None


class RelayQueue(Protocol):
    """Which report still has to go where: claimed with a lease, finished with an outcome."""

    def claim(self, destination: str, limit: int, owner: str, lease_seconds: float,
              now: float | None = None, due_only: bool = True) -> list[Claim]: ...

    def finish(self, uuid: str, destination: str, owner: str, state: str, *,
               result: dict[str, Any] | None = None, error: str | None = None,
               next_attempt: float | None = None,
               report_fields: dict[str, Any] | None = None) -> bool: ...

    def release(self, uuids: list[str], destination: str, owner: str,
                next_attempt: float | None = None) -> int: ...

    def make_due(self, destination: str, now: float | None = None, *,
                 unconfirmed: bool = False) -> int: ...

    def requeue(self, destination: str, states: tuple[str, ...] = ("failed",),
                now: float | None = None) -> int: ...

    def relay_state(self, uuid: str) -> dict[str, dict[str, Any]]: ...

    def backlog(self, now: float | None = None) -> dict[str, dict[str, Any]]: ...


class Store(Reports, RelayQueue, Protocol):
    """A backend: both interfaces on one database (SQLite, PostgreSQL)."""


def dumps(value: Any) -> str:
    """A report as the store keeps it: compact JSON text, UTF-8 characters as they are."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def relay_row(uuid: str, dest: str, now: float, lease_owner: str | None,
              lease_seconds: float, skipped: Mapping[str, str] | None) -> tuple:
    """A new relay row's values (``relays`` column order of ``add``'s insert): pending, and
    leased when there is an owner; or already skipped, with the reason and no lease."""
    if skipped and dest in skipped:
        return (uuid, dest, "skipped", skipped[dest], now, now, None, None)
    lease_until = now + lease_seconds if lease_owner else None
    return (uuid, dest, "pending", None, now, now, lease_owner, lease_until)
