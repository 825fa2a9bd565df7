#!/usr/bin/env python3
"""Load harness for the collector: ``python bench/run.py [--smoke] [--scenario NAME ...]``.

Sets everything up on 127.0.0.1 by itself: synthetic geo databases, the fake OONI collector,
tt-server with the settings under test, a bare Flask+gunicorn echo endpoint as baseline, and
wrk posting varied valid reports (bench/report.lua). Prints a Markdown table and writes the
same figures as JSON to bench/results/<timestamp>.json. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # benchmark this checkout, installed or not

from tunnel_telemetry.config import OPTION_BY_NAME  # noqa: E402
from tunnel_telemetry.testing.reports import make_report  # noqa: E402
from tunnel_telemetry.testing.server import TTServer, free_port  # noqa: E402

sys.path.insert(0, str(HERE))
from prefill import prefill  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
# The echo baseline runs under gunicorn's stock gevent worker (tt-server's is a thin subclass),
# so it is the same baseline whichever source tree --source serves.
WORKER_CLASS = "gevent"
SCENARIOS = ("ingest", "ingest-pg", "relay", "growth", "drain", "memory")
NA_RELAY = "n/a (relay not available)"
DISK_PROBE_COMMITS = 100


# -- processes and /proc --------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mb(pid: int) -> dict[str, float]:
    """RSS (and PSS, which splits shared pages between the processes mapping them), MB."""
    out = {"rss": 0.0, "pss": 0.0}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1]) / 1024
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    out["pss"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def system_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


# A fixed single-threaded workload like a report's (JSON in and out, a regex, dict work): its CPU
# time says how fast the host runs Python right now. Shared VMs drift by 20-40 % within an
# hour; comparing runs' figures without this number compares hosts as much as code.
_PROBE = """
import json, re, time
report = {"report-type": "tunnel-telemetry", "time": "2026-12-04T21:00:00Z", "proto": "ss",
          "endpoint": "ss://198.51.100.7:443", "config": {"prefix": "xx", "mode": "tcp"},
          "duration_ms": 1200, "failure": {"op": "tcp.connect", "msg": "timeout"}}
pattern = re.compile(r"^(?P<proto>[a-z0-9+]+)://(?P<host>[^:/]+):(?P<port>[0-9]+)$")
start = time.process_time()
for i in range(20000):
    data = json.loads(json.dumps(dict(report, duration_ms=i)))
    pattern.match(data["endpoint"]).group("host")
print(round((time.process_time() - start) * 1000, 1))
"""


def host_probe_ms() -> float | None:
    """The probe's CPU milliseconds (best of three; lower is a faster host), None if it fails."""
    times = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True)
        try:
            times.append(float(out.stdout.strip()))
        except ValueError:
            return None
    return min(times)


def disk_probe_ms(parent: str | None) -> float | None:
    """Median milliseconds of a durable SQLite commit (WAL, ``synchronous=FULL``: one fsync, as
    in the store's group commit) in a scratch file under ``parent``; None if it fails.

    The echo touches no disk and tt-server waits for a commit per batch of reports, so a slow
    disk moves tt-server's figures and not the baseline's; the host probe cannot tell that.
    """
    try:
        with tempfile.TemporaryDirectory(prefix="tt-disk-probe-", dir=parent) as folder:
            conn = sqlite3.connect(os.path.join(folder, "probe.db"), isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("CREATE TABLE t (body TEXT)")
                times = []
                for _ in range(DISK_PROBE_COMMITS):
                    start = time.perf_counter()
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("INSERT INTO t VALUES (?)", ("x" * 600,))
                    conn.execute("COMMIT")
                    times.append(time.perf_counter() - start)
            finally:
                conn.close()
    except (OSError, sqlite3.Error):
        return None
    return round(statistics.median(times) * 1000, 3)


def probes(parent: str | None) -> str:
    """The host and disk probes as the log and header lines show them."""
    return f"host probe {host_probe_ms()} ms, disk probe {disk_probe_ms(parent)} ms"


class Server(TTServer):
    """A tt-server or echo subprocess; ready when POST /report answers 201 (polled each 10 ms).

    ``startup_s`` is the time from spawning to that first answered report.
    """

    startup_s: float | None = None
    workers = 1

    def start(self, timeout: float = 30.0) -> Server:
        started = time.monotonic()
        super().start(timeout)
        self.startup_s = time.monotonic() - started
        # The first worker may answer before the master has forked the others: measure them all.
        deadline = time.monotonic() + 10
        while len(self.worker_pids()) < self.workers and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        body = json.dumps(make_report()).encode()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: "
                                   f"{self.logs()[-3000:]}")
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("POST", "/report", body, {"Content-Type": "application/json",
                                                       "X-Forwarded-For": "192.0.2.1"})
                if conn.getresponse().status == 201:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.01)
        raise TimeoutError(f"server not ready after {timeout} s: {self.logs()[-3000:]}")

    def pids(self) -> list[int]:
        """Master and workers."""
        assert self.proc is not None
        return [self.proc.pid, *self.worker_pids()]


class FakeOONIProcess:
    """The fake OONI collector in its own process (its CPU must not share our GIL)."""

    def __init__(self, workdir: Path, latency_ms: float, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "fake-ooni.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tunnel_telemetry.testing.fake_ooni", "--port",
                 str(self.port), "--latency-ms", str(latency_ms)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.stats()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"fake OONI did not start: {self.log.read_text()}") from None
                time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/_fake/stats")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


# -- the run --------------------------------------------------------------------------------

class Bench:
    """One harness run: settings, shared fixtures, the rows measured so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.smoke
        self.workdir = Path(tempfile.mkdtemp(prefix="tt-bench-", dir=args.workdir))
        self.rows: list[dict[str, Any]] = []
        self.baselines: dict[str, dict[str, Any]] = {}
        self.nonce = random.SystemRandom().getrandbits(32)
        source = str(args.source or ROOT)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [source, *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.geo_dbs: tuple[str | None, str | None] = (None, None)
        self.geo_note = ""
        self.addresses_file = self.workdir / "addresses.txt"
        self.clients_file = self.workdir / "clients.txt"
        self.addresses: list[str] = []
        self.known_addresses: list[str] = []
        self.relay = False
        self.ingest_row: dict[str, Any] | None = None  # SQLite ingest, for ingest-pg's ratio

    # fixtures

    def setup(self) -> None:
        started = time.monotonic()
        self.geo_dbs, networks = make_geo_dbs(self.args.networks, self.args.cache_dir)
        if self.geo_dbs == (None, None):
            self.geo_note = "geo DB builder not available: no geo DBs"
        self.addresses = sample_addresses(networks, 4000, seed=1)
        self.addresses_file.write_text("\n".join(self.addresses) + "\n")
        # Clients come from fewer networks than endpoints (OONI reports are opened per client
        # network and day, so this also sets how often the relay opens one).
        self.clients = sample_addresses(networks, self.args.client_networks, seed=2)
        self.clients_file.write_text("\n".join(self.clients) + "\n")
        self.known_addresses = [a for i, a in enumerate(self.clients) if networks and i % 4]
        log(f"fixtures ready in {time.monotonic() - started:.1f} s "
            f"({self.args.networks} networks per DB)")

    def server_args(self, database_url: str, extra: list[str] | None = None) -> list[str]:
        # The load comes from a few hundred addresses at thousands of reports a second: the
        # per-client rate limit would turn most of it into 429s. It stays on (its cost is part
        # of every request), with a budget no bench client reaches.
        args = ["--database-url", database_url, "--proxy-hops", "1",
                "--workers", str(self.args.workers),
                "--worker-connections", str(self.args.worker_connections),
                "--rate-limit", "600000", "--rate-limit-burst", "100000"]
        country, asn = self.geo_dbs
        if country:
            args += ["--geoip-country-db", country, "--geoip-asn-db", asn]
        return args + list(extra or []) + list(self.args.server_arg)

    def tt_server(self, name: str, db: Path | None = None,
                  extra: list[str] | None = None, database_url: str | None = None) -> Server:
        """tt-server on a SQLite file (``db``, default a fresh one) or on ``database_url``."""
        folder = self.workdir / name
        db = db or folder / "reports.db"
        url = database_url or f"sqlite:///{db}"
        server = Server(folder, self.server_args(url, extra), env=self.env, cwd=folder)
        server.db = db
        server.workers = self.args.workers
        return server

    def echo_server(self, name: str) -> Server:
        folder = self.workdir / name
        port = free_port()
        cmd = [sys.executable, "-m", "gunicorn", "--chdir", str(HERE), "--bind",
               f"127.0.0.1:{port}", "--workers", str(self.args.workers),
               "--worker-class", WORKER_CLASS,
               "--worker-connections", str(self.args.worker_connections),
               "--keep-alive", "5", "--preload", "echo_app:app"]
        server = Server(folder, env=self.env, port=port, command=cmd, cwd=folder)
        server.workers = self.args.workers
        return server

    # measuring

    def wrk(self, server: Server, duration: float, connections: int,
            extra_pids: list[int] | None = None) -> dict[str, Any]:
        """Run wrk against a started server; load figures plus CPU and memory from /proc."""
        pids = server.pids()
        others = list(extra_pids or [])
        cpu0 = {pid: cpu_seconds(pid) for pid in pids + others}
        busy0, total0 = system_busy()
        wrk_cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.nonce += 1
        cmd = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{int(duration)}s",
               "--latency", "--timeout", "5s", "-s", str(HERE / "report.lua"),
               f"{server.url}/report", "--", str(self.addresses_file), str(self.nonce),
               str(self.clients_file)]
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak: dict[int, dict[str, float]] = {}
        while proc.poll() is None:
            for pid in pids:
                mem = memory_mb(pid)
                if mem["rss"] >= peak.get(pid, {"rss": -1})["rss"]:
                    peak[pid] = mem
            time.sleep(0.5)
        out, err = proc.communicate()
        elapsed = time.monotonic() - started
        wrk_cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy1, total1 = system_busy()
        cpu = sum(cpu_seconds(pid) - cpu0[pid] for pid in pids)
        extra_cpu = sum(cpu_seconds(pid) - cpu0[pid] for pid in others)
        wrk_cpu = (wrk_cpu1.ru_utime - wrk_cpu0.ru_utime) + (wrk_cpu1.ru_stime - wrk_cpu0.ru_stime)
        match = re.search(r"^BENCH_JSON (.*)$", out, re.M)
        if proc.returncode != 0 or not match:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {err.strip() or out[-2000:]}")
        data = json.loads(match.group(1))
        ncpu = os.cpu_count() or 1
        # Cores busy with anything but this benchmark (other engineers' test suites ...).
        system_cores = (busy1 - busy0) / max(1, total1 - total0) * ncpu
        ours = (cpu + extra_cpu + wrk_cpu) / elapsed
        seconds = data["duration_us"] / 1e6
        created = data["statuses"].get("201", 0)
        errors = data["errors"]
        workers = [peak.get(pid, {"rss": 0.0, "pss": 0.0}) for pid in pids[1:]]
        master = peak.get(pids[0], {"rss": 0.0, "pss": 0.0})
        return {
            "duration_s": round(seconds, 2),
            "connections": connections,
            "requests": data["requests"],
            "created": created,
            "reports_per_s": round(created / seconds, 1),
            "p50_ms": data["latency_us"]["p50"] / 1000,
            "p90_ms": data["latency_us"]["p90"] / 1000,
            "p99_ms": data["latency_us"]["p99"] / 1000,
            "max_ms": data["latency_us"]["max"] / 1000,
            "non_201": data["requests"] - created,
            "statuses": data["statuses"],
            "errors": errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
            "errors_detail": errors,
            "rss_worker_mb": round(max((w["rss"] for w in workers), default=0.0), 1),
            "rss_workers_mb": [round(w["rss"], 1) for w in workers],
            "rss_total_mb": round(master["rss"] + sum(w["rss"] for w in workers), 1),
            "pss_total_mb": round(master["pss"] + sum(w["pss"] for w in workers), 1),
            "cpu_s": round(cpu, 2),
            "cpu_s_per_1k": round(cpu / (created / 1000), 3) if created else None,
            "wrk_cpu_s": round(wrk_cpu, 2),
            "other_cpu_s": round(extra_cpu, 2),
            "others_load_cores": round(max(0.0, system_cores - ours), 2),
            "loadavg": loadavg(),
        }

    def warm_up(self, server: Server) -> None:
        """A short light load so first-request costs (connections, imports) are not measured."""
        self.wrk(server, 1, 8)

    def run_load(self, server: Server, connections: int | None = None,
                 extra_pids: list[int] | None = None,
                 stored: Callable[[], int] | None = None) -> dict[str, Any]:
        """Warm up (not in smoke mode), then measure; ``stored`` counts reports in the store."""
        if not self.smoke:
            self.warm_up(server)
        before = stored() if stored else 0
        row = self.wrk(server, self.args.duration, connections or self.args.connections,
                       extra_pids)
        if stored:
            row["stored"] = stored() - before
        return row

    def baseline(self, connections: int, scenario: str) -> dict[str, Any]:
        """The echo endpoint under the same load, measured once per run and connection count
        (listed under the first scenario that needs it)."""
        key = f"echo-c{connections}"
        if key not in self.baselines:
            with self.echo_server(key) as server:
                row = self.run_load(server, connections)
                row["startup_s"] = round(server.startup_s or 0, 3)
            self.baselines[key] = row
            self.add(scenario, f"baseline: bare Flask echo, {connections} conns", row)
        return self.baselines[key]

    def add(self, scenario: str, variant: str, figures: dict[str, Any] | None,
            baseline: dict[str, Any] | None = None, targets: list | None = None,
            note: str = "") -> dict[str, Any]:
        row: dict[str, Any] = {"scenario": scenario, "variant": variant, **(figures or {})}
        if baseline and figures and baseline.get("reports_per_s"):
            row["ratio"] = round(figures["reports_per_s"] / baseline["reports_per_s"], 2)
        if targets is not None and figures:
            missed = [text for text, ok in targets if not ok]
            row["targets"] = [text for text, _ in targets]
            row["verdict"] = ("smoke" if self.smoke else
                              "met" if not missed else "missed: " + "; ".join(missed))
        if note:
            row["note"] = note
        self.rows.append(row)
        log(f"{scenario} / {variant}: {short(row)}")
        return row


def short(row: dict[str, Any]) -> str:
    keys = ("reports_per_s", "p99_ms", "non_201", "errors", "rss_worker_mb", "cpu_s_per_1k",
            "ratio", "startup_s", "verdict", "note")
    return ", ".join(f"{k}={row[k]}" for k in keys if k in row)


def log(message: str) -> None:
    print(f"[bench {datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr,
          flush=True)


# -- fixtures -------------------------------------------------------------------------------

def make_geo_dbs(n_networks: int, cache_dir: Path) -> tuple[tuple[str | None, str | None],
                                                            list[str]]:
    """Synthetic country and ASN DBs of ``n_networks`` networks each (cached), and the networks."""
    try:
        from tunnel_telemetry.testing.geodb import synthetic_networks, write_synthetic_dbs
    except ImportError:
        return (None, None), []
    networks = [net for net, _, _ in synthetic_networks(n_networks, seed=0)]
    folder = cache_dir / f"geo-{n_networks}-seed0"
    country, asn = folder / "synthetic-country.mmdb", folder / "synthetic-asn.mmdb"
    if not (country.exists() and asn.exists()):
        log(f"writing geo DBs of {n_networks} networks to {folder}")
        tmp = Path(tempfile.mkdtemp(dir=cache_dir))
        paths = write_synthetic_dbs(tmp, n_networks=n_networks, seed=0)
        folder.mkdir(parents=True, exist_ok=True)
        for path in paths:
            os.replace(path, folder / Path(path).name)
        shutil.rmtree(tmp, ignore_errors=True)
    return (str(country), str(asn)), networks


def sample_addresses(networks: list[str], n: int, seed: int) -> list[str]:
    """Addresses for endpoints and clients: 3/4 inside the DBs' networks, the rest random."""
    import ipaddress

    rng = random.Random(seed)
    out = []
    for i in range(n):
        if networks and i % 4:
            net = ipaddress.ip_network(rng.choice(networks))
            offset = rng.randrange(min(net.num_addresses, 1 << 32))
            out.append(str(net.network_address + offset))
        elif i % 8:
            out.append(str(ipaddress.IPv4Address(rng.randrange(1 << 24, 223 << 24))))
        else:
            out.append(str(ipaddress.IPv6Address((0x2001 << 112) | rng.getrandbits(96))))
    return out


def relay_available(env: dict[str, str]) -> bool:
    """True when this checkout has the fake OONI and a relay that sends to OONI."""
    code = (
        "import sys, tempfile, os\n"
        "import tunnel_telemetry.testing.fake_ooni\n"
        "from tunnel_telemetry.config import Config\n"
        "from tunnel_telemetry.relay.relay import build_relay, NullRelay\n"
        "from tunnel_telemetry.store import open_store\n"
        "d = tempfile.mkdtemp()\n"
        "store = open_store('sqlite:///' + os.path.join(d, 'r.db'))\n"
        "relay = build_relay(Config.from_mapping({'ooni-relay': True}), store)\n"
        "sys.exit(0 if 'ooni' in relay.destinations() else 1)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            timeout=60)
    return result.returncode == 0


def db_counts(db: Path) -> dict[str, int]:
    """Reports stored and relay rows per state, read straight from the SQLite file."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        out = {"stored": conn.execute("SELECT COUNT(*) FROM reports").fetchone()[0]}
        out.update({state: 0 for state in ("pending", "delivered", "skipped", "failed",
                                           "expired")})
        out.update(conn.execute("SELECT state, COUNT(*) FROM relays GROUP BY state").fetchall())
        return out
    finally:
        conn.close()


# -- scenarios ------------------------------------------------------------------------------

def scenario_ingest(bench: Bench) -> None:
    """Relay off, SQLite store, 64 connections, against the echo baseline."""
    conns = bench.args.connections
    base = bench.baseline(conns, "ingest")
    server = bench.tt_server("ingest")
    with server:
        row = bench.run_load(server, stored=lambda: db_counts(server.db)["stored"])
    bench.ingest_row = row
    ratio = row["reports_per_s"] / base["reports_per_s"] if base["reports_per_s"] else 0
    bench.add("ingest", f"tt-server relay off, {conns} conns", row, base,
              [("≥3000 reports/s", row["reports_per_s"] >= 3000),
               ("p99 ≤50 ms", row["p99_ms"] <= 50),
               ("zero errors", row["errors"] == 0 and row["non_201"] == 0),
               (f"≥0.5× baseline ({ratio:.3f})", ratio >= 0.5),
               ("every 201 stored", row["stored"] >= row["created"])])


def pg_count(url: str) -> int:
    """Reports stored in the PostgreSQL store at ``url``."""
    import psycopg  # noqa: PLC0415 - optional dependency

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT COUNT(*) FROM reports").fetchone()[0]


def scenario_ingest_pg(bench: Bench) -> None:
    """The ingest load on a PostgreSQL store (throwaway local cluster, fsync on), as a ratio
    to the SQLite ingest of the same run (measured first if ``ingest`` was not asked for)."""
    conns = bench.args.connections
    variant = f"tt-server relay off, PostgreSQL, {conns} conns"
    try:
        import psycopg  # noqa: F401, PLC0415 - optional dependency

        from tunnel_telemetry.testing.postgres import PostgresCluster, find_bindir
    except ImportError as exc:
        bench.add("ingest-pg", variant, None, note=f"n/a (psycopg not installed: {exc})")
        return
    bindir = find_bindir()
    if bindir is None:
        bench.add("ingest-pg", variant, None, note="n/a (PostgreSQL binaries not found)")
        return
    if bench.ingest_row is None:
        scenario_ingest(bench)
    sqlite_row = bench.ingest_row
    started = time.monotonic()
    # fast=False: fsync and synchronous_commit on, like a real server (SQLite's is FULL too).
    with PostgresCluster(bindir, fast=False) as cluster:
        cluster_s = time.monotonic() - started
        assert cluster.proc is not None
        server = bench.tt_server("ingest-pg", database_url=cluster.url)
        with server:
            if not bench.smoke:
                bench.warm_up(server)
            # The postmaster and its backends (the pools' connections are open by now): their
            # CPU is the benchmark's (other_cpu_s), not "other load".
            children = subprocess.run(["pgrep", "-P", str(cluster.proc.pid)],
                                      capture_output=True, text=True).stdout.split()
            before = pg_count(cluster.url)
            row = bench.wrk(server, bench.args.duration, conns,
                            [cluster.proc.pid, *map(int, children)])
            row["stored"] = pg_count(cluster.url) - before
    ratio = row["reports_per_s"] / sqlite_row["reports_per_s"] if sqlite_row else 0
    bench.add("ingest-pg", variant, {**row, "cluster_start_s": round(cluster_s, 1)},
              sqlite_row,
              [("zero errors", row["errors"] == 0 and row["non_201"] == 0),
               ("every 201 stored", row["stored"] >= row["created"])],
              note=f"× baseline = ÷ SQLite ingest of this run ({ratio:.2f}); PostgreSQL "
                   f"{bindir.parent.name} on 127.0.0.1, fsync on; cluster up in {cluster_s:.1f} s")


def scenario_relay(bench: Bench) -> None:
    """OONI relay on, fake OONI answering in 50 ms; every acknowledged report relayed once."""
    if not bench.relay:
        bench.add("relay", f"tt-server + fake OONI {bench.args.ooni_latency_ms:g} ms", None,
                  note=NA_RELAY)
        return
    conns = bench.args.connections
    base = bench.baseline(conns, "relay")
    fake = FakeOONIProcess(bench.workdir, bench.args.ooni_latency_ms, bench.env)
    try:
        server = bench.tt_server("relay", extra=["--ooni-relay", "--ooni-api", fake.url])
        with server:
            db = server.db
            row = bench.run_load(server, extra_pids=[fake.proc.pid])
            # Wait for the background relay (if any) to deliver what is still queued.
            settle_start = time.monotonic()
            deadline = settle_start + (30 if bench.smoke else 120)
            last, last_change = None, time.monotonic()
            while time.monotonic() < deadline:
                counts = db_counts(db)
                if counts["pending"] == 0:
                    break
                if counts["pending"] != last:
                    last, last_change = counts["pending"], time.monotonic()
                elif time.monotonic() - last_change > 15:
                    break
                time.sleep(0.5)
            settle = time.monotonic() - settle_start
            counts = db_counts(db)
            stats = fake.stats()
    finally:
        fake.stop()
    # Every stored report is delivered to OONI once, or skipped on purpose (OONI drops reports
    # whose client location is unknown, AS0 / ZZ): none pending, failed or sent twice.
    exact = (stats["uuids"] == counts["delivered"] and stats["duplicates"] == 0
             and counts["delivered"] + counts["skipped"] == counts["stored"]
             and row["created"] <= counts["stored"])
    bench.add("relay", f"tt-server + fake OONI {bench.args.ooni_latency_ms:g} ms, {conns} conns",
              {**row, "stored_total": counts["stored"], "relayed_uuids": stats["uuids"],
               "relay_duplicates": stats["duplicates"], "relay_states": counts,
               "ooni_requests": stats["requests"], "ooni_opens": stats["opens"],
               "settle_s": round(settle, 1)},
              base,
              [("≥1000 reports/s", row["reports_per_s"] >= 1000),
               ("p99 ≤300 ms", row["p99_ms"] <= 300),
               ("zero errors", row["errors"] == 0 and row["non_201"] == 0),
               ("every 201 relayed exactly once", exact)],
              note=f"OONI got {stats['uuids']} distinct uuids, {stats['duplicates']} duplicates; "
                   f"store: {counts['stored']} reports, {counts['delivered']} delivered, "
                   f"{counts['skipped']} skipped (location unknown), {counts['pending']} pending, "
                   f"{counts['failed']} failed {settle:.0f} s after the load")


def scenario_growth(bench: Bench) -> None:
    """Ingest with many reports already stored, against an empty store in the same run."""
    n = bench.args.growth_rows
    with bench.tt_server("growth-empty") as server:
        empty = bench.run_load(server)
    bench.add("growth", "empty store (baseline)", empty)
    db = bench.workdir / "growth-full" / "reports.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    seconds = prefill(f"sqlite:///{db}", n, bench.addresses, bench.geo_dbs)
    log(f"pre-filled {n} reports in {seconds:.1f} s ({db.stat().st_size / 2**20:.0f} MB)")
    with bench.tt_server("growth-full", db=db) as server:
        full = bench.run_load(server)
    ratio = full["reports_per_s"] / empty["reports_per_s"] if empty["reports_per_s"] else 0
    bench.add("growth", f"{n:,} reports stored", {**full, "prefill_s": round(seconds, 1)}, empty,
              [("within 20% of empty", ratio >= 0.8),
               ("zero errors", full["errors"] == 0 and full["non_201"] == 0)])


def scenario_drain(bench: Bench) -> None:
    """A backlog of pending OONI relays drained by the relay's retry loop, no new load."""
    n = bench.args.backlog
    latency = bench.args.ooni_latency_ms
    variant = f"drain {n:,} pending relays, OONI {latency:g} ms"
    if not bench.relay:
        bench.add("drain", variant, None, note=NA_RELAY)
        return
    db = bench.workdir / "drain" / "reports.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    # Clients inside the geo DBs' networks: OONI would drop a report whose location is unknown.
    seconds = prefill(f"sqlite:///{db}", n, bench.known_addresses or bench.addresses,
                      bench.geo_dbs, destinations=("ooni",), max_age=3600)
    log(f"pre-filled {n} pending relays in {seconds:.1f} s")
    fake = FakeOONIProcess(bench.workdir, latency, bench.env)
    try:
        server = bench.tt_server("drain", db=db, extra=["--ooni-relay", "--ooni-api", fake.url])
        with server:
            pids = server.pids() + [fake.proc.pid]
            cpu0 = {pid: cpu_seconds(pid) for pid in pids}
            window = max(bench.args.duration, 5 if bench.smoke else 30)
            # The retry loop starts after relay-interval (10 s by default, jittered): the
            # window starts with the first delivery, so the rate is the drain's, not the wait.
            first = db_counts(db)["pending"]
            waited = time.monotonic()
            while (fake.stats()["uuids"] == 0 and db_counts(db)["pending"] == first
                   and time.monotonic() - waited < 30):
                time.sleep(0.1)
            wait_s = time.monotonic() - waited
            first = db_counts(db)["pending"]
            sent0 = fake.stats()["uuids"]
            started = time.monotonic()
            while time.monotonic() - started < window:
                time.sleep(0.5)
                if db_counts(db)["pending"] == 0:
                    break
            elapsed = time.monotonic() - started
            counts = db_counts(db)
            sent = fake.stats()["uuids"] - sent0
            cpu = sum(cpu_seconds(pid) - cpu0.get(pid, 0.0) for pid in server.pids())
            fake_cpu = cpu_seconds(fake.proc.pid) - cpu0[fake.proc.pid]
            mems = [memory_mb(pid) for pid in server.pids()]
        stats = fake.stats()
    finally:
        fake.stop()
    drained = first - counts["pending"]
    rate = sent / elapsed  # reports OONI accepted per second (skipped ones do not count)
    figures = {
        "duration_s": round(elapsed, 1), "reports_per_s": round(rate, 1), "drained": drained,
        "backlog_per_s": round(drained / elapsed, 1), "relay_states": counts,
        "still_pending": counts["pending"], "relayed_uuids": stats["uuids"],
        "relay_duplicates": stats["duplicates"], "ooni_requests": stats["requests"],
        "cpu_s": round(cpu, 2),
        "cpu_s_per_1k": round(cpu / (drained / 1000), 3) if drained else None,
        "other_cpu_s": round(fake_cpu, 2),
        "rss_worker_mb": round(max(m["rss"] for m in mems[1:]), 1),
        "rss_total_mb": round(sum(m["rss"] for m in mems), 1), "loadavg": loadavg(),
        "prefill_s": round(seconds, 1), "first_delivery_after_s": round(wait_s, 1),
    }
    bench.add("drain", variant, figures, None,
              [("≥500 reports/s drained", rate >= 500),
               ("no duplicates", stats["duplicates"] == 0)])


def scenario_memory(bench: Bench) -> None:
    """RSS per worker with both geo DBs loaded, and start-up to the first answered report."""
    figures = {}
    for name, make in (("echo", lambda: bench.echo_server("memory-echo")),
                       ("tt", lambda: bench.tt_server("memory-tt"))):
        server = make()
        with server:
            row = bench.wrk(server, 2 if bench.smoke else 5, 8)
            row["startup_s"] = round(server.startup_s or 0, 3)
        figures[name] = row
    echo, tt = figures["echo"], figures["tt"]
    bench.add("memory", "baseline: bare Flask echo, 8 conns", echo)
    note = bench.geo_note or "both geo DBs loaded"
    row = bench.add("memory", "tt-server with geo DBs, 8 conns", tt, None,
                    [("≤80 MB RSS per worker", tt["rss_worker_mb"] <= 80),
                     ("start-up <2 s", tt["startup_s"] < 2)], note=note)
    if echo["rss_worker_mb"]:
        row["ratio"] = round(tt["rss_worker_mb"] / echo["rss_worker_mb"], 2)
        row["ratio_of"] = "RSS per worker"


RUNNERS: dict[str, Callable[[Bench], None]] = {
    "ingest": scenario_ingest,
    "ingest-pg": scenario_ingest_pg,
    "relay": scenario_relay,
    "growth": scenario_growth,
    "drain": scenario_drain,
    "memory": scenario_memory,
}


# -- output ---------------------------------------------------------------------------------

COLUMNS = (
    ("scenario", "scenario", "{}"), ("variant", "variant", "{}"),
    ("reports_per_s", "reports/s", "{:,.0f}"), ("p50_ms", "p50 ms", "{:.1f}"),
    ("p90_ms", "p90 ms", "{:.1f}"), ("p99_ms", "p99 ms", "{:.1f}"),
    ("non_201", "non-201", "{}"), ("errors", "errors", "{}"),
    ("rss_worker_mb", "RSS/worker MB", "{:.1f}"), ("rss_total_mb", "RSS total MB", "{:.1f}"),
    ("cpu_s_per_1k", "CPU s/1k", "{:.3f}"), ("ratio", "× baseline", "{:.2f}"),
    ("startup_s", "start-up s", "{:.2f}"), ("others_load_cores", "other load", "{:.2f}"),
    ("verdict", "targets", "{}"),
)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            if key == "verdict" and value is None:
                value = row.get("note")
            elif key == "verdict" and row.get("note"):
                value = f"{value} ({row['note']})"
            cells.append("–" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(parent: str | None, source: Path) -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh
                          if line.startswith("model name")), "")
    except OSError:
        pass
    commit = subprocess.run(["git", "-C", str(source), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    versions = {}
    for dist in ("flask", "gunicorn", "jsonschema", "maxminddb"):
        try:
            from importlib.metadata import version
            versions[dist] = version(dist)
        except Exception:  # noqa: BLE001 - informational only
            versions[dist] = None
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "wrk": (wrk.stdout or wrk.stderr).split("\n", 1)[0].strip(),
            "packages": versions, "commit": commit, "loadavg_start": loadavg(),
            "host_probe_ms_start": host_probe_ms(), "disk_probe_ms_start": disk_probe_ms(parent)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds per scenario, small fixtures, no targets asserted")
    p.add_argument("--scenario", action="append", choices=SCENARIOS,
                   help="run only this scenario (repeatable; default: all)")
    p.add_argument("--duration", type=int, help="seconds of load per measurement "
                   "(default 20, smoke 2)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="gunicorn workers for tt-server and the baseline (default: CPU count)")
    connections = OPTION_BY_NAME["worker-connections"].default
    p.add_argument("--worker-connections", type=int, default=connections,
                   help="connections per worker for tt-server and the baseline (default "
                        f"{connections}, tt-server's)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra tt-server argument (repeatable), e.g. --server-arg=--debug")
    p.add_argument("--ooni-latency-ms", type=float, default=50.0,
                   help="fake OONI answer delay (default 50)")
    p.add_argument("--networks", type=int, help="networks per geo DB (default 200000, "
                   "smoke 20000)")
    p.add_argument("--client-networks", type=int, default=500,
                   help="distinct client addresses (X-Forwarded-For) in the load (default 500)")
    p.add_argument("--growth-rows", type=int, help="reports pre-stored for the growth "
                   "scenario (default 1000000, smoke 10000)")
    p.add_argument("--backlog", type=int, help="pending relays for the drain scenario "
                   "(default 100000, smoke 2000)")
    p.add_argument("--cache-dir", type=Path, default=HERE / ".cache",
                   help="where generated geo DBs are kept between runs")
    p.add_argument("--source", type=Path, help="serve the tunnel_telemetry package of this "
                   "source tree instead of this checkout's (before/after comparisons)")
    p.add_argument("--workdir", help="parent of the run's temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the run's directory (logs, DBs)")
    p.add_argument("--json", type=Path, help="write the JSON here (default "
                   "bench/results/<timestamp>.json)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a target is missed (never with --smoke)")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.duration = args.duration or (2 if smoke else 20)
    args.networks = args.networks or (20_000 if smoke else 200_000)
    args.growth_rows = args.growth_rows or (10_000 if smoke else 1_000_000)
    args.backlog = args.backlog or (2_000 if smoke else 100_000)
    args.scenario = args.scenario or list(SCENARIOS)
    return args


def serves(env: dict[str, str], source: Path) -> bool:
    """Whether a process with ``env`` imports tunnel_telemetry from ``source`` (--source)."""
    out = subprocess.run([sys.executable, "-c", "import tunnel_telemetry; "
                          "print(tunnel_telemetry.__file__)"], env=env, cwd=tempfile.gettempdir(),
                         capture_output=True, text=True)
    found = Path(out.stdout.strip() or "/").resolve()
    return out.returncode == 0 and found.is_relative_to(source.resolve())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    bench = Bench(args)
    if args.source and not serves(bench.env, args.source):
        print(f"bench: --source {args.source}: the servers would not import tunnel_telemetry "
              "from there (no package in it?)", file=sys.stderr)
        shutil.rmtree(bench.workdir, ignore_errors=True)
        return 2
    info = machine(args.workdir, args.source or ROOT)  # the commit of the code measured
    failed = []
    try:
        bench.setup()
        bench.relay = relay_available(bench.env)
        if not bench.relay:
            log(NA_RELAY)
        for name in args.scenario:
            log(f"scenario {name} (load average {loadavg()}, {probes(args.workdir)})")
            try:
                RUNNERS[name](bench)
            except Exception as exc:  # noqa: BLE001 - report, go on with the others
                failed.append(name)
                log(f"scenario {name} failed: {type(exc).__name__}: {exc}")
                bench.add(name, "error", None, note=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        if args.keep:
            log(f"kept {bench.workdir}")
        else:
            shutil.rmtree(bench.workdir, ignore_errors=True)
    info["loadavg_end"] = loadavg()
    info["host_probe_ms_end"] = host_probe_ms()
    info["disk_probe_ms_end"] = disk_probe_ms(args.workdir)
    result = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": info,
        "geo": bench.geo_note or f"{args.networks} networks per DB",
        "relay_available": bench.relay,
        "rows": bench.rows,
    }
    path = args.json or HERE / "results" / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'Smoke run' if args.smoke else 'Run'} {result['started']}, commit "
          f"{info['commit']}, {info['cpus']} × {info['cpu_model']}, load average "
          f"{info['loadavg_start']} → {info['loadavg_end']}, host probe "
          f"{info['host_probe_ms_start']} → {info['host_probe_ms_end']} ms, disk probe "
          f"{info['disk_probe_ms_start']} → {info['disk_probe_ms_end']} ms (lower is faster); "
          f"workers {args.workers} (gevent, {args.worker_connections} connections each), "
          f"{args.duration} s per measurement\n")
    print(markdown(bench.rows))
    print(f"\nJSON: {path}")
    if failed:
        return 1
    missed = [r for r in bench.rows if str(r.get("verdict", "")).startswith("missed")]
    return 1 if args.strict and missed and not args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
