"""The HTTP face of a cache entry, shared by the server and the framework integrations.

Header strings follow Next.js 15 (SPEC.md): ``s-maxage=N, stale-while-revalidate=E-N``
for ISR responses, ``s-maxage=31536000`` for entries that never expire, and the
``private, no-cache, ...`` form for responses that are never cached. ``x-pyisr-cache``
says HIT / STALE / MISS; ``Cache-Status`` (RFC 9211), ``Age`` and a strong ``ETag``
come with every cached response.

An entry with stored encodings (:mod:`pyisr.compression`) has one representation per
coding: a request that accepts one (:func:`answer_coding`) gets it with
``Content-Encoding`` and that representation's own strong ETag (:func:`coding_etag`),
and every answer of such an entry, the identity one too, says ``Vary: Accept-Encoding``
so caches on the way keep the variants apart.
"""

from __future__ import annotations

from collections.abc import Mapping

from pyisr.cache.entry import ONE_YEAR, CacheEntry
from pyisr.cache.shareable import (
    COOKIE_SEPARATOR,
    PER_RESPONSE,
    WRITTEN_BY_PYISR,
    keeps_out_of_shared_caches,
)
from pyisr.cdn.keys import tag_headers
from pyisr.compression import negotiate
from pyisr.engine import CacheStatus, Served

NOSTORE = "private, no-cache, no-store, max-age=0, must-revalidate"
DEV_NOSTORE = "no-store, must-revalidate"
HTML = "text/html; charset=utf-8"
#: Internal entry headers that are stored but never sent.
PROPS_HEADER = "x-pyisr-props"

Headers = list[tuple[bytes, bytes]]


def cache_control(revalidate: int | None, expire: int | None = None) -> str:
    """``s-maxage=N, stale-while-revalidate=E-N`` (Next.js 15, 16's ``cacheLife``), or
    ``s-maxage=E`` for an entry only an invalidation or its expiry ends.

    ``expire`` is the entry's (``None``, for entries stored before it existed: one year).
    """
    if revalidate == 0:
        return NOSTORE
    if expire is None:
        expire = ONE_YEAR
    if revalidate is None:
        return f"s-maxage={expire}"
    if revalidate >= expire:
        return f"s-maxage={revalidate}"
    return f"s-maxage={revalidate}, stale-while-revalidate={expire - revalidate}"


def cache_status(status: CacheStatus, *, regeneration_failed: bool = False, stored: bool = True) -> str:
    """RFC 9211 ``Cache-Status`` for an ISR response.

    A STALE answer says why it is old: ``detail=revalidating`` while a regeneration is
    started or under way, ``detail=regeneration-failed`` while the back-off of a failed
    one runs (nothing is being done about it yet). A MISS the store refused (a full
    disk) lacks ``stored``: the next request renders again.
    """
    if status is CacheStatus.HIT:
        return "pyisr; hit"
    if status is CacheStatus.STALE:
        detail = "regeneration-failed" if regeneration_failed else "revalidating"
        return f"pyisr; hit; fwd=stale; detail={detail}"
    return "pyisr; fwd=uri-miss; stored" if stored else "pyisr; fwd=uri-miss"


def etag_matches(if_none_match: str, etag: str) -> bool:
    """``If-None-Match`` semantics: ``*``, or any listed tag equal (weak prefixes ignored)."""
    if if_none_match.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == bare for t in if_none_match.split(","))


def content_headers(headers: Mapping[str, str], *, shared: bool = True) -> Headers:
    """A render's own headers (content type, location...) as sent, minus internal ones.

    Never the headers pyisr writes itself, so a response has exactly one of each. A
    ``shared`` response (one served to everyone) never carries per-visitor headers
    either, whatever an older or foreign store holds; a private one keeps its cookies.
    """
    out: Headers = []
    has_type = False
    for name, value in headers.items():
        lower = name.lower()
        if lower == PROPS_HEADER or lower in WRITTEN_BY_PYISR or (shared and lower in PER_RESPONSE):
            continue
        has_type = has_type or lower == "content-type"
        key = lower.encode("latin-1")
        if lower == "set-cookie":
            out += [(key, cookie.encode("latin-1")) for cookie in value.split(COOKIE_SEPARATOR)]
        else:
            out.append((key, value.encode("latin-1")))
    if not has_type:
        out.append((b"content-type", HTML.encode()))
    return out


def private_cache_control(own: str | None, fallback: str = NOSTORE) -> str:
    """The one ``Cache-Control`` of a response answered to its visitor only.

    The response's own when it already keeps shared caches out (``private`` or
    ``no-store``: SPEC S-66), else ``fallback`` (:data:`NOSTORE`): a response that sets a
    cookie must never be kept by a cache on the way, whatever it said.
    """
    return own if own is not None and keeps_out_of_shared_caches(own) else fallback


def private_headers(headers: Mapping[str, str], fallback: str = NOSTORE) -> Headers:
    """The headers of a response made for one visitor: its own, and one ``Cache-Control``.

    ``headers`` have lower-case names (as entries and ``visitor_headers`` hold them).
    """
    cache_control = private_cache_control(headers.get("cache-control"), fallback)
    return [*content_headers(headers, shared=False), (b"cache-control", cache_control.encode())]


def offered_codings(entry: CacheEntry, status: CacheStatus) -> tuple[str, ...]:
    """The stored encodings an answer for ``entry`` with ``status`` may be sent in.

    None for an answer made for one visitor or never stored (PRIVATE, BYPASS): such an
    answer is always its own identity body, never bytes stored for everyone.
    """
    if not entry.encodings or status is CacheStatus.PRIVATE or status is CacheStatus.BYPASS:
        return ()
    return tuple(entry.encodings)


def answer_coding(entry: CacheEntry, status: CacheStatus, accept_encoding: str | None) -> str | None:
    """The stored encoding this answer is sent in, or ``None`` for the identity body: one
    of :func:`offered_codings` the request's ``Accept-Encoding`` accepts (pyisr.compression)."""
    if not accept_encoding or not entry.encodings:
        return None  # (the common cases first: no tuple made)
    offered = offered_codings(entry, status)
    return negotiate(accept_encoding, offered) if offered else None


def answer_body(entry: CacheEntry, coding: str | None) -> bytes:
    """The bytes of ``entry`` sent in ``coding`` (:func:`answer_coding`): stored, never made here."""
    return entry.encodings[coding] if coding is not None else entry.body


def coding_etag(etag: str, coding: str | None) -> str:
    """The strong ETag of ``coding``'s representation of a body whose ETag is ``etag``.

    Each encoding is a representation of its own, with bytes of its own, so a strong
    validator must differ from the identity's and from the other encoding's (RFC 9110,
    8.8.1): ``"<identity tag>-br"``. A client that holds the brotli bytes thus gets a 304
    only for a request answered in brotli, never one that would have sent it gzip or
    identity bytes it does not have. Derived from the identity's tag, so it changes
    exactly when the body does.
    """
    if coding is None:
        return etag
    return f'{etag[:-1]}-{coding}"' if etag.endswith('"') else f"{etag}-{coding}"


#: Said by every shared answer of an entry with stored encodings. Its own field line: a
#: page's own ``Vary`` is not stored (pyisr.cache.shareable), and if one ever were, two
#: ``Vary`` lines are one list (RFC 9110, 5.3), so this one merges with it.
VARY_ENCODING = (b"vary", b"Accept-Encoding")


def entry_headers(
    entry: CacheEntry,
    status: CacheStatus,
    *,
    regeneration_failed: bool = False,
    stored: bool = True,
    cdn_tag_headers: tuple[str, ...] = (),
    coding: str | None = None,
    build: str | None = None,
) -> Headers:
    """Every header of a response for ``entry`` served with ``status``, except ``Age`` and
    ``Content-Length``.

    ``regeneration_failed`` and ``stored`` are the engine's :class:`~pyisr.engine.Served`
    fields of the same names (see :func:`cache_status`). ``cdn_tag_headers`` names the
    headers that carry the entry's tags to a CDN (the engine's ``cdn_tag_headers``), on
    every answer a shared cache may keep, with the key of ``build``, the build that serves
    it (the engine's ``edge_build``). ``coding`` is the stored encoding the answer is
    sent in (:func:`answer_coding`), ``None`` for the identity body.
    """
    if status is CacheStatus.PRIVATE:
        return private_headers(entry.headers)
    out = content_headers(entry.headers)
    if status is CacheStatus.BYPASS:
        out.append((b"cache-control", NOSTORE.encode()))
        return out
    word = "MISS" if status is CacheStatus.MISS else status.value
    if coding is not None and coding not in entry.encodings:
        coding = None
    etag = entry.etag if coding is None else coding_etag(entry.etag, coding)
    out += [
        (b"cache-control", cache_control(entry.revalidate, entry.expire).encode()),
        (b"x-pyisr-cache", word.encode()),
        (
            b"cache-status",
            cache_status(status, regeneration_failed=regeneration_failed, stored=stored).encode(),
        ),
        (b"etag", etag.encode()),
    ]
    if entry.encodings:
        if coding is not None:
            out.append((b"content-encoding", coding.encode()))
        out.append(VARY_ENCODING)
    if cdn_tag_headers and entry.revalidate != 0:
        out += tag_headers(entry.tags, cdn_tag_headers, build)
    return out


def served_headers(
    served: Served,
    cdn_tag_headers: tuple[str, ...] = (),
    coding: str | None = None,
    build: str | None = None,
) -> Headers:
    """:func:`entry_headers` for what the engine answered (an answer with an entry)."""
    assert served.entry is not None
    return entry_headers(
        served.entry,
        served.status,
        regeneration_failed=served.regeneration_failed,
        stored=served.stored,
        cdn_tag_headers=cdn_tag_headers,
        coding=coding,
        build=build,
    )


#: Representation metadata a 304 leaves out (RFC 9110, 15.4.5): it describes a body the
#: 304 does not carry.
_NOT_IN_304 = (b"content-type", b"content-encoding", b"content-length")


def not_modified_headers(headers: Headers) -> Headers:
    """The headers of a 304 answering for a response with ``headers``."""
    return [h for h in headers if h[0] not in _NOT_IN_304]


def age_header(entry: CacheEntry, now: float) -> tuple[bytes, bytes]:
    return (b"age", str(entry.age(now)).encode())


def not_modified(entry: CacheEntry, if_none_match: str | None, coding: str | None = None) -> bool:
    """Whether a 304 answers: ``If-None-Match`` names the ETag of the representation the
    answer would send (``coding``'s: :func:`coding_etag`)."""
    return (
        if_none_match is not None
        and entry.status == 200
        and etag_matches(if_none_match, coding_etag(entry.etag, coding))
    )
