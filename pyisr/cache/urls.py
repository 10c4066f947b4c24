"""Choosing a cache handler by URL (``file://``, ``memory://``, ``redis://``) or object."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from pyisr.cache.handler import CacheHandler, as_handler
from pyisr.cache.memory import DEFAULT_MEMORY_BYTES, MemoryCache
from pyisr.cache.tier import MemoryTier

_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/?#\s'\"]*):(?P<password>[^@/?#\s'\"]*)@"
)


def redact_url(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    What logs, errors and health may show. Textual, so it works on URLs too malformed to
    parse (a bad port, an unknown scheme) and on messages quoting one: those are exactly
    the ones an error repeats.
    """
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def parse_size(value: str | int) -> int:
    """``"50MB"`` / ``"512k"`` / ``1048576`` -> bytes."""
    if isinstance(value, int):
        return value
    text = value.strip().lower().replace(" ", "")
    units = {"gb": 1024**3, "g": 1024**3, "mb": 1024**2, "m": 1024**2, "kb": 1024, "k": 1024, "b": 1}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def handler_from_url(
    url: str, *, base_dir: str | os.PathLike[str] = ".", max_bytes: int | None = None
) -> CacheHandler:
    """Build the handler a URL names; relative ``file:`` paths are relative to ``base_dir``.

    Examples: ``file://.pyisr/cache`` (default), ``file:///var/cache/site?max_bytes=20GB``,
    ``memory://?max_bytes=100MB``, ``redis://localhost:6379/0?prefix=mysite``.
    ``max_bytes`` caps a file-system cache (``cache_max_bytes``; a ``max_bytes`` in the
    URL wins, being the more specific); ``None``: its 1 GiB default. Redis is bounded
    by its own ``maxmemory`` and the TTL of every key.
    """
    parsed = urlparse(url)
    scheme = parsed.scheme or "file"
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    if scheme == "memory":
        return MemoryCache(parse_size(query.get("max_bytes", DEFAULT_MEMORY_BYTES)))
    if scheme == "file":
        raw = (parsed.netloc + parsed.path) if parsed.scheme else url
        path = Path(raw)
        if not path.is_absolute():
            path = Path(base_dir) / path
        from pyisr.cache.filesystem import FileSystemCache

        if parsed.scheme and "max_bytes" in query:  # a bare path is all path, "?" included
            max_bytes = parse_size(query["max_bytes"])
        return FileSystemCache(path, max_bytes=max_bytes)
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        try:
            from pyisr.cache.redis import RedisCache
        except ImportError as exc:
            raise ValueError(
                f"cache URL {redact_url(url)!r} needs the Redis handler: pip install 'pyisr[redis]'"
            ) from exc
        return RedisCache.from_url(url)
    raise ValueError(
        f"Unknown cache URL scheme {scheme!r} in {redact_url(url)!r}: use file://PATH, memory:// "
        "or redis://HOST:PORT/DB"
    )


def build_handler(
    cache: object | None,
    *,
    base_dir: str | os.PathLike[str] = ".",
    memory_tier_bytes: int | None = DEFAULT_MEMORY_BYTES,
    max_bytes: int | None = None,
) -> CacheHandler:
    """A handler from a URL or object, with a memory tier in front unless it is memory already.

    ``max_bytes`` caps a file-system cache named by URL (see :func:`handler_from_url`).
    """
    if cache is None:
        cache = "file://.pyisr/cache"
    if isinstance(cache, str):
        handler = handler_from_url(cache, base_dir=base_dir, max_bytes=max_bytes)
    else:
        handler = as_handler(cache)
    if isinstance(handler, MemoryCache | MemoryTier) or not memory_tier_bytes:
        return handler
    return MemoryTier(handler, memory_tier_bytes)
