"""The ways an address or a host name can be written, for privacy tests to plant and grep for.

Every spelling here is one that ``inet_aton``, a URL parser, a resolver or an error message
of a common library accepts or produces for the same address (issue 21's findings).
"""

from __future__ import annotations

import ipaddress


def ipv4_spellings(address: str) -> set[str]:
    """``a.b.c.d`` as inet_aton reads it (one, two or three parts, octal, hex), IPv4-mapped
    IPv6, with a port and behind word prefixes."""
    ip = ipaddress.IPv4Address(address)
    n = int(ip)
    a, b, c, d = ip.packed
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
    return {
        str(ip), f"{ip}:443", str(n), f"0x{n:x}", f"0x{n:08X}", f"0{n:o}",
        f"0{a:o}.0{b:o}.0{c:o}.0{d:o}", f"0x{a:x}.0x{b:x}.0x{c:x}.0x{d:x}",
        f"{a}.{b}.{c * 256 + d}", f"{a}.{(b << 16) + (c << 8) + d}",
        f"::ffff:{ip}", mapped.exploded, f"::ffff:{(a << 8) + b:x}:{(c << 8) + d:x}",
        f"[::ffff:{ip}]:443", f"ip:{ip}",
    }


def ipv6_spellings(address: str) -> set[str]:
    """Compressed, exploded, eight groups without ``::`` (also followed by a port, as Go's
    errors do), upper case, 32 hex digits, dashed (Windows UNC), with a zone and behind word
    prefixes (``ip:``, ``IPv6:``)."""
    ip = ipaddress.IPv6Address(address)
    groups = ":".join(f"{g:x}" for g in (int.from_bytes(ip.packed[i:i + 2], "big")
                                         for i in range(0, 16, 2)))
    dashed = str(ip).replace(":", "-")
    return {
        str(ip), ip.exploded, groups, f"{groups}:443", str(ip).upper(), f"[{ip}]:443",
        ip.packed.hex(), dashed, f"{dashed}.ipv6-literal.net", f"{ip}%eth0", f"{ip}%25eth0",
        f"ip:{ip}", f"IPv6:{ip}", f"ip6:{groups}",
    }


def host_spellings(host: str) -> set[str]:
    """A host name as given, in upper case, with a trailing dot, in its Unicode form when it
    is an IDN, percent-encoded, and its first label alone."""
    unicode_form = ".".join(label.encode().decode("idna") if label.startswith("xn--") else label
                            for label in host.split("."))
    first = host.split(".")[0]
    encoded = "".join(f"%{b:02X}" for b in host.encode())
    out = {host, host.upper(), host + ".", unicode_form, unicode_form.upper(), encoded,
           host.replace("-", "%2D"), first}
    if unicode_form != host:
        out.add(unicode_form.split(".")[0])
    return out


def address_spellings(address: str) -> set[str]:
    """Every spelling of an IP address or a host name."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return host_spellings(address)
    return ipv4_spellings(address) if ip.version == 4 else ipv6_spellings(address)
