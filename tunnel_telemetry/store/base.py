"""What the collector needs from a store, and the parts both backends share."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

STATES = ("pending", "delivered", "failed", "expired", "skipped")
# What Store.aggregate returns per row: the period's start (epoch seconds), the report fields
# as stored (not yet checked: tunnel_telemetry.aggregate does), how many, and their weight.
AGGREGATE_COLUMNS = ("period", "client_cc", "client_asn", "proto", "endpoint_asn",
                     "endpoint_cc", "failed", "op", "posix_error", "count", "weighted")


class StoreError(Exception):
    """A store that cannot be opened; the message is one line."""


@dataclass(frozen=True)
class Claim:
    """A pending relay leased to one owner."""

    uuid: str
    report: dict[str, Any]
    attempts: int
    created: float


class Store(Protocol):
    """What the collector needs from a backend (SQLite now, PostgreSQL later)."""

    backend: str

    def add(self, report: dict[str, Any], destinations: list[str], *,
            lease_owner: str | None = None, lease_seconds: float = 0.0,
            body: str | None = None,
            skipped: Mapping[str, str] | None = None) -> tuple[dict[str, Any], bool]: ...

    def get(self, uuid: str) -> dict[str, Any] | None: ...

    def update_report(self, uuid: str, fields: dict[str, Any]) -> dict[str, Any] | None: ...

    def claim(self, destination: str, limit: int, owner: str, lease_seconds: float,
              now: float | None = None, due_only: bool = True) -> list[Claim]: ...

    def finish(self, uuid: str, destination: str, owner: str, state: str, *,
               result: dict[str, Any] | None = None, error: str | None = None,
               next_attempt: float | None = None,
               report_fields: dict[str, Any] | None = None) -> bool: ...

    def release(self, uuids: list[str], destination: str, owner: str,
                next_attempt: float | None = None) -> int: ...

    def make_due(self, destination: str, now: float | None = None) -> int: ...

    def requeue(self, destination: str, states: tuple[str, ...] = ("failed",),
                now: float | None = None) -> int: ...

    def relay_state(self, uuid: str) -> dict[str, dict[str, Any]]: ...

    def backlog(self, now: float | None = None) -> dict[str, dict[str, Any]]: ...

    def count(self) -> int: ...

    def aggregate(self, start: float, end: float, width: int) -> list[tuple]: ...

    def ping(self) -> bool: ...

    def disk(self) -> str | None: ...

    def close(self) -> None: ...


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
