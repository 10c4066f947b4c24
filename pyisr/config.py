"""Site configuration: ``pyisr.toml``, then ``PYISR_*`` environment variables, then flags.

Each later source overrides the earlier one. A bad value is reported with where it
came from (the file and key, or the variable), what was wrong and how to fix it.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pyisr.cache.entry import ONE_YEAR
from pyisr.cache.urls import parse_size, redact_url
from pyisr.cdn.keys import CACHE_TAG, SURROGATE_KEY, parse_tag_headers
from pyisr.cdn.urls import parse_cdn_urls
from pyisr.lifetimes import Lifetime, parse_profiles, validate_expire
from pyisr.origin import parse_site_url, valid_host
from pyisr.rewarm import DEFAULT_RATE

CONFIG_FILE = "pyisr.toml"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    pass


@dataclass
class Config:
    #: Cache handler URL: file://PATH (default: SITE/.pyisr/cache), memory://, redis://...
    cache: str | None = None
    #: Bytes of the memory tier in front of a persistent handler; 0 turns it off.
    memory_tier: int = 50 * 1024 * 1024
    #: Secret for POST /_pyisr/revalidate and the inspection endpoint; unset turns them off.
    revalidate_secret: str | None = None
    #: Bearer secret of GET /_pyisr/metrics (pyisr.metrics); with metrics_allow unset too, it is off.
    metrics_secret: str | None = None
    #: Addresses and networks that may read /_pyisr/metrics without the secret.
    metrics_allow: tuple[IPNetwork, ...] = ()
    #: ``"text"`` (lines for people) or ``"json"`` (one object per line; see pyisr.log).
    log_format: str = "text"
    debug_cache: bool = False
    log_fetches: bool = False
    log_fetches_full_url: bool = False
    #: Seconds a render may take before it counts as failed.
    render_timeout: float = 30.0
    #: Renders running at once in one process.
    render_concurrency: int = 16
    #: False: /blog/1/ redirects to /blog/1 (Next.js' default); True: the reverse.
    trailing_slash: bool = False
    #: Scheme and host of every shared render (``https://www.example.com``); see pyisr.origin.
    site_url: str | None = None
    #: Hosts whose requests may lend their Host to a shared render when site_url is unset.
    allowed_hosts: tuple[str, ...] = ()
    #: Seconds after which an entry that names no ``expire`` is never served (pyisr.lifetimes).
    expire: int = ONE_YEAR
    #: Named lifetimes (``[profiles.hourly] revalidate = 3600, expire = 86400``).
    profiles: dict[str, Lifetime] = field(default_factory=dict)
    #: Bytes the cache may hold in its store; ``None``: the handler's default (1 GiB for
    #: the file-system cache; Redis is bounded by its own ``maxmemory``).
    cache_max_bytes: int | None = None
    #: Secret that signs in to the dashboard at ``/_pyisr/`` (pyisr.dashboard); unset turns it off.
    dashboard_secret: str | None = None
    #: CDNs and reverse proxies purged on every invalidation (pyisr.cdn): URLs, several allowed.
    cdn: tuple[str, ...] = ()
    #: Headers that carry a cacheable response's tags to the edge (pyisr.cdn.keys); () for none.
    cdn_tag_headers: tuple[str, ...] = (SURROGATE_KEY, CACHE_TAG)
    #: Pages per second this instance re-renders, hottest first, after a wide invalidation
    #: (pyisr.rewarm); 0 turns it off.
    rewarm_rate: float = DEFAULT_RATE
    #: Store gzip and brotli encodings of text responses beside them (pyisr.compression).
    compress: bool = True


def as_networks(value: Any) -> tuple[IPNetwork, ...]:
    """IP addresses and CIDR networks: a TOML list, or a comma-separated string
    (``PYISR_METRICS_ALLOW=127.0.0.1,10.0.0.0/8``)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError("expected a list of IP addresses or networks")
    networks = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as exc:
            if "has host bits set" in str(exc):
                network = ipaddress.ip_network(item, strict=False)
                raise ValueError(f"{item!r} has host bits set: write {network}, or one address") from None
            raise ValueError(f"{item!r} is not an IP address or a network such as 10.0.0.0/8") from None
    return tuple(networks)


def _as_log_format(value: Any) -> str:
    text = _as_str(value).strip().lower()
    if text not in ("text", "json"):
        raise ValueError('expected "text" or "json"')
    return text


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _as_positive_float(value: Any) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("expected a number of seconds > 0")
    return number


def _as_positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number >= 1")
    number = int(value)
    if number < 1 or float(value) != number:
        raise ValueError("expected a whole number >= 1")
    return number


def _as_size(value: Any) -> int:
    size = parse_size(value if isinstance(value, int) else str(value))
    if size < 0:
        raise ValueError("expected a size such as 50MB, or 0")
    return size


def _as_site_url(value: Any) -> str:
    parse_site_url(_as_str(value), "site_url")
    return str(value).strip()


def _as_hosts(value: Any) -> tuple[str, ...]:
    """A TOML list of hosts, or a comma-separated string (``PYISR_ALLOWED_HOSTS``)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(h, str) for h in items):
        raise ValueError("expected a list of host names")
    hosts = tuple(h.strip().lower() for h in items if h.strip())
    for host in hosts:
        if host != "*" and not valid_host(host.lstrip("*").lstrip(".")):
            raise ValueError(f"{host!r} is not a host name")
    return hosts


def _as_expire(value: Any) -> int:
    seconds = validate_expire(int(value) if isinstance(value, str) else value, where="expire")
    if seconds is None:
        raise ValueError("expected a whole number of seconds > 0")
    return seconds


def _as_profiles(value: Any) -> dict[str, Lifetime]:
    if isinstance(value, str):  # PYISR_PROFILES: the same tables, as JSON
        import json

        value = json.loads(value)
    return parse_profiles(value)


def _as_max_bytes(value: Any) -> int:
    size = _as_size(value)
    if size < 1024 * 1024:
        raise ValueError("expected a size of at least 1MB, such as 1GB")
    return size


#: The shortest dashboard secret accepted: it is all that stands between the web and the cache.
MIN_DASHBOARD_SECRET = 16


def as_dashboard_secret(value: Any) -> str:
    """A dashboard secret, refused when it is short enough to guess."""
    secret = _as_str(value)
    if len(secret) < MIN_DASHBOARD_SECRET:
        raise ValueError(
            f"{len(secret)} characters, under the {MIN_DASHBOARD_SECRET} required; make one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return secret


def _as_rate(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number of pages per second >= 0")
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("expected a number of pages per second >= 0 (0 turns re-warming off)")
    return number


def _as_str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


PARSERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "cache": (_as_str, 'cache = "file://.pyisr/cache" or "redis://localhost:6379/0"'),
    "memory_tier": (_as_size, 'memory_tier = "50MB"'),
    "revalidate_secret": (_as_str, 'revalidate_secret = "a-long-random-string"'),
    "metrics_secret": (_as_str, 'metrics_secret = "a-long-random-string"'),
    "metrics_allow": (as_networks, 'metrics_allow = ["127.0.0.1", "10.0.0.0/8"]'),
    "log_format": (_as_log_format, 'log_format = "json"'),
    "debug_cache": (_as_bool, "debug_cache = true"),
    "log_fetches": (_as_bool, "log_fetches = true"),
    "log_fetches_full_url": (_as_bool, "log_fetches_full_url = true"),
    "render_timeout": (_as_positive_float, "render_timeout = 30"),
    "render_concurrency": (_as_positive_int, "render_concurrency = 16"),
    "trailing_slash": (_as_bool, "trailing_slash = false"),
    "site_url": (_as_site_url, 'site_url = "https://www.example.com"'),
    "allowed_hosts": (_as_hosts, 'allowed_hosts = ["www.example.com", ".example.com"]'),
    "expire": (_as_expire, "expire = 31536000"),
    "profiles": (_as_profiles, "[profiles.hourly] revalidate = 3600, expire = 86400"),
    "cache_max_bytes": (_as_max_bytes, 'cache_max_bytes = "1GB"'),
    "dashboard_secret": (as_dashboard_secret, 'dashboard_secret = "a-random-string-of-32-characters"'),
    "cdn": (parse_cdn_urls, 'cdn = ["varnish://127.0.0.1:6081"]'),
    "cdn_tag_headers": (parse_tag_headers, 'cdn_tag_headers = ["Surrogate-Key"] (or "none")'),
    "rewarm_rate": (_as_rate, "rewarm_rate = 20 (pages per second; 0 turns it off)"),
    "compress": (_as_bool, "compress = true"),
}


#: The settings of how pages are served that every way in takes: a site's ``pyisr.toml``,
#: Django's ``PYISR``, and ``pyisr.configure()`` (with their ``PYISR_*`` variables).
SERVING_KEYS = ("compress", "cdn_tag_headers", "rewarm_rate")


def _apply(config: Config, values: Mapping[str, Any], source: Callable[[str], str]) -> None:
    for key, raw in values.items():
        if raw is None:
            continue
        if key not in PARSERS:
            known = ", ".join(PARSERS)
            raise ConfigError(f"{source(key)}: unknown setting {key!r}; known settings: {known}")
        parse, example = PARSERS[key]
        try:
            setattr(config, key, parse(raw))
        except (ValueError, TypeError) as exc:
            shown = redact_url(raw) if isinstance(raw, str) else raw  # a cache URL may hold a password
            if key.endswith("_secret"):
                shown = "<hidden>"  # an error message must not print a secret
            message = redact_url(str(exc))
            raise ConfigError(
                f"{source(key)}: invalid value {shown!r} ({message}); for example: {example}"
            ) from None


def load_config(
    site_dir: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read ``SITE/pyisr.toml``, then ``PYISR_<KEY>`` variables, then ``overrides`` (flags)."""
    config = Config()
    env = os.environ if environ is None else environ
    if site_dir is not None:
        path = Path(site_dir) / CONFIG_FILE
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: not valid TOML: {exc}") from None
            section = data.get("pyisr", data)
            _apply(config, section, lambda key: f"{path}, key {key!r}")
    env_values = {f.name: env.get(f"PYISR_{f.name.upper()}") for f in fields(Config)}
    env_values["cache"] = env_values["cache"] or None
    _apply(
        config,
        {k: v for k, v in env_values.items() if v not in (None, "")},
        lambda key: f"environment variable PYISR_{key.upper()}",
    )
    if overrides:
        _apply(
            config,
            {k: v for k, v in overrides.items() if v is not None},
            lambda key: f"option --{key.replace('_', '-')}",
        )
    return config
