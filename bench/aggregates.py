"""How long the aggregates take on a large SQLite store (docs/benchmarks.md, "Aggregates").

    python bench/aggregates.py --reports 1000000

Fills a fresh store (bench/prefill.py: bodies from the real pipeline, geolocated with the test
databases, received times spread over the last 30 days), then times ``aggregate.build`` (the
code behind GET /aggregates, tt-server aggregate and /dashboard) for a few ranges: read from
the store, and again from the server's cache of closed periods.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill import prefill  # noqa: E402

from tunnel_telemetry import aggregate  # noqa: E402
from tunnel_telemetry.store import open_store  # noqa: E402
from tunnel_telemetry.testing.geodb import GEO_NETWORKS, write_asn_db, write_country_db  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        country, asn = Path(folder, "country.mmdb"), Path(folder, "asn.mmdb")
        write_country_db(country, {net: cc for net, (_, _, cc) in GEO_NETWORKS.items()})
        write_asn_db(asn, {net: (n, org) for net, (n, org, _) in GEO_NETWORKS.items()})
        addresses = ["1.1.1.9", "2.3.4.9", "6.6.6.9", "2a01:4f8:1::9", "192.0.2.9"]
        url = f"sqlite:///{folder}/reports.db"
        filled = prefill(url, args.reports, addresses, (str(country), str(asn)),
                         max_age=args.days * 86400)
        print(f"{args.reports:,} reports over {args.days} days stored in {filled:.1f} s")
        store = open_store(url)  # opening creates the index on received (once)
        now = time.time()
        try:
            for label, query in (
                    ("one closed day", {"period": "day", "from": time.strftime(
                        "%Y-%m-%d", time.gmtime(now - 86400))}),
                    ("48 hours by hour (the dashboard's 48 h)", {"period": "hour"}),
                    (f"{args.days} days by day (the default, the dashboard)", {"period": "day"})):
                parsed = aggregate.parse_query(query, now)
                best = float("inf")
                for _ in range(3):
                    started = time.perf_counter()
                    document = aggregate.build(store, parsed)
                    best = min(best, time.perf_counter() - started)
                cache = aggregate.PeriodCache()
                aggregate.build(store, parsed, cache=cache)
                started = time.perf_counter()
                aggregate.build(store, parsed, cache=cache)
                cached = time.perf_counter() - started
                cells = sum(len(p["cells"]) for p in document["periods"])
                reports = sum(p["reports"] for p in document["periods"])
                print(f"{label}: {best * 1000:,.0f} ms (best of 3), {cached * 1000:,.1f} ms "
                      f"again (closed periods cached); ~{reports:,} reports, {cells:,} cells")
        finally:
            store.close()


if __name__ == "__main__":
    main()
