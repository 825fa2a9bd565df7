"""Geolocation: an IP address to ("AS<n>", "CC") with MaxMind-format databases.

Databases are opened once per process and memory-mapped, so gunicorn workers share their
pages. Reads GeoLite2 / DB-IP Lite layouts (country and ASN files) and IPinfo Lite (one file
with both), detected per record. Anything unknown is ("AS0", "ZZ"), OONI's convention.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import shutil
from bisect import bisect_right
from typing import Any

import maxminddb

log = logging.getLogger(__name__)

UNKNOWN_ASN = "AS0"
UNKNOWN_CC = "ZZ"
UNKNOWN = (UNKNOWN_ASN, UNKNOWN_CC)

try:  # the C extension also memory-maps the file and is several times faster
    from maxminddb.extension import Reader as _ExtensionReader  # noqa: F401
except ImportError:
    _MODE = maxminddb.MODE_MMAP
else:
    _MODE = maxminddb.MODE_MMAP_EXT
_LOOKUP_ERRORS = (ValueError, maxminddb.InvalidDatabaseError)
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class GeoError(Exception):
    """A geo database cannot be used; `str()` is one line naming the option and the file."""

    def __init__(self, message: str, reason: str = "geo_db_unusable", option: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.option = option


def _private_copy(path: str) -> int | None:
    """An in-memory copy of the file (memfd) to map instead of the file itself, or None.

    A mapped file that is rewritten in place (``cp new.mmdb GeoLite2-Country.mmdb``) or
    truncated kills the process with SIGBUS on the next lookup that touches a lost page, and
    gunicorn workers forked from a preloaded master inherit that mapping: a crash loop. The
    copy belongs to this collector, so whatever happens to the file only matters at reload.
    Forked workers share the copy's pages, as they shared the file's.
    """
    with open(path, "rb") as src:  # raises the precise OSError for a bad path
        if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
            return None
        fd = os.memfd_create("tunnel-telemetry-geo", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _open_reader(option: str, path: str) -> maxminddb.Reader:
    try:
        fd = _private_copy(path)
        if fd is None:
            return maxminddb.open_database(path, _MODE)
        try:
            return maxminddb.open_database(f"/proc/self/fd/{fd}", _MODE)
        finally:
            os.close(fd)  # the reader's mapping keeps the copy alive
    except FileNotFoundError:
        reason, problem = "geo_db_missing", "no such file"
    except IsADirectoryError:
        reason, problem = "geo_db_unreadable", "is a directory, not a file"
    except PermissionError:
        reason, problem = "geo_db_unreadable", "permission denied"
    except OSError as exc:
        reason, problem = "geo_db_unreadable", (exc.strerror or type(exc).__name__).lower()
    except _LOOKUP_ERRORS:  # garbage, an empty or a truncated file
        reason, problem = "geo_db_invalid", "not a MaxMind DB (.mmdb) file"
    raise GeoError(f"{option}: {path}: {problem}", reason, option)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _asn(record: object) -> str:
    """The record's ASN as "AS<n>" (GeoLite2 / DB-IP int, or IPinfo "AS<n>"), else AS0."""
    if not isinstance(record, dict):
        return UNKNOWN_ASN
    value = record.get("autonomous_system_number")
    if value is None:
        value = record.get("asn")
        if (
            isinstance(value, str)
            and 2 < len(value) <= 12
            and value[:2] in ("AS", "as")
            and value[2:].isascii()
            and value[2:].isdecimal()
        ):
            value = int(value[2:])
    if type(value) is int and 0 < value < 2**32:
        return f"AS{value}"
    return UNKNOWN_ASN


def _cc(record: object) -> str:
    """The record's two-letter country (country, registered_country, IPinfo country_code)."""
    if not isinstance(record, dict):
        return UNKNOWN_CC
    value = record.get("country_code")
    if value is None:
        for key in ("country", "registered_country"):
            sub = record.get(key)
            if isinstance(sub, dict) and isinstance(sub.get("iso_code"), str):
                value = sub["iso_code"]
                break
    if isinstance(value, str) and len(value) == 2 and value.isascii() and value.isalpha():
        return value.upper()
    return UNKNOWN_CC


# Addresses that are not global, never looked up: the IANA special-purpose blocks as Python's
# ipaddress has them (3.11), with 192.0.0.0/24 and 2001::/23 whole (newer Pythons carve a few
# anycast exceptions out of them). ipaddress's own is_global is not used: it remembers the
# last 128 addresses it was asked about (functools.lru_cache), which kept recent clients'
# and endpoints' addresses in every worker's memory.
NOT_GLOBAL = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4", "255.255.255.255/32",
    "::/128", "::1/128", "::ffff:0:0/96", "100::/64", "2001::/23", "2001:db8::/32",
    "fc00::/7", "fe80::/10",
)


def _ranges(version: int) -> tuple[list[int], list[int]]:
    """NOT_GLOBAL's blocks of one IP version as sorted, merged (starts, ends)."""
    blocks = sorted((int(net.network_address), int(net.broadcast_address))
                    for net in map(ipaddress.ip_network, NOT_GLOBAL) if net.version == version)
    starts: list[int] = []
    ends: list[int] = []
    for low, high in blocks:
        if ends and low <= ends[-1] + 1:
            ends[-1] = max(ends[-1], high)
        else:
            starts.append(low)
            ends.append(high)
    return starts, ends


_RANGES = {4: _ranges(4), 6: _ranges(6)}


def is_global(ip: Address) -> bool:
    """Whether ``ip`` is outside every NOT_GLOBAL block (a binary search; nothing kept)."""
    starts, ends = _RANGES[ip.version]
    number = int(ip)
    i = bisect_right(starts, number) - 1
    return i < 0 or number > ends[i]


def _address(ip: object) -> Address | None:
    """A global address to look up (IPv4-mapped IPv6 as IPv4), else None."""
    if isinstance(ip, str):
        try:
            ip = ipaddress.ip_address(ip)
        except ValueError:
            return None
    elif not isinstance(ip, Address):
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip if is_global(ip) else None


class Geo:
    """Country and ASN lookups; with no database configured, every answer is AS0 / ZZ."""

    def __init__(self, country_db: str | None = None, asn_db: str | None = None) -> None:
        self.country_db = country_db or None
        self.asn_db = asn_db or None
        self._country, self._asn = self._open(self.country_db, self.asn_db)

    @staticmethod
    def _open(country_db: str | None, asn_db: str | None
              ) -> tuple[maxminddb.Reader | None, maxminddb.Reader | None]:
        country: maxminddb.Reader | None = None
        asn: maxminddb.Reader | None = None
        try:
            if country_db:
                country = _open_reader("geoip-country-db", country_db)
            if asn_db:
                if country is not None and country_db and _same_file(country_db, asn_db):
                    asn = country  # one file with both (IPinfo Lite): open it once
                else:
                    asn = _open_reader("geoip-asn-db", asn_db)
        except GeoError:
            if country is not None:
                country.close()
            raise
        return country, asn

    @property
    def enabled(self) -> bool:
        return self._country is not None or self._asn is not None

    @property
    def has_country(self) -> bool:
        return self._country is not None

    @property
    def has_asn(self) -> bool:
        return self._asn is not None

    def lookup(self, ip: str | Address | None) -> tuple[str, str]:
        """("AS<n>", "CC") for `ip`; ("AS0", "ZZ") when unknown or not a global address."""
        country, asn = self._country, self._asn  # one snapshot, in case reload() swaps them
        if country is None and asn is None:
            return UNKNOWN
        addr = _address(ip)
        if addr is None:
            return UNKNOWN
        try:
            if country is asn and country is not None:
                record = country.get(addr)
                return _asn(record), _cc(record)
            return (
                _asn(asn.get(addr)) if asn is not None else UNKNOWN_ASN,
                _cc(country.get(addr)) if country is not None else UNKNOWN_CC,
            )
        except _LOOKUP_ERRORS as exc:  # IPv6 in an IPv4-only file, a corrupt record, closed
            log.debug("geo_lookup_failed %s", type(exc).__name__)  # the message holds the IP
            return UNKNOWN

    def info(self) -> list[dict[str, Any]]:
        """What /healthz shows per open database: role, type, build date and age in days,
        IP version, file."""
        readers = []
        if self._country is not None:
            role = "country+asn" if self._country is self._asn else "country"
            readers.append((role, self._country, self.country_db))
        if self._asn is not None and self._asn is not self._country:
            readers.append(("asn", self._asn, self.asn_db))
        out = []
        for role, reader, path in readers:
            meta = reader.metadata()
            try:
                built = datetime.datetime.fromtimestamp(meta.build_epoch, datetime.UTC)
                build_date = built.date().isoformat()
                age = (datetime.datetime.now(datetime.UTC) - built).total_seconds() / 86400
                age_days = round(max(0.0, age), 1)
            except (OverflowError, OSError, ValueError, TypeError):
                build_date, age_days = None, None
            out.append(
                {
                    "role": role,
                    "database_type": meta.database_type,
                    "build_date": build_date,
                    "age_days": age_days,
                    "ip_version": meta.ip_version,
                    "file": os.path.basename(path) if path else None,
                }
            )
        return out

    def reload(self, paths: tuple[str | None, str | None] | None = None) -> None:
        """Reopen the files (e.g. after an update), or open `paths` (country, asn) instead;
        keep the current ones if that fails."""
        country_db, asn_db = paths if paths is not None else (self.country_db, self.asn_db)
        if not (country_db or asn_db):
            return
        try:
            readers = self._open(country_db or None, asn_db or None)
        except GeoError as exc:
            log.error("geo_reload_failed %s %s: keeping the open databases", exc.reason, exc.option)
            return
        # The old readers are not closed here: a lookup in another thread may still use them.
        # They close themselves when the last reference goes.
        self.country_db, self.asn_db = country_db or None, asn_db or None
        self._country, self._asn = readers
        log.info("geo_reloaded")

    def close(self) -> None:
        """Close the databases; lookups answer AS0 / ZZ afterwards."""
        readers = {id(r): r for r in (self._country, self._asn) if r is not None}
        self._country = self._asn = None
        for reader in readers.values():
            reader.close()


def open_geo(country_db: str | None, asn_db: str | None) -> Geo:
    """Open the configured databases once; raise GeoError (one line) if one is unusable."""
    geo = Geo(country_db, asn_db)
    if not geo.enabled:
        log.warning(
            "geo_disabled: no geoip-country-db or geoip-asn-db configured and none from"
            " `tt-server geo update`; every address geolocates as AS0/ZZ"
        )
    elif geo._country is None:
        log.warning("geo_country_disabled: no geoip-country-db; every country is ZZ")
    elif geo._asn is None:
        log.warning("geo_asn_disabled: no geoip-asn-db; every ASN is AS0")
    return geo
