"""Run Debian's `pebble` ACME test server (and its mock DNS) on loopback for tests.

Pebble really validates challenges: its VA resolves the hostname through
`pebble-challtestsrv` (answers 127.0.0.1 for every name) and connects to `http_port`,
where the code under test must serve the HTTP-01 response.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PEBBLE = "pebble"
CHALLTESTSRV = "pebble-challtestsrv"


def pebble_missing() -> str | None:
    """Why pebble tests cannot run here (None when they can)."""
    for binary in (PEBBLE, CHALLTESTSRV):
        if shutil.which(binary) is None:
            return f"{binary} not installed (apt-get install pebble)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_listener_cert(directory: Path) -> tuple[Path, Path, Path]:
    """Make a throwaway CA and a 127.0.0.1/localhost certificate for pebble's HTTPS API.

    Debian's package ships no test certificates. Returns (ca.pem, cert.pem, key.pem).
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tt test pebble API CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "api-ca.pem", directory / "api-cert.pem", directory / "api-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class Pebble:
    """A pebble + pebble-challtestsrv pair on 127.0.0.1 ports; use as a context manager.

    Attributes once started: `directory` (ACME directory URL), `ca_bundle` (file that
    verifies pebble's own HTTPS API), `http_port` (where pebble's VA sends HTTP-01
    requests), `root_pem` (pebble's issuing root, bytes) and `root_file` (the same on disk).
    """

    def __init__(self, workdir: Path | None = None, http_port: int | None = None,
                 validity: int | None = None) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="tt-pebble-")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port or _free_port()
        self.validity = validity  # certificate lifetime in seconds (pebble default: 5 years)
        self.acme_port = _free_port()
        self.mgmt_port = _free_port()
        self.dns_port = _free_udp_port()
        self.challtest_mgmt_port = _free_port()
        self.directory = f"https://127.0.0.1:{self.acme_port}/dir"
        self.log_path = self.workdir / "pebble.log"
        self._procs: list[subprocess.Popen] = []
        self._logs: list = []
        self.ca_bundle: Path | None = None
        self.root_pem = b""
        self.root_file = self.workdir / "pebble-root.pem"

    def __enter__(self) -> Pebble:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 15.0) -> None:
        """Start challtestsrv then pebble; wait until the directory answers."""
        ca, cert, key = write_listener_cert(self.workdir)
        self.ca_bundle = ca
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.acme_port}",
                "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
                "certificate": str(cert),
                "privateKey": str(key),
                "httpPort": self.http_port,
                "tlsPort": _free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        if self.validity:
            config["pebble"]["certificateValidityPeriod"] = self.validity
        config_path = self.workdir / "pebble-config.json"
        config_path.write_text(json.dumps(config))
        # Mock DNS: every A query answers 127.0.0.1, no AAAA (tt-server listens on IPv4
        # loopback in tests); its own challenge responders are disabled.
        self._spawn(
            [
                CHALLTESTSRV,
                "-defaultIPv4", "127.0.0.1",
                "-defaultIPv6", "",
                "-dns01", f"127.0.0.1:{self.dns_port}",
                "-http01", "",
                "-https01", "",
                "-tlsalpn01", "",
                "-management", f"127.0.0.1:{self.challtest_mgmt_port}",
            ],
            self.workdir / "challtestsrv.log",
            {},
        )
        env = {
            "PEBBLE_VA_NOSLEEP": "1",  # validate at once (tests stay fast)
            "PEBBLE_WFE_NONCEREJECT": "0",  # no random badNonce: tests stay deterministic
            "PEBBLE_AUTHZREUSE": "0",  # every order really validates a challenge
        }
        self._spawn(
            [
                PEBBLE,
                "-config", str(config_path),
                "-dnsserver", f"127.0.0.1:{self.dns_port}",
                "-strict", "false",
            ],
            self.log_path,
            env,
        )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited: {self.log()}")
            try:
                with requests.Session() as s:
                    s.get(self.directory, verify=str(ca), timeout=2).raise_for_status()
                    root = s.get(
                        f"https://127.0.0.1:{self.mgmt_port}/roots/0", verify=str(ca), timeout=2
                    )
                    root.raise_for_status()
                self.root_pem = root.content
                self.root_file.write_bytes(self.root_pem)
                return
            except requests.RequestException as exc:
                last = exc
                time.sleep(0.1)
        raise RuntimeError(f"pebble did not start: {last}; log: {self.log()}")

    def _spawn(self, argv: list[str], log_path: Path, extra_env: dict) -> None:
        log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        env = {**os.environ, **extra_env}
        env.pop("PEBBLE_VA_ALWAYS_VALID", None)
        self._procs.append(
            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        )

    def log(self) -> str:
        """Pebble's log so far (every ACME request it served is in it)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def count(self, needle: str) -> int:
        """How many pebble log lines contain `needle` (e.g. "POST /order-plz")."""
        return sum(needle in line for line in self.log().splitlines())

    def pause(self) -> None:
        """Freeze pebble (SIGSTOP): any ACME request would hang instead of being answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        if self._procs and self._procs[-1].poll() is None:
            self._procs[-1].send_signal(sig)

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
