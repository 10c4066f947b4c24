"""The HTTP face of a cache entry, shared by the server and the framework integrations.

Header strings follow Next.js 15 (SPEC.md): ``s-maxage=N, stale-while-revalidate=E-N``
for ISR responses, ``s-maxage=31536000`` for entries that never expire, and the
``private, no-cache, ...`` form for responses that are never cached. ``x-pyisr-cache``
says HIT / STALE / MISS; ``Cache-Status`` (RFC 9211), ``Age`` and a strong ``ETag``
come with every cached response.
"""

from __future__ import annotations

from pyisr.cache.entry import ONE_YEAR, CacheEntry
from pyisr.engine import CacheStatus

NOSTORE = "private, no-cache, no-store, max-age=0, must-revalidate"
DEV_NOSTORE = "no-store, must-revalidate"
HTML = "text/html; charset=utf-8"
#: Internal entry headers that are stored but never sent.
PROPS_HEADER = "x-pyisr-props"

Headers = list[tuple[bytes, bytes]]


def cache_control(revalidate: int | None, expire: int = ONE_YEAR) -> str:
    """``s-maxage=N, stale-while-revalidate=E-N`` (Next.js 15), or the long form for never."""
    if revalidate == 0:
        return NOSTORE
    if revalidate is None:
        return f"s-maxage={ONE_YEAR}"
    if revalidate >= expire:
        return f"s-maxage={revalidate}"
    return f"s-maxage={revalidate}, stale-while-revalidate={expire - revalidate}"


def cache_status(status: CacheStatus) -> str:
    """RFC 9211 ``Cache-Status`` for an ISR response."""
    if status is CacheStatus.HIT:
        return "pyisr; hit"
    if status is CacheStatus.STALE:
        return "pyisr; hit; fwd=stale; detail=revalidating"
    return "pyisr; fwd=uri-miss; stored"


def etag_matches(if_none_match: str, etag: str) -> bool:
    """``If-None-Match`` semantics: ``*``, or any listed tag equal (weak prefixes ignored)."""
    if if_none_match.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == bare for t in if_none_match.split(","))


def content_headers(entry: CacheEntry) -> Headers:
    """The entry's own headers (content type, location...), minus internal ones."""
    out: Headers = []
    has_type = False
    for name, value in entry.headers.items():
        lower = name.lower()
        if lower == PROPS_HEADER or lower == "content-length":
            continue
        has_type = has_type or lower == "content-type"
        out.append((lower.encode("latin-1"), value.encode("latin-1")))
    if not has_type:
        out.append((b"content-type", HTML.encode()))
    return out


def entry_headers(entry: CacheEntry, status: CacheStatus) -> Headers:
    """Every header of a response for ``entry`` served with ``status``, except ``Age``."""
    out = content_headers(entry)
    if status is CacheStatus.BYPASS:
        out.append((b"cache-control", NOSTORE.encode()))
        return out
    word = "MISS" if status is CacheStatus.MISS else status.value
    out += [
        (b"cache-control", cache_control(entry.revalidate).encode()),
        (b"x-pyisr-cache", word.encode()),
        (b"cache-status", cache_status(status).encode()),
        (b"etag", entry.etag.encode()),
    ]
    return out


def age_header(entry: CacheEntry, now: float) -> tuple[bytes, bytes]:
    return (b"age", str(entry.age(now)).encode())


def not_modified(entry: CacheEntry, if_none_match: str | None) -> bool:
    return if_none_match is not None and entry.status == 200 and etag_matches(if_none_match, entry.etag)
