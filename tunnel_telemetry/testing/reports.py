"""Valid reports for tests and benchmarks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any


def iso(delta: timedelta = timedelta(0)) -> str:
    """Now plus ``delta`` as RFC 3339 UTC."""
    return (datetime.now(UTC) + delta).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_report(**fields: Any) -> dict[str, Any]:
    """A valid report; keyword arguments override or add fields (None removes one).

    ``report_type`` stands for the ``report-type`` key.
    """
    report: dict[str, Any] = {
        "report-type": "tunnel-telemetry",
        "time": iso(timedelta(seconds=-10)),
        "endpoint": "ss://1.1.1.1:443",
        "config": {"prefix": "xx"},
    }
    for key, value in fields.items():
        key = "report-type" if key == "report_type" else key
        if value is None:
            report.pop(key, None)
        else:
            report[key] = value
    return report
