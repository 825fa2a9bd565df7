"""Start a real tt-server (gunicorn) on loopback for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0,
             interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it is truthy or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def answers_200(url: str, timeout: float = 1.0) -> bool:
    """Whether GET ``url`` answers 200 now (False while nothing listens there)."""
    try:
        with requests.get(url, timeout=timeout) as resp:
            return resp.status_code == 200
    except requests.RequestException:
        return False


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0,
               what: str = "condition") -> None:
    """Like wait_for, but a timeout is a TimeoutError naming ``what``."""
    if not wait_for(predicate, timeout):
        raise TimeoutError(f"{what} not met after {timeout} s")


class TTServer:
    """A tt-server subprocess; logs go to files in ``workdir`` so tests can read them."""

    def __init__(self, workdir: str | os.PathLike, args: list[str] | None = None,
                 env: dict[str, str] | None = None, port: int | None = None,
                 command: list[str] | None = None, cwd: str | os.PathLike | None = None,
                 scheme: str = "http", host: str = "127.0.0.1",
                 verify: bool | str = True) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        # HTTPS: `host` is a name the certificate covers, `verify` a CA file that trusts it.
        self.url = f"{scheme}://{host}:{self.port}"
        self.verify = verify
        self.args = list(args or [])
        self.command = command
        self.cwd = Path(cwd) if cwd else self.workdir
        # Every test client is 127.0.0.1: one "client" sending a whole test's load. The
        # per-client limits (rate, uploads, open connections) are off unless a test turns them
        # on (a flag beats the environment).
        # Reports in tests carry their own client_asn / client_cc, so --ooni-relay runs without
        # geo databases unless a test says otherwise (OONI_RELAY_WITHOUT_GEO="").
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "RATE_LIMIT": "0",
                    "MAX_IN_FLIGHT_PER_CLIENT": "0", "MAX_CONNECTIONS_PER_CLIENT": "0",
                    "MAX_CONNECTIONS_PER_NETWORK": "0", "OONI_RELAY_WITHOUT_GEO": "1",
                    **(env or {})}
        self.env.pop("TT_CONFIG", None)
        self.proc: subprocess.Popen | None = None
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"

    def start(self, timeout: float = 20.0) -> TTServer:
        """Start and wait until /healthz answers."""
        cmd = self.command or [sys.executable, "-m", "tunnel_telemetry.cli",
                               "--listen", f"127.0.0.1:{self.port}", *self.args]
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=out,
                                         stderr=err, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"tt-server exited with {self.proc.returncode}: "
                                   f"{self.logs()[-2000:]}")
            try:
                with requests.get(self.url + "/healthz", timeout=1, verify=self.verify) as resp:
                    if resp.status_code in (200, 503):
                        return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"tt-server not ready after {timeout} s: {self.logs()[-2000:]}")

    def worker_pids(self) -> list[int]:
        """Pids of the gunicorn workers (children of the master)."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def logs(self) -> str:
        text = ""
        for path in (self.stdout_path, self.stderr_path):
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Signal the whole process group and wait; SIGKILL if it does not stop."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the master and all workers at once (a crash)."""
        self.stop(signal.SIGKILL)

    def __enter__(self) -> TTServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
