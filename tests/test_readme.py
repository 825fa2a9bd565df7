"""Every command the README and docs show works as written: the README's loopback examples run
here against a real tt-server, and each of the project's other commands is covered by a named
test (the table below; a command added to the docs without one fails this test)."""

import contextlib
import importlib
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import click
import psycopg
import pytest
import requests

from tunnel_telemetry.store import open_store
from tunnel_telemetry.testing.reports import make_report
from tunnel_telemetry.testing.server import TTServer, free_port, wait_for
from tunnel_telemetry.web import create_app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OURS = ("tt-server", "tt-report", "python", "python3", "curl", "gunicorn", "cat")


def commands(path: Path) -> list[str]:
    """The logical command lines of a file's sh blocks (continuations joined, comments off,
    a here-document kept whole)."""
    out: list[str] = []
    for block in re.findall(r"```(?:sh|bash|shell)\n(.*?)```", path.read_text(), re.S):
        lines = iter(block.splitlines())
        for line in lines:
            while line.endswith("\\"):
                line = line[:-1].rstrip() + " " + next(lines).strip()
            if "<<" in line:
                end = line.split("<<", 1)[1].strip().strip("'\"")
                body = [line]
                for more in lines:
                    body.append(more)
                    if more.strip() == end:
                        break
                out.append("\n".join(body))
                continue
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def ours(command: str) -> bool:
    """A command of this project (or one pointed at it), as opposed to systemctl, heroku, ..."""
    first = command.split()[0]
    env_assign = re.fullmatch(r"[A-Z_]+=\S*", first)
    words = command.split()
    if env_assign:
        words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]
    return bool(words) and words[0] in OURS


# README commands this file does not run, each with the test that runs the same thing
# (module::function, checked to exist), or why only an operator can run it. By prefix.
COVERED = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install . && tt-server":
        "tests/test_readme.py::test_readme_quick_start_runs_as_written",
    "python3 -m venv .venv && . .venv/bin/activate && pip install '.[test]' && python -m pytest":
        "tests/test_readme.py::test_the_test_command_is_what_ci_runs",
    "tt-server --geoip-country-db GeoLite2-Country.mmdb":
        "tests/test_e2e.py::test_privacy_nothing_leaks",
    "tt-server --config /home/user/ttserver/config.yaml":
        "tests/test_config.py::test_seed_readme_env_and_yaml",
    "tt-server geo update": "tests/test_geo_update.py::test_command_lines_and_exit_status",
    "MAXMIND_ACCOUNT_ID=123456 MAXMIND_LICENSE_KEY=... tt-server geo update --provider maxmind":
        "tests/test_geo_update.py::test_maxmind_as_geoipupdate_metadata_md5_then_dated_tarball",
    "IPINFO_TOKEN=... tt-server geo update --provider ipinfo":
        "tests/test_geo_update.py::test_ipinfo_one_file_with_both_checked_against_its_sha256",
    "tt-server export --since 7d --client-cc IR --failed --format csv -o":
        "tests/test_export.py::test_round_trip_with_filters",
    "tt-server purge --older-than 90d --dry-run": "tests/test_retention.py::test_purge_command",
}
EXTERNAL = {
    "tt-report --collector https://collector.example.org probe": "a real collector and endpoint",
    "AUTOTLS=true HOSTNAME=collector.example.org tt-server": "a public DNS name (ACME)",
}


def _readme_commands() -> list[str]:
    return [cmd for cmd in commands(ROOT / "README.md") if ours(cmd)]


def _known(command: str, table: dict[str, str]) -> str | None:
    return next((table[p] for p in table if command.startswith(p)), None)


def test_every_readme_command_is_run_or_covered():
    missing = [cmd for cmd in _readme_commands()
               if not (_known(cmd, COVERED) or _known(cmd, EXTERNAL) or _known(cmd, RUN))]
    assert not missing, "README commands with no test: \n" + "\n".join(missing)


@pytest.mark.parametrize("target", sorted(set(COVERED.values())))
def test_covering_tests_exist(target):
    path, name = target.split("::")
    module = importlib.import_module(path[:-3].replace("/", "."))
    assert callable(getattr(module, name))


def _cli_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every tt-server / tt-report command in the README and docs."""
    out = []
    for path in DOCS:
        for cmd in commands(path):
            for part in re.split(r"\s*(?:&&|\|)\s*", cmd.split("\n")[0]):
                part = re.split(r"\s+\d?(?:>>?|<)\s*", part)[0]  # redirections are bash's
                words = shlex.split(re.sub(r"\$\([^)]*\)", "VALUE", part))
                while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                    words.pop(0)
                if words and words[0] in ("tt-server", "tt-report"):
                    out.append((f"{path.relative_to(ROOT)}: {part}", words))
    return out


@pytest.mark.parametrize("where, argv", _cli_commands(), ids=lambda v: v if isinstance(v, str)
                         else None)
def test_every_documented_command_line_parses(where, argv, tmp_path, monkeypatch):
    """Flags and subcommands exist where the docs put them (nothing is run)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.json").write_text("{}")  # the file the docs write before sending it
    from tunnel_telemetry.cli import main as server_main
    from tunnel_telemetry.client.cli import main as report_main

    command = server_main if argv[0] == "tt-server" else report_main
    with warnings.catch_warnings():  # click 8.2 deprecates protected_args; 9 folds it into args
        warnings.simplefilter("ignore", DeprecationWarning)
        with contextlib.ExitStack() as stack:
            ctx = stack.enter_context(command.make_context(argv[0], list(argv[1:])))
            rest = ctx.protected_args + ctx.args
            while rest and isinstance(ctx.command, click.Group):
                name, sub, rest = ctx.command.resolve_command(ctx, rest)
                ctx = stack.enter_context(sub.make_context(name, rest, parent=ctx))
                rest = ctx.protected_args + ctx.args if isinstance(sub, click.Group) else []


# Run here, as written, in a fresh directory with a collector on localhost:8080.
RUN = {
    "cat > report.json <<EOF": "the README's report",
    "curl -X POST -H 'Content-Type: application/json' -d @report.json http://localhost:8080/report":
        "201",
    "tt-report --collector http://localhost:8080 send report.json": "delivered",
    "tt-report flush": "nothing spooled",
}


def _readme_block(first: str) -> str:
    for cmd in commands(ROOT / "README.md"):
        if cmd.startswith(first):
            return cmd
    raise AssertionError(f"the README no longer shows {first!r}")


def _bash(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.e2e
def test_readme_quick_start_runs_as_written(tmp_path):
    """`tt-server` with embedded defaults (SQLite in ./tt-data, no relay, port 8080), then the
    README's report with curl and with tt-report, exactly as the README writes them."""
    bindir = Path(sys.executable).parent
    if shutil.which("tt-server", path=str(bindir)) is None:
        pytest.skip("tt-server is not installed in this environment (pip install .)")
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "TT_LISTEN": "127.0.0.1:8080",  # tests bind loopback; the README's default is :8080
           "TT_SPOOL_DIR": str(tmp_path / "spool"), "HOME": str(tmp_path)}
    for name in ("TT_CONFIG", "TT_COLLECTORS", "DATABASE_URL"):
        env.pop(name, None)
    server = TTServer(tmp_path, env=env, port=8080, command=["tt-server"], cwd=tmp_path)
    with server:
        for first in RUN:
            out = _bash(_readme_block(first), tmp_path, env)
            assert out.returncode == 0, (first, out.stdout, out.stderr)
            if first.startswith("curl"):
                body = json.loads(out.stdout)
                assert body["report-type"] == "tunnel-telemetry" and "uuid" in body, out.stdout
                assert "1.1.1.1" not in out.stdout
        assert (tmp_path / "tt-data" / "reports.db").exists()
        assert wait_for(lambda: requests.get(server.url + "/healthz", timeout=5).ok)
    logs = server.logs()
    assert "Listening at: http://127.0.0.1:8080 (" in logs  # the operator's own address
    assert "1.1.1.1" not in logs and "127.0.0.1:" not in logs.replace(
        "Listening at: http://127.0.0.1:8080", "")


def test_the_test_command_is_what_ci_runs():
    """The README's test command is the one .ci/run runs (after its apt-get step)."""
    readme = _readme_block("python3 -m venv .venv && . .venv/bin/activate && pip install '.[test]'")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q '.[test]'" in ci and "python -m pytest -q\n" in ci
    assert readme.endswith("python -m pytest -q")


# -- docs/operations.md's SQL, on stores the collector filled ----------------------------------

SQL_DOC = ROOT / "docs" / "operations.md"
SQL_DIALECT = {"sqlite": "-- SQLite", "postgres": "-- PostgreSQL"}
# (client address, endpoint, failure): the clients in the test geo databases' networks
SQL_REPORTS = [
    ("1.1.1.7", "ss://6.6.6.6:443", None),
    ("1.1.1.8", "ss://6.6.6.6:443", {"op": "tcp.connect", "posix_error": "ECONNREFUSED"}),
    ("1.1.1.9", "https://2.3.4.5:8443", {"op": "tls.handshake", "msg": "reset"}),
    ("2.3.4.7", "ss://1.1.1.1:443", {"op": "tcp.connect", "posix_error": "ECONNREFUSED"}),
    ("2.3.4.8", "vless://1.1.1.2:443", None),
]


def sql_examples(dialect: str) -> list[str]:
    """The statements of docs/operations.md's sql block for a dialect, comments off."""
    blocks = [b for b in re.findall(r"```sql\n(.*?)```", SQL_DOC.read_text(), re.S)
              if b.startswith(SQL_DIALECT[dialect] + "\n")]
    assert len(blocks) == 1, f"one sql block starting {SQL_DIALECT[dialect]!r}"
    text = "\n".join(line for line in blocks[0].splitlines() if not line.startswith("--"))
    return [stmt.strip() for stmt in text.split(";") if stmt.strip()]


def _run_sql(db_url: str, backend: str, statements: list[str]) -> list[list[tuple]]:
    """Each statement's rows, columns named oldest_s (a moving age) left out."""
    out = []
    if backend == "sqlite":
        conn = sqlite3.connect(f"file:{db_url[len('sqlite:///'):]}?mode=ro", uri=True)
    else:
        conn = psycopg.connect(db_url)
    try:
        for stmt in statements:
            cur = conn.execute(stmt)
            keep = [i for i, col in enumerate(cur.description) if col[0] != "oldest_s"]
            out.append([tuple(str(row[i]) for i in keep) for row in cur.fetchall()])
    finally:
        conn.close()
    return out


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_docs_sql_examples_run_on_a_store_the_collector_filled(backend, tmp_path, geo_dbs,
                                                                request):
    """Each SQLite example runs against reports stored by the app and answers what the store
    holds; the PostgreSQL ones answer the same on the same reports."""
    db_url = (f"sqlite:///{tmp_path}/reports.db" if backend == "sqlite"
              else request.getfixturevalue("pg_url"))
    country, asn = geo_dbs
    app = create_app({"database-url": db_url, "geoip-country-db": str(country),
                      "geoip-asn-db": str(asn), "proxy-hops": 1,
                      "relay-url": [f"http://127.0.0.1:{free_port()}"],  # down: pending
                      "relay-token": "docs-sql-relay-token-0123", "relay-timeout": "0",
                      "relay-retry-min": "1h"})
    try:
        client = app.test_client()
        for address, endpoint, failure in SQL_REPORTS:
            response = client.post("/report", json=make_report(endpoint=endpoint,
                                                               failure=failure),
                                   headers={"X-Forwarded-For": address})
            assert response.status_code == 201, response.json
    finally:
        app.extensions["tunnel_telemetry"].close()
    results = _run_sql(db_url, backend, sql_examples(backend))
    assert len(results) == len(sql_examples("sqlite")) == len(sql_examples("postgres"))
    day, by_country, by_proto, failing, backlog, outcomes = results
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert day == [(today, "5")]
    assert by_country == [("AU", "3"), ("NO", "2")]
    assert by_proto == [("https", "1", "1"), ("ss", "3", "2"), ("vless", "1", "0")]
    assert failing[0] == ("AS13335", "tcp.connect", "ECONNREFUSED", "1") and len(failing) == 3
    assert backlog == [(next(iter(app.extensions["tunnel_telemetry"].relay.destinations())),
                        "5")]
    assert [row[1:] for row in outcomes] == [("pending", "5")]
    if backend == "postgres":
        assert results == _same_reports_in_sqlite(db_url, f"sqlite:///{tmp_path}/same.db")


def _same_reports_in_sqlite(pg_url: str, sqlite_url: str) -> list[list[tuple]]:
    """The SQLite examples' answers on a SQLite store holding PostgreSQL's rows."""
    open_store(sqlite_url).close()  # the app's schema
    with psycopg.connect(pg_url) as pg:
        reports = pg.execute("SELECT uuid, received, body::text FROM reports").fetchall()
        relays = pg.execute("SELECT uuid, destination, state, created, next_attempt "
                            "FROM relays").fetchall()
    with sqlite3.connect(sqlite_url[len("sqlite:///"):]) as conn:
        conn.executemany("INSERT INTO reports VALUES (?, ?, ?)",
                         [(u, r, json.dumps(json.loads(b))) for u, r, b in reports])
        conn.executemany("INSERT INTO relays (uuid, destination, state, created, next_attempt)"
                         " VALUES (?, ?, ?, ?, ?)", relays)
    return _run_sql(sqlite_url, "sqlite", sql_examples("sqlite"))
