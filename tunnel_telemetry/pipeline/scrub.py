"""Scrub step: keep only what is known to be harmless before anything is stored or relayed.

Fails closed (docs/privacy.md): ``config`` keeps the keys of an allow-list of protocol
settings whose values pass the text check; ``failure`` texts keep their words and lose every
token that could be an address, a host name, a number that could be an address, a credential
or an identifier. Log lines go through :func:`scrub_text`, which hides IP addresses in any
spelling. No regular expression is built from report data (``re`` caches the last 512
patterns it compiled: a proxy's host name would stay in the worker's memory).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Collection
from typing import Any

PLACEHOLDER = "[scrubbed]"

# Settings that describe how a tunnel speaks, never where it is or who uses it: the protocol,
# cipher and transport names clients report (Outline / Shadowsocks, V2Ray / Xray, obfs4,
# Hysteria, WireGuard; outline-sdk's `proto` and its chain of schemes as `transport`).
# Host names (sni, host, front), paths, ids, keys and seeds are not settings of this kind.
SAFE_CONFIG_KEYS = frozenset({
    "prefix", "proto", "protocol", "transport", "chain", "cipher", "method", "network", "net",
    "type", "mode", "security", "encryption", "flow", "alpn", "fingerprint", "fp", "utls",
    "tls", "mux", "multiplex", "padding", "plugin", "obfs", "iat-mode", "congestion",
    "congestion-control", "udp", "tfo", "version", "header-type", "mtu", "split", "tlsfrag",
    "disorder", "fragment", "ech", "resolver-type",
})
# Longest config value kept: settings are names and small numbers.
MAX_SETTING = 64

# A config key whose words include one of these names a secret or an identifier: the operator
# cannot put it on the allow-list (config.py checks scrub-allow-config-keys with secret_key).
SECRET_WORDS = frozenset({
    "pass", "pw", "pwd", "secret", "token", "key", "uuid", "auth", "cred", "cookie", "session",
    "private", "psk", "cert", "sig", "user", "username", "login", "account", "email", "mail",
    "id", "sid", "seed", "contact", "ip", "ips", "addr", "address", "server", "host",
    "hostname", "peer", "mac", "imei", "phone", "sni", "path", "url", "uri", "domain",
})
SECRET_FRAGMENTS = ("pass", "secret", "token", "uuid", "key", "cred", "auth", "cookie", "psk",
                    "private", "mail", "host", "addr", "seed", "user", "session", "server",
                    "peer", "name", "param", "sni", "pbk", "spider", "phone", "contact",
                    "account", "login", "domain", "path", "url", "endpoint", "remote")
# Run together in lower case (shortid, clientid, serverip, pbk): how a key ends.
SECRET_ENDINGS = ("id", "ids", "ip", "ips", "spx")
_KEY_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")

# Protocol and transport names: words of error text, parts of failure ops (`tcp.connect`) and
# config values (`split|ss`).
PROTOCOLS = frozenset({
    "tcp", "tcp4", "tcp6", "udp", "udp4", "udp6", "ip", "ip4", "ip6", "ipv4", "ipv6", "icmp",
    "tls", "dtls", "ssl", "quic", "http", "https", "http2", "http3", "h2", "h3", "h2c", "ws",
    "wss", "grpc", "dns", "doh", "dot", "doq", "socks", "socks4", "socks4a", "socks5",
    "socks5h", "ss", "ssr", "shadowsocks", "outline", "vless", "vmess", "trojan", "reality",
    "xtls", "obfs", "obfs2", "obfs3", "obfs4", "meek", "snowflake", "webtunnel", "conjure",
    "hysteria", "hysteria2", "hy2", "tuic", "wireguard", "wg", "openvpn", "ikev2", "ipsec",
    "l2tp", "pptp", "ssh", "kcp", "mkcp", "split", "tlsfrag", "override", "direct", "tor",
    "psiphon", "naive", "shadowtls", "utls", "smux", "yamux", "mux", "xhttp", "splithttp",
    "httpupgrade", "proxy", "resolver", "probe",
})
# What a failure op does (`dns.resolve`, `tls.handshake`).
VERBS = frozenset({
    "connect", "dial", "handshake", "resolve", "lookup", "send", "receive", "recv", "read",
    "write", "close", "accept", "listen", "request", "response", "upgrade", "auth",
    "authenticate", "bind", "tunnel", "setup", "init", "start", "stream", "open", "query",
    "verify", "test", "ping", "fetch", "transfer",
})
# Error words holding digits, dots or slashes, kept as they are (compared in lower case).
ERROR_WORDS = frozenset({
    "x509", "i/o", "http/1.0", "http/1.1", "http/2", "http/3", "tls1.0", "tls1.1", "tls1.2",
    "tls1.3", "tlsv1", "tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3", "sslv3", "utf-8", "utf8",
    "base64", "sha1", "sha256", "sha384", "sha512", "md5", "ed25519", "x25519", "p256",
    "p384", "p521", "p-256", "p-384", "p-521", "pkcs1", "pkcs7", "pkcs8", "pkcs12", "asn1",
    "0-rtt", "1-rtt", "aes128", "aes256", "aes-128-gcm", "aes-192-gcm", "aes-256-gcm",
    "aes-128-cfb", "aes-256-cfb", "aes-128-ctr", "aes-256-ctr", "chacha20", "chacha20-poly1305",
    "chacha20-ietf", "chacha20-ietf-poly1305", "xchacha20", "xchacha20-poly1305",
    "xchacha20-ietf-poly1305", "2022-blake3-aes-128-gcm", "2022-blake3-aes-256-gcm",
    "2022-blake3-chacha20-poly1305", "blake3", "curve25519", "x25519mlkem768", "mlkem768",
    "ws2_32", "rfc1918", "e.g", "i.e",
})
VOCABULARY = PROTOCOLS | VERBS | ERROR_WORDS
# After one of these words (followed by ":" or "=", or always for an HTTP auth scheme) the
# next token is a credential, whatever it looks like.
_SCHEMES = frozenset({"bearer", "basic", "digest", "negotiate"})
_CREDENTIAL_WORDS = _SCHEMES | frozenset({
    "token", "password", "passwd", "pwd", "secret", "apikey", "api-key", "api_key", "key",
    "cookie", "sid", "session", "psk", "uuid", "authorization",
})

# A chunk of text between spaces, brackets, quotes and list separators, and the punctuation
# that may end or start it without being part of what it names (and one colon or dash: not
# two, which "::1", "100::" and "100--" need).
_CHUNK = re.compile(r"[^\s()\[\]{}<>\"'`,;|]+")
_EDGE = ".!?="
# Letters in words joined by single hyphens or underscores (unambiguous: linear).
_WORD = re.compile(r"[^\W\d_]+(?:[-_][^\W\d_]+)*")
# A decimal number up to five digits (a port, a status, an errno; as an address it would be
# in 0.0.0.0/8, where no host is), and Go-style durations made of such numbers (5m0s, 1.5s).
_NUMBER = re.compile(r"[+-]?(?:0|[1-9][0-9]{0,4})")
_DURATION = re.compile(r"(?:(?:0|[1-9][0-9]{0,4})(?:\.[0-9]{1,3})?(?:ns|us|µs|ms|s|m|h))+")
_HEX = frozenset("0123456789abcdefABCDEF")
MAX_WORD = 32  # an ASCII word longer than this is more likely a secret than a word


def _norm(text: str) -> str:
    """The form two spellings of a name share: what a resolver maps them to (NFKC and case
    folding, UTS 46) and what ``re.IGNORECASE`` treats as equal."""
    if text.isascii():
        return text.lower()
    return _fold(unicodedata.normalize("NFKC", text))


# What ignoring case means for an ASCII letter, as Python's re has it: its two cases, and four
# other characters (tests/test_scrub.py checks this against re).
_FOLD = str.maketrans({**{chr(c): chr(c + 32) for c in range(ord("A"), ord("Z") + 1)},
                       "\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})


def _fold(text: str) -> str:
    """Each character's case fold where it is one character (else its lower case, else
    itself): what ``re.IGNORECASE`` treats as equal (ς σ Σ, µ μ, ϐ β, ...) folds alike."""
    if text.isascii():
        return text.lower()
    return "".join(_fold_char(c) for c in text.translate(_FOLD))


def _fold_char(c: str) -> str:
    if len(folded := c.casefold()) == 1:
        return folded
    return low if len(low := c.lower()) == 1 else c


def host_names(host: str | None) -> frozenset[str]:
    """The spellings of an endpoint host name that a text may use: the name, its Unicode form
    (``bücher.example`` for ``xn--bcher-kva.example``) and each label but the last (a name's
    first label alone is how many errors name it), normalised by :func:`_norm`."""
    if not host or _is_ip(host):
        return frozenset()
    forms = {host, _unicode(host)}
    names = set(forms)
    for form in forms:
        labels = form.split(".")
        names.update(label for label in labels[:-1] if label)
        if len(labels) == 1:
            names.add(labels[0])
    return frozenset(_norm(n) for n in names if n)


def _unicode(host: str) -> str:
    try:
        return ".".join(label.encode("ascii").decode("idna") if label.startswith("xn--")
                        else label for label in host.split("."))
    except (UnicodeError, ValueError):
        return host


def _case_changes(word: str) -> int:
    return sum(1 for a, b in zip(word, word[1:], strict=False) if a.islower() and b.isupper())


def _harmless(core: str, hidden: Collection[str]) -> bool:
    """True when a token is known not to name an address, a host, a credential or an id."""
    if hidden and _norm(core) in hidden:
        return False
    if not any(c.isalnum() for c in core):
        return True  # punctuation alone: "->", "--", "::"
    low = core.lower()
    if low in VOCABULARY:
        return True
    if _WORD.fullmatch(core):
        if not core.isascii():
            return True
        return (len(core) <= MAX_WORD
                and (core[1:].islower() or core.isupper() or _case_changes(core) < 3)
                and not (len(core) >= 8 and set(core) <= _HEX))
    if len(core) <= MAX_WORD:
        if _NUMBER.fullmatch(core):
            return int(core) <= 65535
        if _DURATION.fullmatch(core):
            return True
        if "." in core:  # an op such as tcp.connect: every label a known word
            return all(label in VOCABULARY for label in low.split("."))
    return False


def _core(chunk: str) -> str:
    """What a chunk names, without the text's punctuation around it."""
    core = chunk.strip(_EDGE)
    if core.endswith((":", "-")) and not core.endswith(("::", "--")):  # not 100::
        core = core[:-1].rstrip(_EDGE)  # "connect:", "47631-" (of "->")
    if core.startswith(":") and not core.startswith("::"):
        core = core[1:]  # ":443" after "[...]"
    return core


def hide_names(text: str, names: Collection[str]) -> str:
    """``text`` with each token that is one of ``names`` (in any case, NFKC) replaced:
    whole tokens only, so a short name is never hidden inside a word."""
    wanted = frozenset(_norm(n) for n in names if n)
    if not wanted:
        return text
    out: list[str] = []
    start = 0
    for match in _CHUNK.finditer(text):
        chunk = match.group()
        core = _core(chunk)
        if core and _norm(core) in wanted:
            lead = chunk.index(core)
            out += (text[start:match.start() + lead], PLACEHOLDER)
            start = match.start() + lead + len(core)
    if not out:
        return text
    out.append(text[start:])
    return "".join(out)


def scrub_message(text: str, hidden: Collection[str] = ()) -> str:
    """Error text with its words kept and every other token replaced by ``[scrubbed]``.

    A token is kept when it is a word (letters, joined by ``-`` or ``_``), a known protocol or
    error word, a small number or a duration, and is not one of ``hidden`` (see
    :func:`host_names`) nor what follows a credential word ("Bearer ...", "password: ...").
    Anything else, whatever it is, goes: digits, hex runs, ``@``, ``:``, ``%``, ``/`` or a dot
    between labels.
    """
    out: list[str] = []
    start = 0
    secret_next = after_credential = False
    for match in _CHUNK.finditer(text):
        chunk = match.group()
        core = _core(chunk)
        if not core or core == ":":  # "token = x": the separator alone
            secret_next = secret_next or after_credential and any(c in chunk for c in ":=")
            continue
        lead = chunk.index(core)
        trail = chunk[lead + len(core):]
        low = core.lower()
        if low == "scrubbed":  # what scrubbing left: the same again (a relayed report)
            secret_next = after_credential = False
            continue
        if low in _SCHEMES and not (hidden and _norm(core) in hidden):
            secret_next = after_credential = True  # "Authorization: Bearer x": x goes
            continue
        if secret_next or not _harmless(core, hidden):
            out += (text[start:match.start() + lead], PLACEHOLDER)
            start = match.end() - len(trail)
            secret_next = after_credential = False
            continue
        after_credential = low in _CREDENTIAL_WORDS
        secret_next = after_credential and trail[:1] in (":", "=")
    if not out:
        return text
    out.append(text[start:])
    return "".join(out)


# ---------------------------------------------------------------------------------- logs

# Runs of the characters an address may be written with, judged whole by _spells_address; a
# single greedy class cannot backtrack, so the scan is linear on any text.
_ATOM = re.compile(r"[\w:.%-]+")
_LONG_NUMBER = re.compile(r"[0-9]{8}|0[xX]|[0-9a-fA-F]{32}")
_IPV4 = re.compile(r"(?<![0-9.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9])")
_WORD_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9]*:")
_INET_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")
_DASHED = frozenset("0123456789abcdef-s")


def _is_ip(token: str) -> bool:
    token = token.split("%", 1)[0]
    try:
        if ":" in token:
            ipaddress.IPv6Address(token)
        elif token.count(".") == 3:
            ipaddress.IPv4Address(token)
        else:
            return False
    except ValueError:
        return False
    return True


def _inet_part(part: str) -> int:
    if part[:2] in ("0x", "0X"):
        return int(part[2:] or "0", 16)
    return int(part, 8) if len(part) > 1 and part[0] == "0" else int(part)


def _inet_aton(token: str) -> bool:
    """True for the IPv4 spellings inet_aton and URL parsers accept besides a.b.c.d:
    ``151521090``, ``0x9080742``, ``011.010.07.0102``, ``9.8.1858`` (a bare decimal only
    outside 0.0.0.0/8 and two or three parts only when the last spans bytes, so that pids,
    counts and version numbers stay)."""
    parts = token.split(".")
    if not 1 <= len(parts) <= 4 or not all(_INET_PART.fullmatch(p) for p in parts):
        return False
    values = [_inet_part(p) for p in parts]
    if any(v > 255 for v in values[:-1]) or values[-1] >= 256 ** (5 - len(parts)):
        return False
    if any(len(p) > 1 and p[0] == "0" for p in parts):
        return True  # octal or hex somewhere: nobody writes a count or a version so
    if len(parts) == 1:
        return values[0] >= 1 << 24
    return len(parts) == 4 or values[-1] > 255


def _address_form(token: str) -> bool:
    if _is_ip(token) or _inet_aton(token):
        return True
    head, colon, port = token.rpartition(":")
    if colon and port.isdigit() and head and _is_ip(head):
        return True  # 2001:db8:0:0:0:0:0:66:443, as Go's errors write it
    low = token.lower()
    if low.endswith(".ipv6-literal.net"):
        low = low[:-len(".ipv6-literal.net")]
    if "-" in low and set(low) <= _DASHED and _is_ip(low.replace("-", ":").replace("s", "%")):
        return True  # 2001-db8--1: IPv6 with dashes (Windows UNC names)
    return len(low) == 32 and set(low) <= _HEX  # IPv6 as 32 hex digits


def _spells_address(token: str) -> bool:
    if len(token) < 2:
        return False
    if _address_form(token):
        return True
    prefix = _WORD_PREFIX.match(token) if ":" in token else None
    return prefix is not None and _address_form(token[prefix.end():])  # ip:..., IPv6:...


def _replace_address(match: re.Match[str]) -> str:
    atom = match.group()
    if "." not in atom and atom.count(":") < 2 and atom.count("-") < 2:
        # No dotted, IPv6 or dashed form: at most a bare number (151521090, 0x9080742) or 32
        # hex digits, maybe after a word and a colon. Most words of a log line stop here.
        tail = atom.strip(":-_").rpartition(":")[2]
        if not (tail.isdecimal() and len(tail) >= 8 and (tail[0] == "0" or 1 << 24 <= int(
                tail) < 1 << 32) or tail[:2] in ("0x", "0X") or len(tail) == 32):
            return atom
    core = atom.strip("._")
    # The whole run (2001:db8::, 2001-db8--), else without the text's own colons and dashes
    # around it ("from ::1: refused", "1.2.3.4->").
    one = core[core.startswith("-"):len(core) - core.endswith("-")]  # "->2001-db8--->"
    for part in dict.fromkeys((core, one, core.rstrip("-"), core.rstrip(":-"),
                               core.strip(":-"))):
        if not part:
            continue
        check = part if part.isascii() else unicodedata.normalize("NFKC", part)
        if _spells_address(check):
            lead = atom.index(part)
            return atom[:lead] + PLACEHOLDER + atom[lead + len(part):]
    return atom


def scrub_text(text: str, extra: Collection[str] = ()) -> str:
    """Text with every IP address replaced, in the spellings resolvers accept (for logs), and
    the tokens that are one of ``extra`` (see :func:`hide_names`)."""
    if extra:
        text = hide_names(text, extra)
    if ("." not in text and text.count(":") < 2 and text.count("-") < 2
            and not _LONG_NUMBER.search(text)):
        return text  # no spelling of an address fits (most log lines)
    text = _ATOM.sub(_replace_address, text)
    # A dotted quad glued to other characters ("\x0a1.2.3.4" in an escaped path).
    return _IPV4.sub(PLACEHOLDER, text) if text.count(".") >= 3 else text


def contains_ip(text: str) -> bool:
    """True when the text holds something that spells an IP address."""
    return scrub_text(text) != text


def secret_key(key: str) -> bool:
    """True when a config key names something secret or identifying (password, uuid, ...)."""
    whole = "".join(c for c in key.lower() if c.isalnum())  # pAssword, PASSword
    for word in (whole, *_KEY_WORDS.findall(key)):
        word = word.lower()
        if word in SECRET_WORDS or any(f in word for f in SECRET_FRAGMENTS):
            return True
    return whole.endswith(SECRET_ENDINGS)


def config_key(key: str, allowed: Collection[str] = ()) -> str | None:
    """The allow-listed name of a config key (lower case, ``_`` read as ``-``), or None."""
    if not key.isascii():
        return None
    name = key.lower().replace("_", "-")
    return name if name in SAFE_CONFIG_KEYS or name in allowed else None


def scrub(report: dict[str, Any], allow_public_endpoint: bool,
          allow_config_keys: Collection[str] = ()) -> dict[str, Any]:
    """Return a copy of an enriched report that is safe to store and relay.

    ``allow_config_keys`` extends SAFE_CONFIG_KEYS (option scrub-allow-config-keys).
    """
    out = dict(report)
    hidden: frozenset[str] = frozenset()
    if not allow_public_endpoint:
        hidden = host_names(out.pop("endpoint_addr", None))
        out.pop("endpoint", None)

    config: dict[str, str] = {}
    for key, value in (out.get("config") or {}).items():
        name = config_key(key, allow_config_keys)
        if (name is None or name in config or not isinstance(value, str)
                or len(value) > MAX_SETTING or scrub_message(value, hidden) != value):
            continue
        config[name] = value
    out["config"] = config

    failure = out.get("failure")
    if failure is not None:
        out["failure"] = {k: scrub_message(v, hidden) for k, v in failure.items()}
    return out
