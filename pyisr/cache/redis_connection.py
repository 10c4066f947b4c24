"""How ``RedisCache`` reaches Redis: its cache URL, and the redis-py clients it makes.

A cache URL is a redis-py URL (``redis://``, ``rediss://``, ``unix://``), or the same
with ``+cluster`` for redis-py's cluster client, whose query may also carry pyisr's
own options (:data:`URL_OPTIONS`); they are taken out before redis-py sees the URL.

Clients give up after one timeout: a slow Redis must switch the handler to degraded
mode (see :mod:`pyisr.cache.redis`) rather than make every request wait through
retries. Passwords never reach a log line or the health endpoint (:func:`pyisr.cache.urls.redact_url`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pyisr.cache.urls import redact_url

#: Query parameters of a cache URL that configure pyisr, not redis-py.
URL_OPTIONS = ("prefix", "build_id", "socket_timeout", "retry_interval", "resync_interval", "entry_ttl")


def split_url(url: str) -> tuple[str, bool, dict[str, str]]:
    """``(redis-py URL, is_cluster, pyisr options)`` from a cache URL.

    A malformed URL fails here, when the handler is made, not on the first request.
    """
    parsed = urlparse(url)
    scheme = parsed.scheme
    cluster = scheme.endswith("+cluster")
    if cluster:
        scheme = scheme[: -len("+cluster")]
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"Unsupported Redis URL {redact_url(url)!r}: use redis://HOST:PORT/DB, rediss://... "
            "or redis+cluster://HOST:PORT"
        )
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(parsed.query, keep_blank_values=True):
        if name in URL_OPTIONS:
            ours[name] = value
        else:
            rest.append((name, value))
    clean = urlunparse(parsed._replace(scheme=scheme, query=urlencode(rest)))
    parse_url(clean)
    return clean, cluster, ours


def check_name(value: str, what: str, forbidden: str = "{}") -> str:
    """Reject names that would break the hash-tag layout (braces) or be ambiguous."""
    if not value or any(c in value for c in forbidden) or any(c.isspace() for c in value):
        shown = " or ".join(repr(c) for c in forbidden)
        raise ValueError(
            f"Redis cache {what} {value!r} must be non-empty, without spaces, {shown} (e.g. {what}=mysite)"
        )
    return value


def seconds(explicit: float | None, from_url: str | None, default: float) -> float:
    """An interval option: the keyword argument, else the URL's query value, else ``default``."""
    if explicit is not None:
        return float(explicit)
    if from_url is not None and from_url != "":
        try:
            return float(from_url)
        except ValueError:
            raise ValueError(
                f"Redis cache URL option must be a number of seconds, not {from_url!r}"
            ) from None
    return default


def describe_client(client: Any) -> str:
    """A URL-like name for a client object the user passed."""
    try:
        kwargs = client.connection_pool.connection_kwargs
        return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
    except AttributeError:
        return f"<{type(client).__name__}>"


def new_client(url: str, *, cluster: bool, timeout: float, options: Mapping[str, Any], **extra: Any) -> Any:
    """A client that gives up after one timeout: degraded mode, not retries, handles outages.

    ``timeout`` bounds connecting and each reply; ``options`` are the user's
    ``client_options``; ``extra`` (redis-py keyword arguments) wins over both.
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        **options,
        **extra,
    }
    if cluster:
        # One retry lets the cluster client refresh its slot map after a failover.
        kwargs.setdefault("retry", Retry(NoBackoff(), 1))
        return RedisCluster.from_url(url, **kwargs)
    # One immediate retry on a broken connection (a pooled socket Redis closed, e.g.
    # after a restart); none on a timeout, which would only double the wait.
    kwargs.setdefault("retry", Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)))
    return Redis.from_url(url, **kwargs)


def subscriber_client(url: str, *, timeout: float, options: Mapping[str, Any], name: str) -> Any:
    """A dedicated client for pub/sub, which has no read timeout: it waits for messages.

    Named, so operators (and tests) can find the subscriber in CLIENT LIST. No retries:
    a broken subscription comes back through ``MirrorSync.subscribe_forever``, which
    waits ``retry_interval`` between attempts and resyncs the mirror after each one.
    """
    return new_client(
        url,
        cluster=False,
        timeout=timeout,
        options=options,
        socket_timeout=None,
        client_name=name,
        retry=Retry(NoBackoff(), 0),
    )


def node_url(url: str, host: str, port: int) -> str:
    """``url`` pointed at one node of a cluster (same credentials, no database)."""
    parsed = urlparse(url)
    auth = parsed.netloc.rpartition("@")[0]
    netloc = (auth + "@" if auth else "") + f"{host}:{port}"
    return urlunparse(parsed._replace(netloc=netloc, path=""))


async def aclose(obj: Any) -> None:
    """``aclose()`` where redis-py has it (>= 5.0.1), else the older ``close()``."""
    closer = getattr(obj, "aclose", None) or obj.close
    result = closer()
    if asyncio.iscoroutine(result):
        await result
