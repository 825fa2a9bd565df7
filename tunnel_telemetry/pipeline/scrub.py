"""Scrub step: remove what could identify a person or a proxy before anything is stored.

Fails closed: config keys that name secrets and any value holding an IP address are dropped;
IP addresses in free text are replaced by a placeholder.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

PLACEHOLDER = "[scrubbed]"

# A config key is dropped when one of its words is listed here (matched as a whole word) ...
SECRET_WORDS = frozenset({
    "pass", "pw", "pwd", "secret", "token", "key", "uuid", "auth", "cred", "cookie", "session",
    "private", "psk", "cert", "sig", "user", "username", "login", "account", "email", "id",
    "ip", "ips", "addr", "address", "server", "host", "hostname", "peer", "mac", "imei", "phone",
})
# ... or when any word contains one of these.
SECRET_FRAGMENTS = ("pass", "secret", "token", "uuid", "key", "cred", "auth", "cookie", "psk",
                    "private", "passwd")
_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_FRAGMENT = re.compile("|".join(map(re.escape, SECRET_FRAGMENTS)))

_IPV4 = re.compile(r"(?<![0-9.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9])")
# Maximal runs of address-like characters, judged whole by _is_ip: a single greedy run with
# no lookaround cannot backtrack, so the scan is linear (the old three-star pattern was cubic
# and let one long "::::" string in a report or a URL stall a worker for minutes).
_TOKEN = re.compile(r"[0-9A-Za-z:.]+(?:%[0-9A-Za-z_.-]+)?")


def _is_ip(token: str) -> bool:
    try:
        ipaddress.ip_address(token.split("%", 1)[0].strip("."))
    except ValueError:
        return False
    return True


def _replace_ipv6(match: re.Match[str]) -> str:
    token = match.group(0)
    if token.count(":") < 2:
        return token
    if _is_ip(token):
        return PLACEHOLDER
    bare = token.rstrip(":")  # "from 2001:db8::7: refused": the colon is the message's
    if bare != token and _is_ip(bare):
        return PLACEHOLDER + token[len(bare):]
    return token


# What ignoring case means for an ASCII letter, as Python's re has it: its two cases, and four
# other characters (tests/test_scrub.py checks this against re).
_FOLD = str.maketrans({**{chr(c): chr(c + 32) for c in range(ord("A"), ord("Z") + 1)},
                       "\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})


def _fold(text: str) -> str:
    """Each character's case fold where it is one character (else its lower case, else
    itself): what ``re.IGNORECASE`` treats as equal (ς σ Σ, µ μ, ϐ β, ...) folds alike, and
    a match in the folded text is a match at the same place in the text."""
    if text.isascii():
        return text.lower()
    return "".join(_fold_char(c) for c in text.translate(_FOLD))


def _fold_char(c: str) -> str:
    if len(folded := c.casefold()) == 1:
        return folded
    return low if len(low := c.lower()) == 1 else c


def _hide(text: str, literal: str) -> str:
    """``text`` with every occurrence of ``literal`` replaced, ignoring case.

    No regular expression: ``re`` keeps the last 512 patterns it compiled, so the endpoints'
    host names would stay in the worker's memory."""
    folded, needle = _fold(text), _fold(literal)
    at = folded.find(needle)
    if at < 0:
        return text
    out: list[str] = []
    start = 0
    while at >= 0:
        out += (text[start:at], PLACEHOLDER)
        start = at + len(needle)
        at = folded.find(needle, start)
    out.append(text[start:])
    return "".join(out)


def scrub_text(text: str, extra: tuple[str, ...] = ()) -> str:
    """Replace IP addresses (and the given literal strings) in free text."""
    for literal in extra:
        if literal:
            text = _hide(text, literal)
    # Each pass only where it can match (an IPv6 address has 2+ colons, an IPv4 one 3 dots):
    # most text has neither, and the token scan calls back into Python for every word.
    if text.count(":") >= 2:
        text = _TOKEN.sub(_replace_ipv6, text)
    if text.count(".") >= 3:
        text = _IPV4.sub(PLACEHOLDER, text)
    return text


def contains_ip(text: str) -> bool:
    """True when the text holds something that looks like an IP address."""
    return scrub_text(text) != text


def secret_key(key: str) -> bool:
    """True when a config key names something secret or identifying (password, uuid, ...)."""
    for word in _WORDS.findall(key):
        word = word.lower()
        if word in SECRET_WORDS or _FRAGMENT.search(word):
            return True
    return False


def scrub(report: dict[str, Any], allow_public_endpoint: bool) -> dict[str, Any]:
    """Return a copy of an enriched report that is safe to store and relay."""
    out = dict(report)
    hidden: tuple[str, ...] = ()
    if not allow_public_endpoint:
        host = out.pop("endpoint_addr", None)
        out.pop("endpoint", None)
        hidden = (host,) if host and not _is_ip(host) else ()

    config = {}
    for key, value in (out.get("config") or {}).items():
        if secret_key(key) or contains_ip(value) or contains_ip(key):
            continue
        if hidden and any(h.lower() in value.lower() or h.lower() in key.lower() for h in hidden):
            continue
        config[key] = value
    out["config"] = config

    failure = out.get("failure")
    if failure is not None:
        out["failure"] = {k: scrub_text(v, hidden) for k, v in failure.items()}
    return out
