"""Open Tunnel Telemetry: a collector (validate, geolocate, scrub, store, relay) and a client."""

__version__ = "0.1.0"
