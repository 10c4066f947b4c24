"""The scheme and host a shared render sees: the canonical origin, never a visitor's Host.

A page rendered once is served to everyone, so the absolute URLs in it must not come
from whoever happened to cause the render: a request with ``Host: evil.example`` would
otherwise store links to evil.example for every later visitor. The rule, in one place
for the site server and every integration:

1. ``site_url`` (``pyisr.toml``, ``PYISR_SITE_URL``, or the integration's option) gives
   the scheme and host of every shared render and of ``revalidate()``.
2. Without it, a shared render made for a request may use that request's Host when the
   Host is an allowed host (Django's ``ALLOWED_HOSTS``, Flask's ``SERVER_NAME``, a
   ``TrustedHostMiddleware``, ``allowed_hosts=``). ``revalidate()`` uses the first
   concrete allowed host. ``"*"`` vouches for no host, so it counts as none.
3. Otherwise ``http://localhost``, with one warning that absolute URLs need ``site_url``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

logger = logging.getLogger("pyisr")

#: A Host header: a DNS name or an IP literal, and an optional port.
_HOST = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:.]+\])"
    r"(?::[0-9]{1,5})?$"
)


@dataclass(frozen=True, slots=True)
class Origin:
    """A scheme and a host (``name`` or ``name:port``), lower-cased."""

    scheme: str
    host: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def hostname(self) -> str:
        return split_host(self.host)[0]

    @property
    def port(self) -> int:
        """The port, explicit or the scheme's default."""
        port = split_host(self.host)[1]
        return port if port is not None else (443 if self.scheme == "https" else 80)


LOCALHOST = Origin("http", "localhost")


def split_host(host: str) -> tuple[str, int | None]:
    """``example.com:8000`` -> ``("example.com", 8000)``; IPv6 literals keep their brackets."""
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and (not name.startswith("[") or name.endswith("]")):
        return name, int(port)
    return host, None


def valid_host(host: str) -> bool:
    return bool(_HOST.match(host.lower()))


def parse_site_url(value: str, where: str = "site_url") -> Origin:
    """``https://example.com`` -> ``Origin("https", "example.com")``; a clear error otherwise."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or not valid_host(parts.netloc):
        raise ValueError(
            f"{where}: {value!r} is not a site URL; give the scheme and host the public "
            'reaches the site at, e.g. site_url = "https://www.example.com"'
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(
            f"{where}: {value!r} must be only a scheme and host (no path, query or user), "
            'e.g. "https://www.example.com"'
        )
    return Origin(parts.scheme, parts.netloc.lower())


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """Whether ``host`` (a Host header) is one of ``patterns``.

    ``example.com`` matches it (any port unless the pattern names one);
    ``.example.com`` matches it and its subdomains (Django); ``*.example.com`` its
    subdomains (Starlette). ``*`` matches nothing here: it vouches for no host.
    """
    host = host.lower()
    if not valid_host(host):
        return False
    name, _ = split_host(host)
    for raw in patterns:
        pattern = raw.lower().strip()
        if not pattern or pattern == "*":
            continue
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]):
                return True
        elif pattern.startswith("."):
            if name == pattern[1:] or name.endswith(pattern):
                return True
        elif pattern == host or pattern == name:
            return True
    return False


def first_concrete_host(patterns: Iterable[str]) -> str | None:
    """The first pattern that names one host (no wildcard): the default for ``revalidate()``."""
    for raw in patterns:
        pattern = raw.lower().strip()
        if pattern and not pattern.startswith(("*", ".")) and valid_host(pattern):
            return pattern
    return None


class CanonicalOrigin:
    """Decides the origin of shared renders for one site, middleware or view.

    ``site_url`` defaults to ``PYISR_SITE_URL``. ``allowed_hosts`` are asked when no
    site URL is set.
    """

    def __init__(
        self, site_url: str | None = None, allowed_hosts: Iterable[str] = (), *, where: str = "site_url"
    ) -> None:
        url = site_url if site_url is not None else os.environ.get("PYISR_SITE_URL") or None
        where = where if site_url is not None else "environment variable PYISR_SITE_URL"
        self.site: Origin | None = parse_site_url(url, where) if url else None
        self.allowed_hosts = tuple(allowed_hosts)
        self._warned = False

    @property
    def configured(self) -> bool:
        """Whether shared renders can see anything but ``http://localhost``."""
        return self.site is not None or any(p.strip() not in ("", "*") for p in self.allowed_hosts)

    def for_request(self, scheme: str, host: str | None, allowed_hosts: Iterable[str] = ()) -> Origin:
        """The origin of a shared render caused by a request to ``scheme://host``.

        ``allowed_hosts`` adds hosts known only at request time (a framework's setting).
        """
        if self.site is not None:
            return self.site
        patterns = (*self.allowed_hosts, *allowed_hosts)
        if host and patterns and host_allowed(host, patterns):
            return Origin("https" if scheme in ("https", "wss") else "http", host.lower())
        return self.default(allowed_hosts)

    def default(self, allowed_hosts: Iterable[str] = ()) -> Origin:
        """The origin with no request to go by (``revalidate()``, builds)."""
        if self.site is not None:
            return self.site
        concrete = first_concrete_host((*self.allowed_hosts, *allowed_hosts))
        if concrete is not None:
            return Origin("http", concrete)
        self.warn_once()
        return LOCALHOST

    def warn_once(self) -> None:
        """Say, once, that shared renders see ``http://localhost``."""
        if not self._warned:
            self._warned = True
            logger.warning(
                "pyisr: no site_url and no allowed hosts are set, so pages rendered for the cache "
                "see the host http://localhost; absolute URLs in cached pages need site_url "
                "(PYISR_SITE_URL=https://www.example.com)"
            )
