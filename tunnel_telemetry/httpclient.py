"""Retries and HTTP sessions shared by the relay, the client library and autotls.

One backoff schedule (urllib3's ``Retry``: doubling from a minimum, capped), one jitter rule
(up to ``jitter`` of the delay taken off at random, so clients that failed together do not
come back together), one ``Retry-After`` parser (urllib3's) and one HTTP stack (a
``requests.Session`` with urllib3's pool behind an ``HTTPAdapter``). Neutral ground: it
imports nothing of the server, so the client can use it.
"""

from __future__ import annotations

import os
import random
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import requests
import requests.adapters
import requests.utils
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import RequestHistory, Retry

MAX_RETRY_AFTER = 24 * 3600.0
_FAILURE = RequestHistory(None, None, None, None, None)
_RETRY_AFTER = Retry(total=None, retry_after_max=int(MAX_RETRY_AFTER))


def backoff(attempt: int, minimum: float, maximum: float, *, jitter: float = 0.5,
            rand: Callable[[], float] = random.random) -> float:
    """Delay before retry number ``attempt + 1`` (0: the first retry).

    ``minimum * 2**attempt`` capped at ``maximum`` (urllib3's ``Retry`` schedule), less up
    to ``jitter`` (0-1) of it at random.
    """
    failures = (_FAILURE,) * (min(max(attempt, 0), 64) + 2)
    delay = Retry(total=None, backoff_factor=minimum / 2, backoff_max=maximum,
                  history=failures).get_backoff_time()
    return delay * (1.0 - jitter * rand())


def parse_retry_after(value: str | None, cap: float = MAX_RETRY_AFTER) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date, urllib3's
    parser), at most ``cap``; None when absent or malformed."""
    if not value:
        return None
    try:
        seconds = _RETRY_AFTER.parse_retry_after(value)
    except InvalidHeader:
        return None
    return min(float(seconds), cap)


class _Adapter(requests.adapters.HTTPAdapter):
    """An adapter whose TLS context is made with its pool (in the process that uses it, from
    ``ssl`` as it is there), the CA bundle loaded once instead of on every new connection."""

    def __init__(self, ca_bundle: str | None, **kwargs: Any) -> None:  # noqa: ANN401
        self.ca_bundle = ca_bundle
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca_bundle and os.path.isdir(self.ca_bundle):
            context.load_verify_locations(capath=self.ca_bundle)
        elif self.ca_bundle:
            context.load_verify_locations(cafile=self.ca_bundle)
        else:
            context.load_default_certs()
        kwargs["ssl_context"] = context
        super().init_poolmanager(*args, **kwargs)


def ca_bundle() -> str:
    """The CA bundle requests verifies against: its environment variables, else certifi's."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    return bundle or requests.utils.DEFAULT_CA_BUNDLE_PATH


def session(base_url: str | None = None, *, pool_size: int = 10,
            headers: Mapping[str, str] | None = None, retries: Retry | int = 0) -> requests.Session:
    """A keep-alive session: ``pool_size`` connections per host, ``retries`` inside a call
    (0: the caller retries), TLS verified.

    With ``base_url`` (a sender talking to one host) the environment is read once here (its
    proxy, the CA bundle) instead of on every call, which costs more than the exchange itself.
    """
    s = requests.Session()
    if base_url is None:
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=pool_size, max_retries=retries)
    else:
        adapter = _Adapter(ca_bundle(), pool_maxsize=pool_size, max_retries=retries)
        s.trust_env = False
        s.proxies = requests.utils.get_environ_proxies(base_url)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    if headers:
        s.headers.update(headers)
    return s
