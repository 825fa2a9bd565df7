"""Automatic TLS: get and renew a certificate for `hostname` over ACME (RFC 8555), HTTP-01.

Certbot's `acme` library speaks the protocol (JWS, nonces, polling); this module decides when
to ask, answers the HTTP-01 challenge on a short-lived listener, and keeps the account key and
certificate in `autotls-cache-dir`. The certificate and its key are one PEM file, replaced
atomically, so a reader never sees a new certificate with an old key. Gunicorn's workers
pick a replaced file up on their next TLS connection (see `ReloadingSSLContext`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import signal
import ssl
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages, standalone
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .. import __version__, httpclient
from ..config import LETS_ENCRYPT, check_hostname, split_listen
from ..files import write_private

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.config import Config as GunicornConfig

    from ..config import Config

log = logging.getLogger(__name__)


ACCOUNT_KEY_FILE = "account-key.pem"
LOCK_FILE = ".lock"
NETWORK_TIMEOUT = 30  # seconds per ACME HTTP request
ORDER_TIMEOUT = 120  # seconds for validation + issuance of one order
ONE_DAY = datetime.timedelta(days=1)

_PEM_KEY = re.compile(
    rb"-----BEGIN (?:EC |RSA )?PRIVATE KEY-----.+?-----END (?:EC |RSA )?PRIVATE KEY-----\s*",
    re.DOTALL,
)


class AutoTLSError(Exception):
    """Getting or renewing a certificate failed; `reason` is a short code for logs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --- the cache directory ------------------------------------------------------------------


def ensure_private_dir(path: Path) -> None:
    """Create `path` with mode 0700, or tighten an existing directory we own to 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if stat.S_IMODE(info.st_mode) & 0o077:
        if info.st_uid == os.geteuid():
            os.chmod(path, 0o700)
            log.info("autotls: tightened %s to mode 0700", path)
        else:
            log.warning("autotls: %s is readable by other users (keys are 0600)", path)


def _private_key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Certificate:
    """A cached certificate (leaf facts) and the file gunicorn serves it from."""

    path: Path
    hostname: str
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    directory: str | None
    sha256: str

    @property
    def lifetime(self) -> datetime.timedelta:
        return self.not_after - self.not_before

    def remaining(self, now: datetime.datetime | None = None) -> datetime.timedelta:
        return self.not_after - (now or _now())

    def renew_window(self, renew_before_days: float) -> datetime.timedelta:
        """How long before expiry to renew: `renew_before_days`, unless that is not shorter
        than the certificate's whole lifetime (short-lived certificates); then a third of it.
        """
        wanted = datetime.timedelta(days=renew_before_days)
        return wanted if wanted < self.lifetime else self.lifetime / 3

    def due(self, renew_before_days: float, now: datetime.datetime | None = None) -> bool:
        return self.remaining(now) < self.renew_window(renew_before_days)

    def describe(self) -> str:
        return (f"{self.hostname} serial {self.serial:x}, valid until "
                f"{self.not_after:%Y-%m-%d %H:%M} UTC")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class CertCache:
    """The files in `autotls-cache-dir`: account key, and per host name `<name>.pem` (the
    full chain followed by its private key, 0600) plus `<name>.json` (which ACME directory
    issued it, for operators and to notice a changed `acme-directory`).
    """

    def __init__(self, directory: str | os.PathLike, hostname: str) -> None:
        self.dir = Path(directory)
        self.hostname = hostname
        self.cert_path = self.dir / f"{hostname}.pem"
        self.meta_path = self.dir / f"{hostname}.json"
        self.account_key_path = self.dir / ACCOUNT_KEY_FILE

    def prepare(self) -> None:
        try:
            ensure_private_dir(self.dir)
        except OSError as exc:
            raise AutoTLSError(
                "cache_dir", f"autotls-cache-dir {self.dir}: {exc.strerror or exc}"
            ) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise issuance between processes (tt-server and `tt-server renew`).

        POSIX record locks are not inherited by forked gunicorn workers, unlike flock().
        """
        self.prepare()
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def account_key(self) -> jose.JWK:
        """The ACME account key, created (EC P-256) on first use."""
        try:
            pem = self.account_key_path.read_bytes()
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            write_private(self.account_key_path, _private_key_pem(key))
            log.info("autotls: created ACME account key %s", self.account_key_path)
            return jose.JWKEC(key=key)
        loaded = serialization.load_pem_private_key(pem, password=None)
        if isinstance(loaded, rsa.RSAPrivateKey):
            return jose.JWKRSA(key=loaded)
        if isinstance(loaded, ec.EllipticCurvePrivateKey):
            return jose.JWKEC(key=loaded)
        raise AutoTLSError("account_key", f"{self.account_key_path}: unsupported key type")

    def load(self, directory: str | None = None, now: datetime.datetime | None = None
             ) -> Certificate | None:
        """The cached certificate if it is usable for `hostname` (and came from `directory`
        when given); None, with the reason logged, otherwise.
        """
        try:
            data = self.cert_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("autotls: cannot read %s: %s", self.cert_path, exc.strerror)
            return None
        try:
            cert = parse_cert_file(self.cert_path, data, self.hostname)
        except ValueError as exc:
            log.warning("autotls: ignoring cached %s: %s", self.cert_path, exc)
            return None
        meta = self._meta()
        cert = dataclasses.replace(cert, directory=meta.get("directory"))
        if directory is not None and cert.directory != directory:
            log.warning("autotls: cached certificate came from %s, acme-directory is %s: "
                        "getting a new one", cert.directory, directory)
            return None
        if cert.remaining(now) <= datetime.timedelta(0):
            log.warning("autotls: cached certificate expired on %s", cert.not_after)
            return None
        return cert

    def _meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.meta_path.read_text())
            return meta if isinstance(meta, dict) else {}
        except (OSError, ValueError):
            return {}

    def save(self, key_pem: bytes, fullchain_pem: bytes, directory: str) -> Certificate:
        """Store a new certificate (atomically) and return it."""
        data = fullchain_pem.rstrip(b"\n") + b"\n" + key_pem
        cert = parse_cert_file(self.cert_path, data, self.hostname)
        write_private(self.meta_path, json.dumps({
            "hostname": self.hostname,
            "directory": directory,
            "serial": f"{cert.serial:x}",
            "not_before": cert.not_before.isoformat(),
            "not_after": cert.not_after.isoformat(),
            "sha256": cert.sha256,
        }, indent=2).encode() + b"\n")
        write_private(self.cert_path, data)
        return dataclasses.replace(cert, directory=directory)


def parse_cert_file(path: Path, data: bytes, hostname: str) -> Certificate:
    """Check a chain + key PEM: key matches the leaf, the leaf names `hostname`."""
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError("no PEM certificate") from None
    match = _PEM_KEY.search(data)
    if match is None:
        raise ValueError("no private key")
    key = serialization.load_pem_private_key(match.group(0), password=None)
    leaf = chain[0]
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise ValueError("private key does not match the certificate")
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns_names = {n.lower() for n in names.value.get_values_for_type(x509.DNSName)}
    except x509.ExtensionNotFound:
        dns_names = set()
    if hostname not in dns_names:
        raise ValueError(f"certificate is not for {hostname}")
    return Certificate(
        path=path,
        hostname=hostname,
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        directory=None,
        sha256=hashlib.sha256(leaf.public_bytes(der)).hexdigest(),
    )


# --- ACME ------------------------------------------------------------------------------

# acme's challenge server logs each validator's address at DEBUG: keep it quiet.
logging.getLogger("acme.standalone").setLevel(logging.INFO)


@dataclass(frozen=True)
class ACMESettings:
    """Where and how to talk ACME."""

    directory: str = LETS_ENCRYPT
    ca_bundle: str | None = None  # CA file for the directory's HTTPS (private ACME, pebble)
    email: str | None = None
    http_host: str = ""  # HTTP-01 listener address ("" = all, IPv4 and IPv6)
    http_port: int = 80

    @property
    def verify(self) -> bool | str:
        return self.ca_bundle or True


def _problem(exc: BaseException) -> str:
    if isinstance(exc, messages.Error):
        return exc.detail or exc.description or str(exc.typ)
    return str(exc) or type(exc).__name__


def _validation_detail(exc: errors.ValidationError) -> str:
    details = []
    for authzr in exc.failed_authzrs:
        for challb in authzr.body.challenges:
            if challb.error is not None:
                details.append(f"{challb.chall.typ}: {_problem(challb.error)}")
    return "; ".join(details) or "no detail from the ACME server"


def issue(settings: ACMESettings, account_key: jose.JWK, hostname: str) -> tuple[bytes, bytes]:
    """Order a certificate for `hostname`; returns (private key PEM, full chain PEM).

    Registers (or finds) the account, answers HTTP-01 on `settings.http_host:http_port`
    for the duration of the order, and raises AutoTLSError with a one-line reason.
    """
    alg = jose.ES256 if isinstance(account_key, jose.JWKEC) else jose.RS256
    net = client.ClientNetwork(
        account_key, alg=alg, verify_ssl=settings.verify,  # type: ignore[arg-type]
        user_agent=f"tunnel-telemetry/{__version__} acme-python", timeout=NETWORK_TIMEOUT,
    )
    where = settings.directory
    try:
        acme = client.ClientV2(client.ClientV2.get_directory(settings.directory, net), net)
        _register(acme, settings.email)
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = _private_key_pem(key)
        order = acme.new_order(crypto_util.make_csr(key_pem, [hostname]))
        answers = []
        resources = set()
        for authzr in order.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue  # the CA reused an earlier validation
            challb = next((c for c in authzr.body.challenges
                           if isinstance(c.chall, challenges.HTTP01)), None)
            if challb is None:
                raise AutoTLSError("no_http01", f"{where} offers no HTTP-01 challenge")
            response, validation = challb.response_and_validation(account_key)
            resources.add(standalone.HTTP01RequestHandler.HTTP01Resource(
                chall=challb.chall, response=response, validation=validation))
            answers.append((challb, response))
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
        with _http01_listener(settings, resources):
            for challb, response in answers:
                acme.answer_challenge(challb, response)
            order = acme.poll_and_finalize(order, deadline)
        return key_pem, order.fullchain_pem.encode()
    except AutoTLSError:
        raise
    except errors.ValidationError as exc:
        raise AutoTLSError("challenge_failed", f"{where} could not validate {hostname} over "
                           f"HTTP-01 (port {settings.http_port} must reach this server): "
                           f"{_validation_detail(exc)}") from None
    except errors.TimeoutError:
        raise AutoTLSError("acme_timeout", f"{where}: order for {hostname} timed out") from None
    except messages.Error as exc:
        raise AutoTLSError("acme_error", f"{where}: {exc.typ}: {_problem(exc)}") from None
    except requests.RequestException as exc:
        raise AutoTLSError("acme_unreachable", f"{where} unreachable: "
                           f"{type(exc).__name__}: {_short(exc)}") from None
    except errors.Error as exc:
        raise AutoTLSError("acme_error", f"{where}: {_problem(exc)}") from None
    finally:
        net.session.close()


def _short(exc: BaseException) -> str:
    text = str(exc)
    # urllib3 wraps the useful part ("[Errno 111] Connection refused") deep inside.
    match = re.search(r"\[Errno [^\]]+\] [^'\")]+|CERTIFICATE_VERIFY_FAILED[^'\")]*", text)
    return match.group(0) if match else text[:200]


def _register(acme: client.ClientV2, email: str | None) -> None:
    """Create the account, or find the existing one for this key (RFC 8555 7.3.1)."""
    new = messages.NewRegistration.from_data(email=email, terms_of_service_agreed=True)
    try:
        acme.new_account(new)
    except errors.ConflictError as exc:
        acme.net.account = messages.RegistrationResource(
            uri=exc.location, body=messages.Registration())


@contextlib.contextmanager
def _http01_listener(settings: ACMESettings, resources: set) -> Iterator[None]:
    if not resources:
        yield
        return
    host = "" if settings.http_host in ("", "0.0.0.0", "::") else settings.http_host  # noqa: S104
    try:
        servers = standalone.HTTP01DualNetworkedServers(
            (host, settings.http_port), resources, timeout=10)
    except OSError as exc:
        raise AutoTLSError(
            "http01_port",
            f"cannot listen on {host or '*'}:{settings.http_port} for the HTTP-01 challenge: "
            f"{exc.strerror or exc}"
            + (" (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
               if settings.http_port < 1024 else ""),
        ) from None
    servers.serve_forever()
    try:
        yield
    finally:
        servers.shutdown_and_server_close()


# --- policy: when to talk to the CA ---------------------------------------------------------


class AutoTLS:
    """The certificate for one host name: reuse from cache, obtain, renew."""

    def __init__(self, hostname: str, cache_dir: str | os.PathLike, acme: ACMESettings,
                 renew_before_days: float = 30,
                 issuer: Callable[[ACMESettings, jose.JWK, str], tuple[bytes, bytes]] = issue,
                 clock: Callable[[], datetime.datetime] = _now) -> None:
        self.hostname = check_hostname(hostname)
        self.cache = CertCache(cache_dir, self.hostname)
        self.acme = acme
        self.renew_before_days = renew_before_days
        self._issue = issuer
        self.clock = clock
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config) -> AutoTLS:
        """Build from a Config (autotls on)."""
        if not config.hostname:  # load_config requires it with autotls
            raise AutoTLSError("no_hostname", "autotls: --hostname is required")
        host, _port = split_listen(config.listen)
        return cls(
            config.hostname,
            config.autotls_cache_dir,
            ACMESettings(
                directory=config.acme_directory,
                ca_bundle=config.acme_ca_bundle,
                email=config.acme_email,
                http_host=host,
                http_port=config.acme_http_port,
            ),
            renew_before_days=config.renew_before_days,
        )

    @property
    def cert_path(self) -> Path:
        """The PEM (chain + key) gunicorn serves; stable across renewals."""
        return self.cache.cert_path

    def current(self) -> Certificate | None:
        """The cached, unexpired certificate from the configured directory, if any."""
        return self.cache.load(self.acme.directory, self.clock())

    def ensure(self) -> Certificate:
        """Before serving: the cached certificate when still valid (no ACME request, even
        when renewal is due: the background renewer does that), else a new one.
        """
        cert = self.current()
        if cert is not None:
            log.info("autotls: using cached certificate: %s", cert.describe())
            return cert
        return self.renew(force=True)

    def renew(self, force: bool = False) -> Certificate:
        """Obtain a new certificate when due (or `force`); returns the one now cached."""
        with self._lock, self.cache.locked():
            cert = self.current()  # another process may have renewed meanwhile
            if (cert is not None and not force
                    and not cert.due(self.renew_before_days, self.clock())):
                return cert
            why = "forced" if force and cert is not None else (
                "due" if cert is not None else "none cached")
            log.info("autotls: requesting a certificate for %s from %s (%s)",
                     self.hostname, self.acme.directory, why)
            key_pem, chain_pem = self._issue(
                self.acme, self.cache.account_key(), self.hostname)
            try:
                new = self.cache.save(key_pem, chain_pem, self.acme.directory)
            except ValueError as exc:
                raise AutoTLSError("bad_certificate", f"ACME server sent an unusable "
                                   f"certificate: {exc}") from None
            except OSError as exc:
                raise AutoTLSError("cache_dir", f"cannot write {self.cache.cert_path}: "
                                   f"{exc.strerror or exc}") from None
            log.info("autotls: new certificate: %s", new.describe())
            if datetime.timedelta(days=self.renew_before_days) >= new.lifetime:
                log.warning("autotls: renew-before-days (%s) is not shorter than the "
                            "certificate lifetime (%.1f days): renewing when a third of it "
                            "remains", self.renew_before_days, new.lifetime / ONE_DAY)
            return new

    def next_check(self, check_interval: float) -> float:
        """Seconds until renewal is due (0 when due now), at most `check_interval`."""
        cert = self.current()
        if cert is None:
            return 0.0
        window = cert.renew_window(self.renew_before_days)
        due_in = (cert.remaining(self.clock()) - window).total_seconds()
        return max(0.0, min(check_interval, due_in))


def retry_delays(check_interval: float) -> Iterator[float]:
    """Back-off after failed renewals (``tunnel_telemetry.httpclient.backoff``): a quarter check
    interval (at most 5 minutes), doubling, capped at one check interval, less up to 20 % at
    random so retries do not align.
    """
    first = max(1.0, min(300.0, check_interval / 4))
    for attempt in itertools.count():
        yield httpclient.backoff(attempt, first, check_interval, jitter=0.2)


def check_and_renew(tls: AutoTLS, check_interval: float) -> dict[str, Any]:
    """One renewal check: renew if due; a JSON-able summary for the renewer."""
    try:
        cert = tls.renew()
    except AutoTLSError as exc:
        current = tls.current()
        return {"ok": False, "reason": exc.reason, "error": str(exc),
                "serving": current.describe() if current else None}
    return {"ok": True, "certificate": cert.describe(),
            "next_check": tls.next_check(check_interval) or check_interval}


CHILD_TIMEOUT = ORDER_TIMEOUT + 4 * NETWORK_TIMEOUT
_CHILD = "import sys; from tunnel_telemetry.tls.autotls import child_main; sys.exit(child_main())"
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


class Renewer:
    """Background renewal for the gunicorn master: a thread that, when renewal may be due,
    runs one check in a fresh child process (`child_main`) and backs
    off when it fails. The still-valid certificate keeps being served meanwhile.

    The ACME and crypto work happens in the child, not in this thread: the master forks
    workers at any time, and a fork while a thread holds an OpenSSL lock would leave that
    lock held forever in the worker.
    """

    def __init__(self, tls: AutoTLS, check_interval: float = 12 * 3600.0,
                 debug: bool = False) -> None:
        self.tls = tls
        self.check_interval = max(1.0, check_interval)
        self.debug = debug
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._child: int | None = None  # pid of the running check

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="autotls-renewer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; a renewal in progress is abandoned (its child is killed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def check(self) -> dict[str, Any]:
        """Run one check in a child process; its log lines go to our stderr.

        posix_spawn, no pipes: the master forks workers at any moment, and a worker that
        inherited a pipe end (ours, or the exec-error pipe subprocess uses) would keep the
        EOF we wait for from ever coming. Parameters go in argv, the result in a file.
        """
        params = {
            "hostname": self.tls.hostname,
            "cache_dir": str(self.tls.cache.dir),
            "acme": dataclasses.asdict(self.tls.acme),
            "renew_before_days": self.tls.renew_before_days,
            "check_interval": self.check_interval,
            "debug": self.debug,
        }
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": _PACKAGE_PARENT + (os.pathsep + path if path else "")}
        fd, result_path = tempfile.mkstemp(prefix="tt-autotls-", suffix=".json")
        os.close(fd)
        try:
            try:
                child = self._child = os.posix_spawn(
                    sys.executable, [sys.executable, "-c", _CHILD, json.dumps(params),
                                     result_path], env,
                    file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
                    # Its own process group: a stop signal to ours (Ctrl-C, kill -TERM -PGID)
                    # is the master's to handle; stop() kills an unfinished child itself.
                    setpgroup=0)
            except OSError as exc:
                return {"ok": False, "reason": "error", "serving": None,
                        "error": f"cannot start the renewal process: {exc}"}
            if not self._wait_child(child, CHILD_TIMEOUT):
                self._end_child()
                return {"ok": False, "reason": "timeout", "serving": None,
                        "error": f"no answer from the renewal process after {CHILD_TIMEOUT}s"}
            try:
                result = json.loads(Path(result_path).read_text())
            except (OSError, ValueError):
                result = None
        finally:
            self._child = None
            with contextlib.suppress(OSError):
                os.unlink(result_path)
        if not isinstance(result, dict) or "ok" not in result:
            return {"ok": False, "reason": "error", "serving": None,
                    "error": "the renewal process failed (see its traceback above)"}
        return result

    def _wait_child(self, child: int, timeout: float) -> bool:
        """Wait for the child to exit (True), or for stop() / the timeout (False)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, _status = os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                return True  # gunicorn's SIGCHLD handler reaped it for us
            if pid:
                return True
            if self._stop.is_set() or time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def _end_child(self) -> None:
        pid = self._child
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def _run(self) -> None:
        delay = 0.0  # check at once: the cached certificate may be due already
        backoff = retry_delays(self.check_interval)
        while not self._stop.wait(delay):
            result = self.check()
            if self._stop.is_set():
                return
            if result["ok"]:
                if self.failures:
                    log.info("autotls: renewal succeeded after %d failed attempts",
                             self.failures)
                self.failures = 0
                backoff = retry_delays(self.check_interval)
                delay = float(result["next_check"])
                continue
            self.failures += 1
            delay = next(backoff)
            still = (f"still serving {result['serving']}" if result.get("serving")
                     else "no valid certificate to serve")
            log.error("autotls: renewal failed [%s] (attempt %d): %s; retrying in %.0fs; %s",
                      result["reason"], self.failures, result["error"], delay, still)


def child_main() -> int:
    """The renewal child process: one check for Renewer (argv: JSON parameters, result file)."""
    from ..logs import setup_logging

    params = json.loads(sys.argv[1])
    setup_logging(params.get("debug", False))
    tls = AutoTLS(params["hostname"], params["cache_dir"], ACMESettings(**params["acme"]),
                  renew_before_days=params["renew_before_days"])
    result = check_and_renew(tls, params["check_interval"])
    Path(sys.argv[2]).write_text(json.dumps(result))
    return 0


# --- serving: gunicorn glue -------------------------------------------------------------------


class TLSConfigError(Exception):
    """certfile / keyfile cannot be served."""


def check_cert_pair(certfile: str, keyfile: str | None) -> None:
    """Load the pair as gunicorn will, so a bad file fails at start-up with one line."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise TLSConfigError(f"certfile: cannot load {certfile} with {keyfile}: "
                             f"{reason}") from None



def _stamp(*paths: str | None) -> tuple:
    out = []
    for path in paths:
        if path:
            info = os.stat(path)
            out.append((info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size))
    return tuple(out)


class ReloadingSSLContext:
    """Gunicorn `ssl_context` hook: one SSLContext per process and version of certfile/keyfile.

    A worker asks for its context once and serves every connection from it; on each TLS
    ClientHello that context's ``sni_callback`` checks the files' identity (``stat``) and, when
    they changed (renewal, or certbot replacing a `certfile`), hands the connection the context
    of the new files, so new connections get the new certificate without restarting workers.
    If the new files do not load (e.g. a key and certificate replaced one after the other),
    the previous context keeps serving until they do. A context is made in the process that
    uses it: one inherited from the master predates gevent's patching of ``ssl`` in a worker,
    and its sockets would block the whole worker. In a gevent worker, connections are wrapped
    without a handshake, which the worker then runs with a deadline (server/worker.py).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._stamp: tuple | None = None
        self._pid = os.getpid()

    def __call__(self, conf: GunicornConfig,
                 default_ssl_context_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        try:
            stamp = _stamp(conf.certfile, conf.keyfile)
        except OSError:
            stamp = None  # being replaced: keep what we have
        with self._lock:
            if self._pid != os.getpid():
                self._context, self._stamp, self._pid = None, None, os.getpid()
            if self._context is not None and (stamp is None or stamp == self._stamp):
                return self._context
            try:
                context = default_ssl_context_factory()
            except (OSError, ssl.SSLError, ValueError) as exc:
                if self._context is None:
                    raise
                log.warning("tls: cannot load %s (%s); serving the previous certificate",
                            conf.certfile, exc)
                self._stamp = stamp  # retry when the files change again
                return self._context
            context.sni_callback = self._follow(conf, default_ssl_context_factory)
            if context.sslsocket_class.__module__.startswith("gevent"):
                context.sslsocket_class = _handshake_later(context.sslsocket_class)
            self._context, self._stamp = context, stamp
            return context

    def _follow(self, conf: GunicornConfig, factory: Callable[[], ssl.SSLContext]
                ) -> Callable[[ssl.SSLObject, str, ssl.SSLContext], None]:
        def on_hello(connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                     context: ssl.SSLContext) -> None:
            current = self(conf, factory)
            if current is not context:
                connection.context = current
        return on_hello


def _handshake_later(base: type) -> type:
    """``base`` (gevent's SSLSocket) wrapping a connection without its handshake."""

    class HandshakeLater(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["do_handshake_on_connect"] = False
            super().__init__(*args, **kwargs)

    return HandshakeLater


_renewer: Renewer | None = None


def gunicorn_tls_options(config: Config) -> dict[str, Any]:
    """Gunicorn settings for HTTPS: certfile/keyfile, the reloading ssl_context hook, an
    on_starting hook that (with autotls) gets the certificate before binding and loads it
    once in the master, and (with autotls) the renewer thread in the master.
    """
    if not (config.autotls or config.certfile):
        return {}
    tls = AutoTLS.from_config(config) if config.autotls else None

    def on_starting(server: Arbiter) -> None:
        # tt-server already got the certificate in prepare_tls(); `gunicorn app:app` has not.
        if tls is not None and tls.current() is None:
            tls.ensure()
        # Build the context in the master: every forked worker starts with a good one, so a
        # half-replaced pair later (new key, old certificate) never leaves a worker without.
        from gunicorn.sock import ssl_context

        ssl_context(server.cfg)

    options: dict[str, Any] = {
        "certfile": str(tls.cert_path) if tls else config.certfile,
        "keyfile": None if tls else config.keyfile,
        "ssl_context": ReloadingSSLContext(),
        "on_starting": on_starting,
    }
    if tls is None:
        return options

    def when_ready(server: Arbiter) -> None:
        global _renewer
        if _renewer is None:
            _renewer = Renewer(tls, config.autotls_check_interval, debug=config.debug)
            _renewer.start()

    def on_exit(server: Arbiter) -> None:
        if _renewer is not None:
            _renewer.stop()

    return {**options, "when_ready": when_ready, "on_exit": on_exit}
