import ipaddress
import json
import logging
import os
from itertools import pairwise
from pathlib import Path

import pytest

from tunnel_telemetry.pipeline.geo import GeoError, open_geo
from tunnel_telemetry.testing.geodb import (
    synthetic_networks,
    write_asn_db,
    write_country_db,
    write_db,
    write_ipinfo_db,
    write_synthetic_dbs,
)

BUILD_EPOCH = 1_700_000_000  # 2023-11-14 22:13:20 UTC

# network -> (ASN, AS name, country); subnets listed before their supernet on purpose.
NETWORKS = {
    "1.1.1.0/24": (13335, "CLOUDFLARENET", "AU"),
    "1.0.0.0/8": (4134, "CHINANET", "CN"),
    "2.3.4.0/24": (50304, "BLIX", "NO"),
    "2a02:1234:5::/48": (64501, "EXAMPLE-64501", "NL"),
    "2a02:1234::/32": (3320, "DTAG", "DE"),
    "2a01:4f8:1::/48": (64500, "EXAMPLE-64500", "DE"),
    # Non-global ranges with data: must never be answered from the database.
    "10.0.0.0/8": (1, "PRIVATE", "US"),
    "127.0.0.0/8": (2, "LOOPBACK", "US"),
    "fc00::/7": (3, "ULA", "US"),
    "100.64.0.0/10": (4, "CGNAT", "US"),
}


@pytest.fixture(scope="session")
def layouts(tmp_path_factory):
    """(country_db, asn_db) per database layout, all holding NETWORKS."""
    d = tmp_path_factory.mktemp("layouts")
    countries = {net: cc for net, (_, _, cc) in NETWORKS.items()}
    asns = {net: (asn, org) for net, (asn, org, _) in NETWORKS.items()}
    ipinfo = {net: (f"AS{asn}", org, cc) for net, (asn, org, cc) in NETWORKS.items()}
    geolite = (write_country_db(d / "GeoLite2-Country.mmdb", countries),
               write_asn_db(d / "GeoLite2-ASN.mmdb", asns))
    dbip = (write_country_db(d / "dbip-country-lite.mmdb", countries,
                             database_type="DBIP-Country-Lite"),
            write_asn_db(d / "dbip-asn-lite.mmdb", asns, database_type="DBIP-ASN-Lite"))
    both = write_ipinfo_db(d / "ipinfo_lite.mmdb", ipinfo)
    return {"geolite2": geolite, "dbip": dbip, "ipinfo": (both, both),
            "mixed": (geolite[0], both)}


LOOKUPS = [
    ("1.1.1.1", ("AS13335", "AU")),
    ("1.1.1.255", ("AS13335", "AU")),
    ("1.2.3.4", ("AS4134", "CN")),  # the supernet, not overwritten by the subnet
    (ipaddress.IPv4Address("2.3.4.5"), ("AS50304", "NO")),
    ("::ffff:1.1.1.1", ("AS13335", "AU")),
    (ipaddress.IPv6Address("::ffff:2.3.4.5"), ("AS50304", "NO")),
    ("2a02:1234:5::1", ("AS64501", "NL")),
    ("2a02:1234:6::1", ("AS3320", "DE")),
    ("2A02:1234:0005:0000::9", ("AS64501", "NL")),
    ("2a01:4f8:1::77", ("AS64500", "DE")),
    # Not in the database.
    ("9.9.9.9", ("AS0", "ZZ")),
    ("2600::1", ("AS0", "ZZ")),
    ("2001:db8:2::1", ("AS0", "ZZ")),
    # Not global: never looked up, even where the database has data.
    ("10.1.2.3", ("AS0", "ZZ")),
    ("127.0.0.1", ("AS0", "ZZ")),
    ("::ffff:10.1.2.3", ("AS0", "ZZ")),
    ("fd00::1", ("AS0", "ZZ")),
    ("100.64.0.1", ("AS0", "ZZ")),
    ("192.168.1.1", ("AS0", "ZZ")),
    ("169.254.1.1", ("AS0", "ZZ")),
    ("fe80::1", ("AS0", "ZZ")),
    ("fe80::1%eth0", ("AS0", "ZZ")),
    ("::1", ("AS0", "ZZ")),
    ("224.0.0.1", ("AS0", "ZZ")),
    ("ff02::1", ("AS0", "ZZ")),
    ("240.0.0.1", ("AS0", "ZZ")),
    ("0.0.0.0", ("AS0", "ZZ")),
    ("::", ("AS0", "ZZ")),
    ("255.255.255.255", ("AS0", "ZZ")),
    # Malformed.
    (None, ("AS0", "ZZ")),
    ("", ("AS0", "ZZ")),
    ("not an ip", ("AS0", "ZZ")),
    ("1.1.1", ("AS0", "ZZ")),
    ("1.1.1.1:443", ("AS0", "ZZ")),
    ("[2a01:4f8:1::77]", ("AS0", "ZZ")),
    (" 1.1.1.1", ("AS0", "ZZ")),
    (16843009, ("AS0", "ZZ")),  # 1.1.1.1 as an int: not an accepted type
    (b"\x01\x01\x01\x01", ("AS0", "ZZ")),
]


@pytest.mark.parametrize("layout", ["geolite2", "dbip", "ipinfo", "mixed"])
@pytest.mark.parametrize(("ip", "expected"), LOOKUPS, ids=repr)
def test_lookup(layouts, layout, ip, expected):
    geo = open_geo(*layouts[layout])
    try:
        assert geo.lookup(ip) == expected
    finally:
        geo.close()


def test_geo_dbs_fixture(geo_dbs):
    geo = open_geo(*map(str, geo_dbs))
    try:
        assert geo.lookup("1.1.1.1") == ("AS13335", "AU")
        assert geo.lookup("2.3.4.5") == ("AS50304", "NO")
        assert geo.lookup("6.6.6.6") == ("AS666", "US")
        assert geo.lookup("2a01:4f8:1::99") == ("AS64500", "DE")
    finally:
        geo.close()


def test_registered_country_fallback(tmp_path):
    path = write_country_db(tmp_path / "c.mmdb", {"5.5.5.0/24": "SE"}, registered_only=True)
    geo = open_geo(path, None)
    try:
        assert geo.lookup("5.5.5.5") == ("AS0", "SE")
    finally:
        geo.close()


# Odd values a database might hold: never passed on, only well-formed "AS<n>" / "CC".
ODD_RECORDS = [
    ({"autonomous_system_number": 7, "country": {"iso_code": "se"}}, ("AS7", "SE")),
    ({"asn": "as7", "country_code": "no"}, ("AS7", "NO")),
    ({"asn": "AS007", "country_code": "NO"}, ("AS7", "NO")),
    ({"asn": "AS4294967295", "country_code": "NO"}, ("AS4294967295", "NO")),
    ({"asn": "AS4294967296", "country_code": "NO"}, ("AS0", "NO")),
    ({"asn": "AS0", "country_code": "NO"}, ("AS0", "NO")),
    ({"asn": "AS12x", "country_code": "N0"}, ("AS0", "ZZ")),
    ({"asn": "AS", "country_code": "N"}, ("AS0", "ZZ")),
    ({"asn": " AS7", "country_code": "NOR"}, ("AS0", "ZZ")),
    ({"asn": "AS\u0663", "country_code": "\u00c5L"}, ("AS0", "ZZ")),  # non-ASCII digit, letter
    ({"asn": "AS" + "9" * 40, "country_code": ""}, ("AS0", "ZZ")),
    ({"asn": 13335, "country_code": "NO"}, ("AS13335", "NO")),
    ({"autonomous_system_number": "13335"}, ("AS0", "ZZ")),
    ({"autonomous_system_number": True, "country": {"iso_code": True}}, ("AS0", "ZZ")),
    ({"autonomous_system_number": 1.5, "country": "AU"}, ("AS0", "ZZ")),
    ({"country": {"names": {"en": "Europe"}}, "registered_country": {"iso_code": "FR"}},
     ("AS0", "FR")),
    ({"country": {"iso_code": "<b"}}, ("AS0", "ZZ")),
    ({"asn": ["AS7"], "country_code": {"iso_code": "AU"}}, ("AS0", "ZZ")),
    ("AS7 AU", ("AS0", "ZZ")),
    (["AS7", "AU"], ("AS0", "ZZ")),
    (7, ("AS0", "ZZ")),
]


@pytest.mark.parametrize(("record", "expected"), ODD_RECORDS, ids=repr)
def test_odd_records(tmp_path, record, expected):
    path = write_db(tmp_path / "odd.mmdb", "odd", [("7.7.7.0/24", record)])
    geo = open_geo(path, path)
    try:
        assert geo.lookup("7.7.7.7") == expected
    finally:
        geo.close()


def test_null_geo_warns_once(caplog):
    caplog.set_level(logging.DEBUG, "tunnel_telemetry.pipeline.geo")
    geo = open_geo(None, None)
    assert [geo.lookup(ip) for ip in ("1.1.1.1", "2a01:4f8:1::1", None)] == [("AS0", "ZZ")] * 3
    assert geo.info() == []
    geo.reload()
    geo.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("geo_disabled")


@pytest.mark.parametrize(("which", "expected", "warning"), [
    ("country", ("AS0", "AU"), "geo_asn_disabled"),
    ("asn", ("AS13335", "ZZ"), "geo_country_disabled"),
])
def test_one_of_two(layouts, caplog, which, expected, warning):
    country, asn = layouts["geolite2"]
    geo = open_geo(country, None) if which == "country" else open_geo("", asn)
    try:
        assert geo.lookup("1.1.1.1") == expected
        assert [i["role"] for i in geo.info()] == [which]
    finally:
        geo.close()
    assert warning in caplog.text


def test_same_file_opened_once(layouts, tmp_path):
    both = layouts["ipinfo"][0]
    link = tmp_path / "link.mmdb"
    link.symlink_to(both)
    for asn_db in (both, str(link)):
        geo = open_geo(both, asn_db)
        try:
            assert [i["role"] for i in geo.info()] == ["country+asn"]
            assert geo.lookup("1.1.1.1") == ("AS13335", "AU")
        finally:
            geo.close()


def test_info(tmp_path):
    country = write_country_db(tmp_path / "country.mmdb", {"1.1.1.0/24": "AU"},
                               build_epoch=BUILD_EPOCH)
    asn = write_asn_db(tmp_path / "asn.mmdb", {"1.1.1.0/24": (13335, "X")},
                       build_epoch=BUILD_EPOCH + 86400)
    geo = open_geo(country, asn)
    try:
        info = geo.info()
    finally:
        geo.close()
    ages = [db.pop("age_days") for db in info]
    assert ages[0] - ages[1] == pytest.approx(1, abs=0.11) and ages[1] > 1000
    assert info == [
        {"role": "country", "database_type": "GeoLite2-Country", "build_date": "2023-11-14",
         "ip_version": 6, "file": "country.mmdb"},
        {"role": "asn", "database_type": "GeoLite2-ASN", "build_date": "2023-11-15",
         "ip_version": 6, "file": "asn.mmdb"},
    ]
    assert str(tmp_path) not in json.dumps(info)


def _garbage(tmp_path, kind):
    path = tmp_path / f"{kind}.mmdb"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("network,country\n1.1.1.0/24,AU\n")
    elif kind == "truncated":
        whole = write_country_db(tmp_path / "whole.mmdb", {"1.1.1.0/24": "AU"})
        data = Path(whole).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


BAD_FILES = [
    ("missing", "no such file", "geo_db_missing"),
    ("directory", "is a directory", "geo_db_unreadable"),
    ("empty", "not a MaxMind DB", "geo_db_invalid"),
    ("text", "not a MaxMind DB", "geo_db_invalid"),
    ("truncated", "not a MaxMind DB", "geo_db_invalid"),
]


@pytest.mark.parametrize("option", ["geoip-country-db", "geoip-asn-db"])
@pytest.mark.parametrize(("kind", "problem", "reason"), BAD_FILES)
def test_bad_file(tmp_path, layouts, option, kind, problem, reason):
    bad = str(_garbage(tmp_path, kind))
    good_country, good_asn = layouts["geolite2"]
    args = (bad, good_asn) if option == "geoip-country-db" else (good_country, bad)
    with pytest.raises(GeoError) as err:
        open_geo(*args)
    assert str(err.value).startswith(f"{option}: {bad}: ")
    assert problem in str(err.value) and "\n" not in str(err.value)
    assert err.value.reason == reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path, layouts):
    path = tmp_path / "locked.mmdb"
    path.write_bytes(Path(layouts["geolite2"][1]).read_bytes())
    path.chmod(0)
    with pytest.raises(GeoError, match=r"^geoip-asn-db: .*: permission denied$"):
        open_geo(None, str(path))


def test_reload(tmp_path, caplog):
    path = tmp_path / "country.mmdb"
    write_country_db(path, {"1.1.1.0/24": "AU"})
    geo = open_geo(str(path), None)
    try:
        assert geo.lookup("1.1.1.1") == ("AS0", "AU")
        # Updates replace the file (never rewrite a mapped file in place).
        write_country_db(tmp_path / "new.mmdb", {"1.1.1.0/24": "NZ"}, build_epoch=BUILD_EPOCH)
        os.replace(tmp_path / "new.mmdb", path)
        assert geo.lookup("1.1.1.1") == ("AS0", "AU")  # until reloaded
        geo.reload()
        assert geo.lookup("1.1.1.1") == ("AS0", "NZ")
        assert geo.info()[0]["build_date"] == "2023-11-14"

        (tmp_path / "garbage").write_text("garbage")
        os.replace(tmp_path / "garbage", path)
        caplog.clear()
        geo.reload()
        assert geo.lookup("1.1.1.1") == ("AS0", "NZ")  # kept the working database
        assert "geo_reload_failed geo_db_invalid geoip-country-db" in caplog.text
        path.unlink()
        geo.reload()
        assert geo.lookup("1.1.1.1") == ("AS0", "NZ")
        assert "geo_db_missing" in caplog.text
    finally:
        geo.close()
    assert geo.lookup("1.1.1.1") == ("AS0", "ZZ")  # closed
    geo.close()  # twice is harmless


def test_lookup_errors_answer_unknown_and_log_no_address(tmp_path, caplog):
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=4, database_type="v4-only")
    writer.insert_network(IPSet(["1.1.1.0/24"]), {"country": {"iso_code": "AU"}})
    writer.to_db_file(str(tmp_path / "v4.mmdb"))
    caplog.set_level(logging.DEBUG, "tunnel_telemetry.pipeline.geo")
    geo = open_geo(str(tmp_path / "v4.mmdb"), None)
    try:
        assert geo.lookup("1.1.1.1") == ("AS0", "AU")
        assert geo.lookup("2a02:1234::77") == ("AS0", "ZZ")  # IPv6 in an IPv4-only file
    finally:
        geo.close()
    assert "geo_lookup_failed" in caplog.text
    assert "1.1.1.1" not in caplog.text and "2a02:1234" not in caplog.text


def test_ipv4_next_to_ipv4_compatible_networks_is_refused(tmp_path):
    with pytest.raises(ValueError, match="::/96"):
        write_db(tmp_path / "x.mmdb", "x", [("1.1.1.0/24", {}), ("::7:0/112", {})])


def test_synthetic_networks():
    nets = synthetic_networks(3000, seed=5)
    assert nets == synthetic_networks(3000, seed=5) != synthetic_networks(3000, seed=6)
    assert len(nets) == len({net for net, _, _ in nets}) == 3000
    parsed = [ipaddress.ip_network(net) for net, _, _ in nets]
    assert {n.version for n in parsed} == {4, 6}
    for version in (4, 6):
        family = sorted((n for n in parsed if n.version == version),
                        key=lambda n: int(n.network_address))
        assert all(n.network_address.is_global and n.broadcast_address.is_global
                   for n in family)
        assert all(a.broadcast_address < b.network_address for a, b in pairwise(family))


def test_synthetic_dbs(tmp_path):
    country, asn = write_synthetic_dbs(tmp_path / "syn", n_networks=3000, seed=5)
    geo = open_geo(country, asn)
    try:
        for net, cc, number in synthetic_networks(3000, seed=5):
            network = ipaddress.ip_network(net)
            for ip in (network.network_address, network.broadcast_address):
                assert geo.lookup(ip) == (f"AS{number}", cc), net
        assert {i["database_type"] for i in geo.info()} == {"GeoLite2-Country", "GeoLite2-ASN"}
    finally:
        geo.close()


SPECIAL_NETWORKS = [  # IANA special-purpose blocks (IPv4 and IPv6), as of 2026
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.0.0/29", "192.0.0.8/32", "192.0.0.9/32",
    "192.0.0.10/32", "192.0.0.170/31", "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24",
    "192.88.99.0/24", "192.168.0.0/16", "192.175.48.0/24", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
    "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64",
    "2001::/23", "2001::/32", "2001:1::1/128", "2001:1::2/128", "2001:2::/48", "2001:3::/32",
    "2001:4:112::/48", "2001:10::/28", "2001:20::/28", "2001:30::/28", "2001:db8::/32",
    "2002::/16", "2620:4f:8000::/48", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10",
    "ff00::/8",
]
# Python versions disagree inside these (3.11 keeps parts of them global, newer ones others):
# geo takes them whole as not global.
WHOLE_BLOCKS = [ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("2001::/23")]


def _edges_and_random():
    import random

    addresses = []
    for text in SPECIAL_NETWORKS:
        net = ipaddress.ip_network(text)
        low, high = int(net.network_address), int(net.broadcast_address)
        step = 256 if net.version == 4 else 1 << 96
        for number in (low - step, low - 1, low, low + 1, high - 1, high, high + 1, high + step):
            if 0 <= number < 2 ** net.max_prefixlen:
                addresses.append(ipaddress.IPv4Address(number) if net.version == 4
                                 else ipaddress.IPv6Address(number))
    addresses += list(ipaddress.ip_network("192.0.0.0/24"))
    rng = random.Random(0)
    addresses += [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(20000)]
    addresses += [ipaddress.IPv6Address(rng.getrandbits(128)) for _ in range(20000)]
    return addresses


def test_global_check_agrees_with_the_standard_library():
    """geo's own table answers like ipaddress.is_global on the edges of every special block
    and on random addresses; the blocks Python versions disagree on are not global at all."""
    from tunnel_telemetry.pipeline.geo import is_global

    for address in _edges_and_random():
        if any(address in block for block in WHOLE_BLOCKS):
            assert not is_global(address), address
        else:
            assert is_global(address) == address.is_global, address


def test_lookups_leave_no_address_in_ipaddress_caches(geo_dbs):
    """ipaddress caches is_private / is_global answers per address (128 of them): geo must
    not ask, or recent client and endpoint addresses stay in the worker's memory."""
    cached = [ipaddress.IPv4Address.is_private, ipaddress.IPv4Address.is_global,
              ipaddress.IPv6Address.is_private]
    cached = [prop.fget for prop in cached if hasattr(prop.fget, "cache_info")]
    geo = open_geo(*geo_dbs)
    try:
        for fn in cached:
            fn.cache_clear()
        for text in ("81.2.69.160", "10.1.2.3", "2a02:ff0::1", "fd00::1", "::ffff:81.2.69.160"):
            geo.lookup(text)
            geo.lookup(ipaddress.ip_address(text))
        assert [fn.cache_info().currsize for fn in cached] == [0] * len(cached)
    finally:
        geo.close()
