"""CDN adapters named by URL (``cdn = ["varnish://127.0.0.1:6081"]``, ``PYISR_CDN``).

Two steps, because they fail for different reasons at different times:

* :func:`check_cdn_url` reads a URL alone (the settings file, ``PYISR_CDN``): a scheme
  pyisr knows, the host or id it needs, only the options its scheme takes. Every
  command that loads the settings runs it;
* :func:`purger_from_url` also reads the environment for the token or secret, and makes
  the adapter: what a process that purges runs at start-up (the server, a script's
  ``configure``, ``pyisr cache purge``). A missing token says which variable to set.

Options travel in the query: ``varnish://H:P?secret_env=NAME``, ``fastly://ID?token_env=
NAME&soft=0|1&api=URL``, ``cloudflare://ID?token_env=NAME&api=URL``, and a webhook's
``token_env=NAME`` (its other query parameters are part of the webhook's URL). A token
is never written in the URL: URLs end up in logs and health reports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from pyisr.cdn.base import EdgePurger

#: Schemes and what each names, for error messages.
SCHEMES = {
    "varnish": "varnish://HOST:PORT (a Varnish running deploy/varnish/pyisr.vcl)",
    "fastly": "fastly://SERVICE_ID (token in FASTLY_API_TOKEN)",
    "cloudflare": "cloudflare://ZONE_ID (token in CLOUDFLARE_API_TOKEN)",
    "http": "http://HOST/PATH (a webhook that receives the keys as JSON)",
    "https": "https://HOST/PATH (a webhook that receives the keys as JSON)",
}

#: The variable each scheme reads its token (Varnish: its purge secret) from by default.
TOKEN_ENV = {
    "varnish": "PYISR_VARNISH_PURGE_SECRET",
    "fastly": "FASTLY_API_TOKEN",
    "cloudflare": "CLOUDFLARE_API_TOKEN",
    "http": "PYISR_CDN_WEBHOOK_TOKEN",
    "https": "PYISR_CDN_WEBHOOK_TOKEN",
}
#: The option naming another variable for it.
_ENV_OPTION = {"varnish": "secret_env"}
#: Options each scheme takes (a webhook's other query parameters are its own).
_OPTIONS = {
    "varnish": {"secret_env"},
    "fastly": {"token_env", "soft", "api"},
    "cloudflare": {"token_env", "api"},
    "http": {"token_env"},
    "https": {"token_env"},
}
_ID = re.compile(r"[A-Za-z0-9]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class CdnUrl:
    """A CDN URL read: its scheme, what it names (host and port, service or zone id, the
    webhook's own URL) and pyisr's options."""

    scheme: str
    #: Safe to show: no query, no credentials.
    name: str
    target: str
    port: int | None = None
    options: dict[str, str] = field(default_factory=dict)

    @property
    def token_env(self) -> str:
        """The variable the token (Varnish: the purge secret) is read from."""
        return self.options.get(_ENV_OPTION.get(self.scheme, "token_env"), TOKEN_ENV[self.scheme])


def parse_cdn_url(url: str) -> CdnUrl:
    """Read one CDN URL; ``ValueError`` saying what is wrong and what would do."""
    text = url.strip()
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        known = "; ".join(SCHEMES.values())
        raise ValueError(f"{url!r} is not a CDN URL pyisr knows: use {known}")
    if not parts.netloc:
        raise ValueError(f"{url!r} names no host or id: {SCHEMES[scheme]}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in _OPTIONS[scheme]}
    if scheme in ("http", "https"):
        return _webhook(text, parts, query, ours)
    unknown = sorted({k for k, _ in query} - _OPTIONS[scheme])
    if unknown:
        takes = ", ".join(sorted(_OPTIONS[scheme]))
        raise ValueError(f"{url!r}: unknown option {unknown[0]!r}; {scheme}:// takes {takes}")
    if parts.path not in ("", "/"):
        raise ValueError(f"{url!r} has a path; write {SCHEMES[scheme]}")
    _check_env_option(url, ours)
    if scheme == "varnish":
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None or parts.username or parts.password:
            raise ValueError(f"{url!r}: give the host and port of Varnish, as varnish://127.0.0.1:6081")
        host = parts.hostname
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return CdnUrl(scheme, f"varnish://{netloc}", host, port, ours)
    ident = parts.netloc
    if not _ID.fullmatch(ident):
        what = "service id" if scheme == "fastly" else "zone id"
        raise ValueError(f"{url!r}: the {what} is letters and digits only ({SCHEMES[scheme]})")
    if "soft" in ours and ours["soft"] not in ("0", "1"):
        raise ValueError(f"{url!r}: soft is 0 (every purge hard) or 1 (stale marks purge softly)")
    if "api" in ours:
        _check_api(url, ours["api"])
    return CdnUrl(scheme, f"{scheme}://{ident}", ident, None, ours)


def _webhook(text: str, parts: SplitResult, query: list[tuple[str, str]], ours: dict[str, str]) -> CdnUrl:
    """A webhook's URL: pyisr's options taken out of its query, its credentials out of its name."""
    if not parts.hostname:
        raise ValueError(f"{text!r} names no host: {SCHEMES[parts.scheme]}")
    _check_env_option(text, ours)
    own = urlencode([(k, v) for k, v in query if k not in ours])
    target = urlunsplit((parts.scheme, parts.netloc, parts.path or "/", own, ""))
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    name = urlunsplit((parts.scheme, netloc, parts.path or "/", "", ""))
    return CdnUrl(parts.scheme, name, target, parts.port, ours)


def _check_env_option(url: str, options: Mapping[str, str]) -> None:
    for key in ("token_env", "secret_env"):
        if key in options and not _ENV_NAME.fullmatch(options[key]):
            raise ValueError(
                f"{url!r}: {key} names an environment variable (such as {key}=MY_TOKEN), "
                "never the token itself"
            )


def _check_api(url: str, api: str) -> None:
    """``api=`` (tests, a proxy of one's own): HTTPS, or plain HTTP to this machine only."""
    parts = urlsplit(api)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname in _LOOPBACK:
        return
    raise ValueError(
        f"{url!r}: api must be an https:// URL (or http://127.0.0.1:PORT for a local test server)"
    )


def check_cdn_url(url: str) -> str:
    """``url`` if it names a CDN pyisr can purge, else ``ValueError`` saying what would."""
    parse_cdn_url(url)
    return url.strip()


def parse_cdn_urls(value: object) -> tuple[str, ...]:
    """A TOML list of CDN URLs, or a comma-separated string (``PYISR_CDN``)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError('expected a list of CDN URLs, such as ["varnish://127.0.0.1:6081"]')
    return tuple(check_cdn_url(i) for i in items if i.strip())


def purger_from_url(url: str, environ: Mapping[str, str] | None = None) -> EdgePurger:
    """The adapter ``url`` names, its token read from ``environ`` (the process's by default).

    Raises ``ValueError`` for a bad URL or a missing token, naming the variable to set.
    """
    env = os.environ if environ is None else environ
    spec = parse_cdn_url(url)
    secret = env.get(spec.token_env) or None
    if spec.scheme == "varnish":
        from pyisr.cdn.varnish import VarnishPurger

        assert spec.port is not None
        return VarnishPurger(spec.target, spec.port, secret=secret)
    if spec.scheme in ("fastly", "cloudflare") and secret is None:
        scope = "the purge_select scope" if spec.scheme == "fastly" else "the zone's Cache Purge permission"
        raise ValueError(
            f"{spec.name}: no API token: set {spec.token_env} to a token with {scope} "
            f"(or add ?token_env=NAME to the URL to read it from another variable)"
        )
    if spec.scheme == "fastly":
        from pyisr.cdn.fastly import DEFAULT_API as FASTLY_API
        from pyisr.cdn.fastly import FastlyPurger

        assert secret is not None
        api = spec.options.get("api", FASTLY_API)
        return FastlyPurger(spec.target, secret, soft=spec.options.get("soft", "1") == "1", api=api)
    if spec.scheme == "cloudflare":
        from pyisr.cdn.cloudflare import DEFAULT_API as CLOUDFLARE_API
        from pyisr.cdn.cloudflare import CloudflarePurger

        assert secret is not None
        return CloudflarePurger(spec.target, secret, api=spec.options.get("api", CLOUDFLARE_API))
    from pyisr.cdn.webhook import WebhookPurger

    return WebhookPurger(spec.target, spec.name, token=secret)
