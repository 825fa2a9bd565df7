"""Relay step: deliver stored, scrubbed reports to OONI and other collectors, durably."""

from .relay import NullRelay, Relay, build_relay

__all__ = ["NullRelay", "Relay", "build_relay"]
