"""Build small MaxMind-format databases for tests and benchmarks.

Needs the `test` extra (mmdb-writer, netaddr); both are imported inside the functions so the
package itself never depends on them.
"""

from __future__ import annotations

import ipaddress
import os
import random
from collections.abc import Iterable, Mapping
from typing import Any

# Layouts as GeoLite2 / DB-IP Lite and IPinfo Lite ship them (the fields we read, plus a name).
COUNTRY_TYPE = "GeoLite2-Country"
ASN_TYPE = "GeoLite2-ASN"
IPINFO_TYPE = "ipinfo lite"

# Known networks of the `geo_dbs` test fixture: network -> (ASN, AS name, country).
GEO_NETWORKS = {
    "1.1.1.0/24": (13335, "CLOUDFLARENET", "AU"),
    "2.3.4.0/24": (50304, "BLIX", "NO"),
    "6.6.6.0/24": (666, "EXAMPLE-666", "US"),
    "2a01:4f8:1::/48": (64500, "EXAMPLE-64500", "DE"),
}


def write_db(
    path: str | os.PathLike,
    database_type: str,
    records: Iterable[tuple[Any, Any]],
    build_epoch: int | None = None,
) -> str:
    """Write (network or list of networks, record) pairs to an IPv6 DB also answering IPv4.

    Networks may nest (supernets are inserted first); a list is inserted as one set, so it
    must not overlap other entries. `build_epoch` defaults to now.
    """
    from mmdb_writer import MMDBWriter
    from netaddr import IPNetwork, IPSet

    class Writer(MMDBWriter):
        def _build_meta(self) -> dict[str, Any]:
            meta = super()._build_meta()
            if build_epoch is not None:
                meta["build_epoch"] = build_epoch
            return meta

    settings = {"languages": ["en"], "description": f"test {database_type}", "int_type": "u32"}
    writer = Writer(ip_version=6, ipv4_compatible=True, database_type=database_type, **settings)
    # IPv4 goes into its own 32-bit tree, grafted at ::/96 below: the same tree that
    # ipv4_compatible insertion builds, without walking 96 zero bits per network.
    writer4 = MMDBWriter(ip_version=4, database_type=database_type, **settings)
    inserts = []
    for nets, record in records:
        if not isinstance(nets, list):
            nets = [nets]
        cidrs = [n if isinstance(n, IPNetwork) else IPNetwork(n) for n in nets]
        for version, target in ((4, writer4), (6, writer)):
            if family := [c for c in cidrs if c.version == version]:
                inserts.append((min(c.prefixlen for c in family), target, IPSet(family), record))
    # A network inserted later overwrites the subtree below it: supernets go first.
    inserts.sort(key=lambda insert: insert[0])
    for _, target, networks, record in inserts:
        target.insert_network(networks, record)
    if writer4.tree.left or writer4.tree.right:
        node = writer.tree
        for _ in range(95):
            node = node.get_or_create(0)
        if node.left is not None:
            raise ValueError("IPv6 networks inside ::/96 cannot be mixed with IPv4 networks")
        node.left = writer4.tree
    writer.to_db_file(os.fspath(path))
    return os.fspath(path)


def _country_record(cc: str, registered_only: bool = False) -> dict[str, Any]:
    key = "registered_country" if registered_only else "country"
    return {key: {"iso_code": cc, "names": {"en": cc}}}


def _asn_record(asn: int, org: str) -> dict[str, Any]:
    return {"autonomous_system_number": asn, "autonomous_system_organization": org}


def write_country_db(
    path: str | os.PathLike,
    networks: Mapping[str, str],
    *,
    database_type: str = COUNTRY_TYPE,
    build_epoch: int | None = None,
    registered_only: bool = False,
) -> str:
    """Country DB, GeoLite2 / DB-IP layout: {"1.1.1.0/24": "AU", ...}.

    `registered_only` stores only `registered_country`, as GeoLite2 does for some networks.
    """
    records = [(net, _country_record(cc, registered_only)) for net, cc in networks.items()]
    return write_db(path, database_type, records, build_epoch)


def write_asn_db(
    path: str | os.PathLike,
    networks: Mapping[str, tuple[int, str]],
    *,
    database_type: str = ASN_TYPE,
    build_epoch: int | None = None,
) -> str:
    """ASN DB, GeoLite2 / DB-IP layout: {"1.1.1.0/24": (13335, "CLOUDFLARENET"), ...}."""
    records = [(net, _asn_record(asn, org)) for net, (asn, org) in networks.items()]
    return write_db(path, database_type, records, build_epoch)


def write_ipinfo_db(
    path: str | os.PathLike,
    networks: Mapping[str, tuple[str, str, str]],
    *,
    database_type: str = IPINFO_TYPE,
    build_epoch: int | None = None,
) -> str:
    """IPinfo Lite layout, one file: {"1.1.1.0/24": ("AS13335", "Cloudflare", "AU"), ...}."""
    records = [
        (
            net,
            {
                "asn": asn,
                "as_name": name,
                "as_domain": "",
                "country_code": cc,
                "country": cc,
                "continent_code": "",
                "continent": "",
            },
        )
        for net, (asn, name, cc) in networks.items()
    ]
    return write_db(path, database_type, records, build_epoch)


# Synthetic networks come in runs of adjacent allocations inside random blocks (a /16 of
# IPv4, a /32 of IPv6 from the RIRs' big blocks), which gives a tree shaped like real ones.
_IPV6_POOLS = ("2400::/12", "2600::/12", "2800::/12", "2a00::/12", "2c00::/12")
_IPV4_SPECIAL = (  # a superset of what ipaddress calls not global
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/3",
)  # fmt: skip
_COUNTRIES = (
    "AU BR CA CN DE EG ES FR GB ID IN IR IT JP KR MX MY NG NL NO PK PL RU SA SE TR UA US VN ZA"
).split()
# Prefix lengths weighted roughly like real tables (many /24 and /48, a few big blocks).
_V4_PREFIXES = ((24, 60), (23, 10), (22, 12), (21, 5), (20, 5), (19, 3), (18, 3), (17, 2))
_V6_PREFIXES = ((48, 50), (46, 5), (44, 10), (40, 10), (36, 10), (35, 5), (34, 2), (33, 1))


def synthetic_networks(
    n_networks: int = 200_000, seed: int = 0, ipv6_share: float = 0.3
) -> list[tuple[str, str, int]]:
    """`n_networks` random, non-overlapping, global networks as (cidr, cc, asn), reproducibly."""
    rng = random.Random(seed)
    n_asns = max(1, n_networks // 6)  # a few networks per AS, as in real tables
    asn_cc = [(rng.randint(1, 400_000), rng.choice(_COUNTRIES)) for _ in range(n_asns)]
    used: set[tuple[int, int]] = set()  # (version, block number)
    for special in map(ipaddress.IPv4Network, _IPV4_SPECIAL):
        first, last = int(special.network_address) >> 16, int(special.broadcast_address) >> 16
        used.update((4, block) for block in range(first, last + 1))
    v6_pools = [(int(net.network_address) >> 96, 32 - net.prefixlen) for net in
                map(ipaddress.IPv6Network, _IPV6_POOLS)]  # fmt: skip
    families = {
        4: (16, 32, ipaddress.IPv4Network, *zip(*_V4_PREFIXES, strict=True)),
        6: (32, 128, ipaddress.IPv6Network, *zip(*_V6_PREFIXES, strict=True)),
    }
    out: list[tuple[str, str, int]] = []
    while len(out) < n_networks:
        version = 6 if rng.random() < ipv6_share else 4
        block_len, bits, network, lengths, weights = families[version]
        if version == 4:
            block = rng.getrandbits(16)
        else:
            pool, free_bits = rng.choice(v6_pools)
            block = pool | rng.getrandbits(free_bits)
        if (version, block) in used:
            continue
        used.add((version, block))
        cursor, end = block << (bits - block_len), (block + 1) << (bits - block_len)
        run = rng.choices(lengths, weights, k=min(rng.randint(1, 40), n_networks - len(out)))
        for plen in run:
            size = 1 << (bits - plen)
            cursor = -(-cursor // size) * size  # align up
            if cursor + size > end:
                break
            asn, cc = asn_cc[rng.randrange(n_asns)]
            out.append((str(network((cursor, plen))), cc, asn))
            cursor += size * rng.choice((1, 1, 1, 2))  # mostly adjacent, a few gaps
    return out


def write_synthetic_dbs(
    directory: str | os.PathLike, n_networks: int = 200_000, seed: int = 0
) -> tuple[str, str]:
    """Write a country and an ASN DB of `n_networks` random public networks (for benchmarks).

    Returns (country_path, asn_path). The networks are `synthetic_networks(n_networks, seed)`.
    """
    from netaddr import IPNetwork

    os.makedirs(directory, exist_ok=True)
    by_cc: dict[str, list[IPNetwork]] = {}
    by_asn: dict[int, list[IPNetwork]] = {}
    for net, cc, asn in synthetic_networks(n_networks, seed):
        cidr = IPNetwork(net)  # parsed once for both files
        by_cc.setdefault(cc, []).append(cidr)
        by_asn.setdefault(asn, []).append(cidr)
    country = write_db(
        os.path.join(directory, "synthetic-country.mmdb"),
        COUNTRY_TYPE,
        [(group, _country_record(cc)) for cc, group in by_cc.items()],
    )
    asn = write_db(
        os.path.join(directory, "synthetic-asn.mmdb"),
        ASN_TYPE,
        [(group, _asn_record(asn, f"SYNTHETIC-AS{asn}")) for asn, group in by_asn.items()],
    )
    return country, asn


# --- providers' packaging and a local mirror (tests of `tt-server geo update`) ---------------


def gzipped(path: str | os.PathLike) -> bytes:
    """A database as DB-IP ships it: the .mmdb, gzipped (`dbip-country-lite-YYYY-MM.mmdb.gz`)."""
    import gzip

    with open(path, "rb") as fh:
        return gzip.compress(fh.read())


def maxmind_tarball(path: str | os.PathLike, edition: str, date: str) -> bytes:
    """A database as MaxMind ships it: `<edition>_<YYYYMMDD>/<edition>.mmdb` in a .tar.gz,
    with the licence files beside it."""
    import io
    import tarfile

    folder = f"{edition}_{date.replace('-', '')}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("LICENSE.txt", b"GeoLite2 End User License Agreement\n"),
                           ("COPYRIGHT.txt", b"Database and Contents Copyright (c) MaxMind\n")):
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.add(os.fspath(path), arcname=f"{folder}/{edition}.mmdb")
    return buf.getvalue()


class GeoMirror:
    """A local HTTP server standing in for the providers' download services (127.0.0.1).

    `routes` maps a path (query string excluded) to (status, body) or to a callable
    (handler) -> None that answers itself (a server that hangs, trickles, ...). Every request
    is kept in `requests` as (path, query, Authorization header).
    """

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.routes: dict[str, Any] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.release = threading.Event()  # set to end the answers that hang
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                path, _, query = self.path.partition("?")
                mirror.requests.append((path, query, self.headers.get("Authorization")))
                route = mirror.routes.get(path)
                if callable(route):
                    route(self)
                    return
                status, body = route if route is not None else (404, b"not found\n")
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def hang(self, handler: Any) -> None:
        """A route answering nothing at all until `release` is set."""
        self.release.wait(30)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> GeoMirror:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
