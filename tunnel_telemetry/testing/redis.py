"""A throwaway Redis server for tests, from the distribution's ``redis-server``.

It listens on a free 127.0.0.1 port, keeps nothing on disk and is stopped by ``stop``. The
pytest fixture at the end skips when the binary is missing, unless $TT_REQUIRE_REDIS is set
(CI installs it: there a missing Redis is a failure).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .server import free_port

ENV_REQUIRE = "TT_REQUIRE_REDIS"


class RedisServer:
    """``redis-server`` on 127.0.0.1, no persistence; ``url`` is its redis:// URL."""

    def __init__(self, binary: str = "redis-server") -> None:
        found = shutil.which(binary)
        if found is None:
            raise FileNotFoundError(f"{binary} not found")
        self.binary = found
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        import redis  # noqa: PLC0415 - a test dependency

        self.workdir = Path(tempfile.mkdtemp(prefix="tt-redis-"))
        for _attempt in range(3):  # the free port may be taken meanwhile: try another one
            self.port = free_port()
            log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - the child's stdout
            with log:
                self.proc = subprocess.Popen(
                    [self.binary, "--bind", "127.0.0.1", "--port", str(self.port),
                     "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                        return self
                except redis.ConnectionError:
                    time.sleep(0.02)
            self.stop_process()
        raise RuntimeError("redis-server did not start: "
                           + (self.workdir / "redis.log").read_text()[-2000:])

    def client(self) -> Any:
        import redis  # noqa: PLC0415

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def stop_process(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        self.stop_process()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def redis_server_fixture() -> Iterator[RedisServer]:
    """pytest fixture body: a running RedisServer, or a skip when redis-server is missing."""
    import pytest  # noqa: PLC0415

    try:
        server = RedisServer()
    except FileNotFoundError:
        if os.environ.get(ENV_REQUIRE):
            raise
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    server.start()
    try:
        yield server
    finally:
        server.stop()
