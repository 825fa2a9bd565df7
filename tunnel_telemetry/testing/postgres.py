"""A throwaway PostgreSQL server for tests and benchmarks, from the distribution's binaries.

``PostgresCluster`` runs ``initdb`` in a temporary directory and starts ``postgres`` on a free
127.0.0.1 port (its unix socket in that directory too), as an unprivileged user when running as
root (PostgreSQL refuses to run as root). ``temporary_schema(url)`` gives each test an empty
schema on a shared server, which also works with a server given by ``TT_TEST_DATABASE_URL``.

The pytest fixtures at the end are used by tests/conftest.py.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from .server import free_port

ENV_URL = "TT_TEST_DATABASE_URL"
ENV_BINDIR = "TT_PG_BINDIR"
ENV_REQUIRE = "TT_REQUIRE_POSTGRES"  # set by CI: a missing PostgreSQL fails instead of skipping
UNPRIVILEGED_USER = "nobody"


def find_bindir() -> Path | None:
    """Where initdb and postgres are: $TT_PG_BINDIR, PATH, or Debian's /usr/lib/postgresql/N/bin."""
    candidates: list[Path] = []
    if os.environ.get(ENV_BINDIR):
        candidates.append(Path(os.environ[ENV_BINDIR]))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    debian.sort(key=lambda p: [int(x) for x in re.findall(r"\d+", p)], reverse=True)
    candidates.extend(Path(p) for p in debian)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    return None


def with_search_path(url: str, schema: str) -> str:
    """``url`` with ``options=-c search_path=<schema>`` added to its query."""
    parts = urlsplit(url)
    option = "options=" + quote(f"-c search_path={schema}", safe="")
    query = f"{parts.query}&{option}" if parts.query else option
    return urlunsplit(parts._replace(query=query))


@contextmanager
def temporary_schema(url: str, prefix: str = "tt_test_") -> Iterator[str]:
    """An empty schema on the server at ``url``; yields a URL whose search_path is it."""
    import psycopg  # noqa: PLC0415 - optional dependency

    schema = prefix + secrets.token_hex(6)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '10s'")
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


class PostgresCluster:
    """A private PostgreSQL server: initdb, start, stop; ``url`` points at database tt_test.

    ``fast`` turns fsync off: right for tests (the server itself is never crashed), wrong for
    figures meant to compare with a real deployment.
    """

    def __init__(self, bindir: str | os.PathLike | None = None, *, fast: bool = True,
                 user: str | None = None, dbname: str = "tt_test") -> None:
        found = Path(bindir) if bindir else find_bindir()
        if found is None:
            raise FileNotFoundError("PostgreSQL binaries (initdb, postgres) not found")
        self.bindir = found
        self.fast = fast
        self.user = user or (UNPRIVILEGED_USER if os.geteuid() == 0 else None)
        self.dbname = dbname
        self.password = secrets.token_hex(12)
        self.port = 0
        self.workdir: Path | None = None
        self.proc: subprocess.Popen | None = None

    # -- URLs ------------------------------------------------------------------------------

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{dbname}"

    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    # -- life cycle --------------------------------------------------------------------------

    def _as_user(self) -> dict[str, Any]:
        """Popen arguments that drop root to the unprivileged user."""
        if self.user is None:
            return {}
        entry = pwd.getpwnam(self.user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _temp_root(self) -> str:
        """The temp dir, unless the unprivileged user cannot reach it (then /tmp)."""
        root = Path(tempfile.gettempdir()).resolve()
        if self.user is None:
            return str(root)
        reachable = all(p.stat().st_mode & 0o001 for p in (root, *root.parents))
        return str(root) if reachable else "/tmp"  # noqa: S108 - world-traversable by design

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self, timeout: float = 30.0) -> PostgresCluster:
        """initdb and start the server, then create the database; returns self."""
        # Directly under the temp root: pytest's own tmp dirs are 0700 root, out of reach for
        # the unprivileged user; the unix socket path must also stay short (< 108 bytes).
        self.workdir = Path(tempfile.mkdtemp(prefix="tt-pg-", dir=self._temp_root()))
        try:
            self._initdb()
            self.start_server(timeout)
            import psycopg  # noqa: PLC0415 - optional dependency

            with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {self.dbname}")
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb(self) -> None:
        assert self.workdir is not None
        self._chown(self.workdir)
        os.chmod(self.workdir, 0o700)
        pwfile = self.workdir / "pw"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        try:
            subprocess.run(
                [str(self.bindir / "initdb"), "-D", str(self.workdir / "data"), "-U", "postgres",
                 f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                 "-E", "UTF8", "--locale=C", "--no-sync"],
                cwd=self.workdir, capture_output=True, text=True, check=True, timeout=120,
                **self._as_user())
        except subprocess.CalledProcessError as exc:
            output = (exc.stderr or exc.stdout).strip()[-2000:]
            raise RuntimeError(f"initdb failed: {output}") from None
        finally:
            pwfile.unlink()

    def start_server(self, timeout: float = 30.0) -> None:
        """Start postgres (again, on the same port after ``stop_server``) and wait for it."""
        for _attempt in range(3):
            if self._launch(timeout):
                return
            self.port = 0  # taken meanwhile by someone else: try another one
        raise RuntimeError(f"postgres did not start: {self.log()[-2000:]}")

    def _launch(self, timeout: float) -> bool:
        """One try; False when the port was taken meanwhile."""
        import psycopg  # noqa: PLC0415 - optional dependency

        assert self.workdir is not None
        self.port = self.port or free_port()
        settings = {
            "listen_addresses": "127.0.0.1", "port": str(self.port),
            "unix_socket_directories": str(self.workdir), "max_connections": "200",
            "shared_buffers": "64MB", "logging_collector": "off", "log_min_messages": "warning",
        }
        if self.fast:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        cmd = [str(self.bindir / "postgres"), "-D", str(self.workdir / "data")]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        log_start = len(self.log())
        with open(self.workdir / "postgres.log", "ab") as logfile:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=logfile,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         **self._as_user())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                log = self.log()[log_start:]
                if "could not bind" in log or "already in use" in log:
                    return False
                raise RuntimeError(f"postgres exited: {log[-2000:]}")
            try:
                with psycopg.connect(self.url_for("postgres"), connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        raise TimeoutError(f"postgres not ready after {timeout} s: {self.log()[-2000:]}")

    def log(self) -> str:
        path = self.workdir / "postgres.log" if self.workdir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def stop_server(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: clients are disconnected); the data directory stays."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and remove its directory."""
        self.stop_server(timeout)
        self._remove()

    def _remove(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# -- pytest fixtures (imported by tests/conftest.py) ---------------------------------------

SKIP_REASON = ("no PostgreSQL: binaries not found (install Debian's postgresql package, "
               f"set {ENV_BINDIR}, or give a server in {ENV_URL})")


def postgres_server_fixture() -> Iterator[str]:
    """Session: the URL of a server, ${ENV_URL} or a throwaway cluster; skip if neither."""
    import pytest  # noqa: PLC0415 - only under pytest

    if os.environ.get(ENV_URL):
        yield os.environ[ENV_URL]
        return
    bindir = find_bindir()
    if bindir is None:
        if os.environ.get(ENV_REQUIRE):
            pytest.fail(f"{ENV_REQUIRE} is set but {SKIP_REASON}")
        pytest.skip(SKIP_REASON)
    with PostgresCluster(bindir) as cluster:
        yield cluster.url


def pg_url_fixture(postgres_server: str) -> Iterator[str]:
    """Per test: a URL whose tables live in a fresh schema, dropped afterwards."""
    with temporary_schema(postgres_server) as url:
        yield url

