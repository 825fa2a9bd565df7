"""Getting the geo databases: `tt-server geo update`, and the collector updating itself.

Downloading is an operator's chore, like getting a certificate (tls/autotls.py), not a step of
the report pipeline: pipeline/geo.py stays the reader and this module is the only one talking
to the providers, hence a module of its own beside the rooms. It fetches a provider's country
and ASN databases into geo-dir, checks them (a MaxMind DB of the expected type, built no
earlier than the one in place, matching the provider's checksum where one is published) and
installs them by rename, keeping the previous copy; the collector reopens them on SIGHUP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import signal
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import maxminddb
import requests
import urllib3

log = logging.getLogger(__name__)

COUNTRY_FILE = "country.mmdb"
ASN_FILE = "asn.mmdb"
FILES = {"country": COUNTRY_FILE, "asn": ASN_FILE}
MANIFEST = "geo-update.json"
LOCK_FILE = ".geo-update.lock"
MAX_SIZE = 512 * 1024 * 1024  # an uncompressed database larger than this is not one
CHUNK = 1024 * 1024


class GeoUpdateError(Exception):
    """The update failed; `str()` is one line for the operator. Nothing was installed."""


class GeoUpdateConfigError(GeoUpdateError):
    """The update cannot start: a missing credential, a bad option (exit 2)."""


@dataclasses.dataclass(frozen=True)
class Provider:
    """Where a provider's databases are and what they must be."""

    name: str
    title: str
    base_url: str
    licence: str
    attribution: str
    schedule: str
    # role -> what its database_type must start with (lower case); "country+asn": one file
    types: dict[str, tuple[str, ...]]


PROVIDERS = {
    "dbip": Provider(
        "dbip", "DB-IP Lite", "https://download.db-ip.com", "CC BY 4.0",
        "IP Geolocation by DB-IP (https://db-ip.com)", "monthly (the 1st)",
        {"country": ("dbip-country",), "asn": ("dbip-asn",)}),
    "maxmind": Provider(
        "maxmind", "MaxMind GeoLite2", "https://updates.maxmind.com", "GeoLite2 EULA",
        "This product includes GeoLite2 data created by MaxMind, available from "
        "https://www.maxmind.com", "twice a week (Tuesday and Friday)",
        {"country": ("geolite2-country",), "asn": ("geolite2-asn",)}),
    "ipinfo": Provider(
        "ipinfo", "IPinfo Lite", "https://ipinfo.io", "CC BY-SA 4.0",
        "IP address data powered by IPinfo (https://ipinfo.io)", "daily",
        {"country+asn": ("ipinfo",)}),
}
MAXMIND_EDITIONS = {"country": "GeoLite2-Country", "asn": "GeoLite2-ASN"}
IPINFO_FILE = "ipinfo_lite.mmdb"


def attribution(database_type: str | None) -> str | None:
    """The attribution its licence asks for, from a database's type (None: not known)."""
    kind = (database_type or "").lower()
    for provider in PROVIDERS.values():
        if any(kind.startswith(p) for prefixes in provider.types.values() for p in prefixes):
            return f"{provider.attribution}, {provider.licence}"
    return None


def attributions(info: list[dict[str, Any]]) -> list[str]:
    """The attributions the open databases' licences ask for (Geo.info()), once each."""
    out: list[str] = []
    for entry in info:
        credit = attribution(entry.get("database_type"))
        if credit is not None and credit not in out:
            out.append(credit)
    return out


def geo_dir(config: Any) -> str:
    """geo-dir, or `geo` beside the SQLite store (tt-data/geo with PostgreSQL)."""
    if config.geo_dir:
        return config.geo_dir
    url = config.database_url or ""
    if url.lower().startswith("sqlite:"):
        from .store import StoreError, sqlite_path

        try:
            path = sqlite_path(url)
        except StoreError:
            path = ""
        if path and path != ":memory:":
            return os.path.join(os.path.dirname(path) or ".", "geo")
    return os.path.join("tt-data", "geo")


def installed(directory: str) -> tuple[str | None, str | None]:
    """(country, asn) files that `geo update` put in `directory`, None where there is none."""
    paths = [os.path.join(directory, name) for name in (COUNTRY_FILE, ASN_FILE)]
    return tuple(p if os.path.isfile(p) else None for p in paths)  # type: ignore[return-value]


# --- checking a database ----------------------------------------------------------------------


@dataclasses.dataclass
class Database:
    """A database file and what its metadata says."""

    path: str
    database_type: str
    build_epoch: int

    @property
    def build_date(self) -> str:
        return _date(self.build_epoch)


def _date(epoch: int) -> str:
    try:
        return datetime.datetime.fromtimestamp(epoch, datetime.UTC).date().isoformat()
    except (OverflowError, OSError, ValueError):
        return "an unknown date"


def inspect(path: str) -> Database:
    """Open `path` as a MaxMind DB and read its metadata; GeoUpdateError if it is not one."""
    try:
        with maxminddb.open_database(path, maxminddb.MODE_FILE) as reader:
            meta = reader.metadata()
            reader.get("1.1.1.1")  # walks the search tree and decodes a record
    except (OSError, ValueError, maxminddb.InvalidDatabaseError, RuntimeError):
        raise GeoUpdateError("not a MaxMind DB (.mmdb) file (broken or truncated)") from None
    if not isinstance(meta.database_type, str) or not isinstance(meta.build_epoch, int):
        raise GeoUpdateError("a MaxMind DB without a database type or build date")
    return Database(path, meta.database_type, meta.build_epoch)


def check_type(db: Database, provider: Provider, role: str) -> None:
    kind = db.database_type.lower()
    if not any(kind.startswith(prefix) for prefix in provider.types[role]):
        wanted = " or ".join(provider.types[role])
        raise GeoUpdateError(f"{role}: got a {db.database_type!r} database, expected "
                             f"{wanted}...")


def _digest(path: str, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


# --- downloading ------------------------------------------------------------------------------


class Downloader:
    """One HTTP session with bounded waits: `timeout` per connect / read, and a deadline for
    a whole download (30 × timeout), so a server that hangs or trickles cannot hold us."""

    def __init__(self, base_url: str, timeout: float = 30.0,
                 auth: tuple[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.host = urlsplit(self.base_url).netloc
        self.timeout = timeout
        self.session = requests.Session()
        self.session.auth = auth
        from . import __version__

        self.session.headers["User-Agent"] = f"tunnel-telemetry/{__version__} (geo update)"

    def close(self) -> None:
        self.session.close()

    def _get(self, path: str, params: dict[str, str] | None, what: str) -> requests.Response:
        # Error texts are built here, never from the exception: requests puts the URL, query
        # (ipinfo's token) included, into its messages.
        try:
            resp = self.session.get(self.base_url + path, params=params, stream=True,
                                    timeout=self.timeout)
        except requests.Timeout:
            raise GeoUpdateError(f"{what}: no answer from {self.host} within "
                                 f"{self.timeout:g}s") from None
        except requests.ConnectionError:
            raise GeoUpdateError(f"{what}: cannot connect to {self.host}") from None
        except requests.RequestException as exc:
            raise GeoUpdateError(f"{what}: request to {self.host} failed "
                                 f"({type(exc).__name__})") from None
        if resp.status_code != 200:
            resp.close()
            hint = {401: " (check the credentials)", 403: " (check the credentials)",
                    429: " (rate limited: try again later)"}.get(resp.status_code, "")
            raise _Status(resp.status_code, f"{what}: {self.host} answered HTTP "
                                            f"{resp.status_code}{hint}")
        return resp

    def json(self, path: str, params: dict[str, str] | None, what: str) -> Any:
        with self._get(path, params, what) as resp:
            body = self._read(resp, what, limit=1024 * 1024)
        try:
            return json.loads(body)
        except ValueError:
            raise GeoUpdateError(f"{what}: {self.host} did not answer JSON") from None

    def text(self, path: str, params: dict[str, str] | None, what: str) -> str:
        with self._get(path, params, what) as resp:
            return self._read(resp, what, limit=1024 * 1024).decode("utf-8", "replace")

    def fetch(self, path: str, params: dict[str, str] | None, what: str) -> bytes:
        """The whole body (a database, compressed or not), within the deadline."""
        with self._get(path, params, what) as resp:
            return self._read(resp, what, limit=MAX_SIZE)

    def _read(self, resp: requests.Response, what: str, limit: int) -> bytes:
        deadline = time.monotonic() + 30 * self.timeout
        buf = io.BytesIO()
        try:
            # read1: whatever has arrived (read() would wait for a whole chunk, past the
            # deadline, from a server sending a byte at a time)
            while chunk := resp.raw.read1(CHUNK, decode_content=True):
                buf.write(chunk)
                if buf.tell() > limit:
                    raise GeoUpdateError(f"{what}: more than {limit // 2**20} MiB")
                if time.monotonic() > deadline:
                    raise GeoUpdateError(f"{what}: download from {self.host} took longer "
                                         f"than {30 * self.timeout:g}s")
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            timed_out = isinstance(exc, TimeoutError | urllib3.exceptions.TimeoutError)
            cause = "timed out" if timed_out else "was cut off"
            raise GeoUpdateError(f"{what}: the download from {self.host} {cause}") from None
        expected = resp.headers.get("Content-Length")
        if expected and expected.isdigit() and "Content-Encoding" not in resp.headers \
                and int(expected) != buf.tell():
            raise GeoUpdateError(f"{what}: the download from {self.host} was cut off")
        return buf.getvalue()


class _Status(GeoUpdateError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _gunzip(data: bytes, what: str) -> bytes:
    try:
        out = zlib.decompressobj(zlib.MAX_WBITS | 16)
        body = out.decompress(data, MAX_SIZE + 1)
        if len(body) > MAX_SIZE or not out.eof:
            raise GeoUpdateError(f"{what}: truncated or oversized gzip file")
        return body
    except zlib.error:
        raise GeoUpdateError(f"{what}: not a valid gzip file (broken or truncated)") from None


def _from_tarball(data: bytes, name: str, what: str) -> bytes:
    """`<edition>_<YYYYMMDD>/<name>` out of a MaxMind .tar.gz."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar:
                if member.isfile() and member.name.rsplit("/", 1)[-1] == name:
                    if member.size > MAX_SIZE:
                        raise GeoUpdateError(f"{what}: {name} is larger than "
                                             f"{MAX_SIZE // 2**20} MiB")
                    handle = tar.extractfile(member)
                    assert handle is not None
                    return handle.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error, gzip.BadGzipFile):
        raise GeoUpdateError(f"{what}: not a valid .tar.gz (broken or truncated)") from None
    raise GeoUpdateError(f"{what}: the archive holds no {name}")


# --- the providers ----------------------------------------------------------------------------


@dataclasses.dataclass
class Fetched:
    """A downloaded database for a role (or "country+asn"), not installed yet."""

    role: str
    source: str  # the provider's name for this version (file name, date, checksum)
    data: bytes | None  # None: what is installed is this version already
    checksum: tuple[str, str] | None = None  # (algorithm, hex) the provider published


def _credentials(config: Any, provider: str) -> dict[str, str]:
    if provider == "maxmind":
        account, key = config.maxmind_account_id, config.maxmind_license_key
        if not account or not key:
            raise GeoUpdateConfigError(
                "maxmind: set MAXMIND_ACCOUNT_ID and MAXMIND_LICENSE_KEY (a free GeoLite2 "
                "account: https://www.maxmind.com/en/geolite2/signup)")
        if not account.isdigit():
            raise GeoUpdateConfigError("maxmind-account-id: must be a number")
        return {"account": account, "key": key}
    if provider == "ipinfo":
        if not config.ipinfo_token:
            raise GeoUpdateConfigError("ipinfo: set IPINFO_TOKEN (a free account: "
                                       "https://ipinfo.io/signup)")
        return {"token": config.ipinfo_token}
    return {}


def _dbip_months(now: datetime.datetime) -> list[str]:
    """This month's file and, early in the month before it is out, last month's."""
    first = now.replace(day=1)
    previous = first - datetime.timedelta(days=1)
    return [first.strftime("%Y-%m"), previous.strftime("%Y-%m")]


def fetch_dbip(dl: Downloader, manifest: dict[str, Any], current: dict[str, str],
               now: datetime.datetime) -> list[Fetched]:
    """This month's `.mmdb.gz` (last month's until it is out), unless installed already."""
    out = []
    for role, stem in (("country", "dbip-country-lite"), ("asn", "dbip-asn-lite")):
        for i, month in enumerate(_dbip_months(now)):
            name = f"{stem}-{month}.mmdb.gz"
            if manifest.get(role, {}).get("source") == name and os.path.isfile(current[role]):
                out.append(Fetched(role, name, None))
                break
            try:
                data = dl.fetch(f"/free/{name}", None, f"dbip {role} ({name})")
            except _Status as exc:
                if exc.status == 404 and i == 0:
                    continue  # not published yet this month
                raise
            out.append(Fetched(role, name, _gunzip(data, f"dbip {role} ({name})")))
            break
    return out


def fetch_maxmind(dl: Downloader, current: dict[str, str]) -> list[Fetched]:
    """As geoipupdate does: the edition's metadata (date, MD5 of the .mmdb), then the dated
    .tar.gz unless the installed file has that MD5 already."""
    out = []
    for role, edition in MAXMIND_EDITIONS.items():
        what = f"maxmind {edition}"
        meta = dl.json("/geoip/updates/metadata", {"edition_id": edition}, what)
        try:
            (entry,) = meta["databases"]
            date, md5 = str(entry["date"]), str(entry["md5"]).lower()
        except (KeyError, TypeError, ValueError):
            raise GeoUpdateError(f"{what}: unexpected metadata answer") from None
        source = f"{edition}_{date.replace('-', '')}"
        path = current[role]
        if os.path.isfile(path) and _digest(path, "md5") == md5:
            out.append(Fetched(role, source, None))
            continue
        data = dl.fetch(f"/geoip/databases/{edition}/download",
                        {"date": date.replace("-", ""), "suffix": "tar.gz"}, what)
        out.append(Fetched(role, source, _from_tarball(data, f"{edition}.mmdb", what),
                           ("md5", md5)))
    return out


def fetch_ipinfo(dl: Downloader, token: str, current: dict[str, str]) -> list[Fetched]:
    """The checksums answer (sha256), then the plain `.mmdb` unless installed already."""
    what = f"ipinfo {IPINFO_FILE}"
    params = {"token": token}
    sums = dl.json(f"/data/{IPINFO_FILE}/checksums", params, what)
    try:
        sha256 = str(sums["checksums"]["sha256"]).lower()
    except (KeyError, TypeError):
        raise GeoUpdateError(f"{what}: unexpected checksums answer") from None
    source = f"{IPINFO_FILE} sha256:{sha256[:12]}"
    path = current["country"]
    if os.path.isfile(path) and _digest(path, "sha256") == sha256:
        return [Fetched("country+asn", source, None)]
    data = dl.fetch(f"/data/{IPINFO_FILE}", params, what)
    return [Fetched("country+asn", source, data, ("sha256", sha256))]


# --- installing -------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """What an update did, role by role."""

    provider: Provider
    directory: str
    lines: list[str] = dataclasses.field(default_factory=list)
    installed: bool = False


def _previous_name(name: str) -> str:
    return name.replace(".mmdb", ".previous.mmdb")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: str, directory: str) -> str:
    """A temporary name in `directory` for the same bytes as `src` (a hard link if we can)."""
    tmp = tempfile.mktemp(prefix=".geo-", suffix=".tmp", dir=directory)  # noqa: S306 - link()
    try:
        os.link(src, tmp)  # fails if tmp exists: no race
    except OSError:
        with open(src, "rb") as fsrc, open(tmp, "xb") as fdst:
            while chunk := fsrc.read(CHUNK):
                fdst.write(chunk)
            fdst.flush()
            os.fsync(fdst.fileno())
    return tmp


def _write_temp(directory: str, data: bytes) -> str:
    fd, tmp = tempfile.mkstemp(prefix=".geo-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # noqa: S103 - public data, read by the collector's user
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _install(tmp: str, directory: str, name: str) -> None:
    """Rename `tmp` over `name`, the file it replaces kept as its .previous.mmdb: no moment
    without a `name`, never a partly written one."""
    target = os.path.join(directory, name)
    if os.path.isfile(target):
        keep = _link_or_copy(target, directory)
        os.replace(keep, os.path.join(directory, _previous_name(name)))
    os.replace(tmp, target)


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """One update at a time per geo-dir (cron, the collector's own, an operator)."""
    with open(os.path.join(directory, LOCK_FILE), "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GeoUpdateError(f"another geo update is running in {directory}") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_manifest(directory: str) -> dict[str, Any]:
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update(config: Any, *, provider: str | None = None, timeout: float = 30.0,
           force: bool = False, now: datetime.datetime | None = None) -> Result:
    """Fetch, check and install the provider's databases into geo-dir (see the module doc).

    Raises GeoUpdateError (one line) and installs nothing when anything is wrong. `force`
    installs a database older than the one in place (going back to an earlier release).
    """
    name = provider or config.geo_provider
    if name not in PROVIDERS:
        raise GeoUpdateConfigError(f"geo-provider: unknown provider {name!r} "
                                   f"(use {', '.join(PROVIDERS)})")
    spec = PROVIDERS[name]
    secrets = _credentials(config, name)
    directory = geo_dir(config)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise GeoUpdateError(f"geo-dir: cannot create {directory}: "
                             f"{(exc.strerror or type(exc).__name__).lower()}") from None
    if not os.access(directory, os.W_OK):
        raise GeoUpdateError(f"geo-dir: {directory} is not writable")
    now = now or datetime.datetime.now(datetime.UTC)
    auth = (secrets["account"], secrets["key"]) if name == "maxmind" else None
    dl = Downloader(config.geo_download_url or spec.base_url, timeout, auth)
    result = Result(spec, directory)
    with _locked(directory):
        manifest = _read_manifest(directory)
        roles = manifest.get("databases", {}) if manifest.get("provider") == name else {}
        current = {role: os.path.join(directory, file) for role, file in FILES.items()}
        try:
            if name == "dbip":
                fetched = fetch_dbip(dl, roles, current, now)
            elif name == "maxmind":
                fetched = fetch_maxmind(dl, current)
            else:
                fetched = fetch_ipinfo(dl, secrets["token"], current)
        finally:
            dl.close()
        temps: list[tuple[Fetched, str, Database]] = []
        written: list[str] = []
        try:
            for item in fetched:  # check everything before installing anything
                if item.data is None:
                    continue
                written.append(tmp := _write_temp(directory, item.data))
                item.data = None
                temps.append((item, tmp, _check(item, tmp, spec, current, force)))
            for item, tmp, db in temps:
                if item.role == "country+asn":
                    _install(tmp, directory, COUNTRY_FILE)
                    _install(_link_or_copy(current["country"], directory), directory,
                             ASN_FILE)
                else:
                    _install(tmp, directory, FILES[item.role])
                roles[item.role] = {"source": item.source, "database_type": db.database_type,
                                    "build_date": db.build_date}
            _fsync_dir(directory)
        finally:
            for tmp in written:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        for item in fetched:
            done = next((db for it, _, db in temps if it is item), None)
            where = ("country.mmdb + asn.mmdb" if item.role == "country+asn"
                     else FILES[item.role])
            if done is not None:
                result.installed = True
                result.lines.append(f"{item.role}: installed {done.database_type} built "
                                    f"{done.build_date} as {os.path.join(directory, where)}")
            else:
                result.lines.append(f"{item.role}: up to date ({item.source})")
        if name == "ipinfo":
            roles = {"country+asn": roles["country+asn"]} if "country+asn" in roles else {}
        else:
            roles.pop("country+asn", None)
        record = {"provider": name, "checked_at": now.isoformat(timespec="seconds"),
                  "databases": roles}
        tmp = _write_temp(directory, json.dumps(record, indent=1).encode() + b"\n")
        os.replace(tmp, os.path.join(directory, MANIFEST))
    return result


def _check(item: Fetched, tmp: str, spec: Provider, current: dict[str, str],
           force: bool) -> Database:
    what = f"{spec.name} {item.role} ({item.source})"
    if item.checksum is not None:
        algorithm, expected = item.checksum
        if _digest(tmp, algorithm) != expected:
            raise GeoUpdateError(f"{what}: {algorithm} checksum mismatch (a damaged download)")
    try:
        db = inspect(tmp)
        check_type(db, spec, item.role)
    except GeoUpdateError as exc:
        raise GeoUpdateError(f"{what}: {exc}") from None
    if force:
        return db
    for role in ("country", "asn") if item.role == "country+asn" else (item.role,):
        try:
            old = inspect(current[role]) if os.path.isfile(current[role]) else None
        except GeoUpdateError:
            old = None  # a broken file in place: anything valid is better
        if old is not None and db.build_epoch < old.build_epoch:
            raise GeoUpdateError(
                f"{what}: built {db.build_date}, older than the {role} database in place "
                f"(built {old.build_date}); keeping it (--force to install it anyway)")
    return db


def read_pid(target: str) -> int:
    """`target` as a process id: a number, or a pidfile holding one."""
    text = target.strip()
    if not text.isdigit():
        try:
            text = Path(text).read_text().strip()
        except OSError as exc:
            raise GeoUpdateError(f"reload: cannot read pidfile {target}: "
                                 f"{(exc.strerror or type(exc).__name__).lower()}") from None
        if not text.isdigit():
            raise GeoUpdateError(f"reload: {target} does not hold a process id")
    return int(text)


def signal_reload(pid: int) -> None:
    """SIGHUP the collector's master: it reopens the databases, its workers are replaced."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise GeoUpdateError(f"reload: no process {pid}") from None
    except PermissionError:
        raise GeoUpdateError(f"reload: not allowed to signal process {pid}") from None


# --- the collector updating itself (geo-update-interval) --------------------------------------


def _child_env(config: Any) -> dict[str, str]:
    """The collector's whole configuration as environment variables (secrets stay out of
    argv, visible to every user in ps); the config file is not read again."""
    from .config import OPTIONS

    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "TT_CONFIG")}
    for opt in OPTIONS:
        for var in opt.envvars:
            env.pop(var, None)
        value = getattr(config, opt.attr)
        if value is None or value == ():
            continue
        if opt.type == "bool":
            value = "true" if value else "false"
        elif opt.type == "list":
            value = ",".join(value)
        env[opt.envvars[0]] = str(value)
    package_parent = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = package_parent + (os.pathsep + path if path else "")
    return env


class Updater:
    """geo-update-interval: a thread in the gunicorn master that runs `tt-server geo update
    --reload-pid <master>` in a child process every interval (the first one at start-up).

    One process does it (the master, not every worker), and the downloading happens in the
    child: the master forks workers at any time, and must not carry a download's memory or
    an HTTP library's locks into them. The child sends the master SIGHUP when it installed
    something; its one line of outcome goes to the collector's stderr.
    """

    def __init__(self, config: Any, interval: float) -> None:
        self.config = config
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._child: int | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="geo-updater", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._child, signal.SIGTERM)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run_once(self) -> None:
        # posix_spawn, no pipes: a worker forked meanwhile must not inherit a pipe end.
        argv = [sys.executable, "-m", "tunnel_telemetry.cli", "geo", "update",
                "--reload-pid", str(os.getpid())]
        try:
            self._child = os.posix_spawn(
                sys.executable, argv, _child_env(self.config),
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)])
        except OSError as exc:
            log.error("geo_update_failed cannot start the update process: %s", exc.strerror)
            return
        try:
            while not self._stop.is_set():
                try:
                    pid, _ = os.waitpid(self._child, os.WNOHANG)
                except ChildProcessError:
                    return  # gunicorn's SIGCHLD handler reaped it
                if pid:
                    return
                self._stop.wait(0.1)
        finally:
            self._child = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.interval)


def health(info: list[dict[str, Any]], stale_after: float) -> list[dict[str, Any]]:
    """/healthz's geo entries: each database's age, "stale" past `stale_after`, attribution."""
    out = []
    for entry in info:
        age = entry.get("age_days")
        extra: dict[str, Any] = {"stale": age is None or age * 86400 > stale_after}
        if (credit := attribution(entry.get("database_type"))) is not None:
            extra["attribution"] = credit
        out.append({**entry, **extra})
    return out
