"""Placeholder geo step (replaced by the full reader)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class GeoError(Exception):
    """A geo database that cannot be opened."""


class NullGeo:
    def lookup(self, ip: Any) -> tuple[str, str]:
        return "AS0", "ZZ"

    def info(self) -> list[dict]:
        return []

    def reload(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_geo(country_db: str | None, asn_db: str | None) -> NullGeo:
    return NullGeo()
