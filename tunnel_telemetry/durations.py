"""Durations as options and messages write them (``7d``, ``5m``, ``250ms``), read and written
by config, validation messages and the command lines alike."""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Parse seconds from a number or a string like 300, 5m, 7d, 250ms."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 7d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration such as 30s, 5m or 7d, got {value!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """Write seconds as the largest whole unit: 604800 -> 7d, 5 -> 5s, 0.25 -> 250ms."""
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds == 0:
        return "0s"
    millis = seconds * 1000
    return f"{int(millis)}ms" if millis == int(millis) else f"{seconds:g}s"
