"""Relay step: send stored, scrubbed reports to secondary collectors (off by default)."""

from __future__ import annotations

from typing import Any


class NullRelay:
    """Relay off: no destinations, nothing sent."""

    def destinations(self) -> list[str]:
        return []

    def after_store(self, report: dict[str, Any], created: bool) -> dict[str, Any]:
        return {}

    def start(self) -> None:
        """Nothing runs in the background."""

    def close(self) -> None:
        """Nothing to release."""


def build_relay(config: Any, store: Any) -> NullRelay:
    """The relay for this configuration."""
    return NullRelay()
