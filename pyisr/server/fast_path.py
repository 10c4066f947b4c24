"""The server's fast path: ready responses of hot cached pages, by request path.

A HIT is the most common request and the one the site is judged by, so a page served
once keeps its whole response built (status, header lists, body, the 304 and the STALE
variants) in an index keyed by the raw request path. A request that finds its path here
is answered with one dictionary lookup and one send: no route matching, no engine call,
no header building. The index is an optimisation in front of the engine, never a second
source of truth: an answer is given only while it is exactly what the engine would say
(see :meth:`FastPath.answer`), on the engine's clock.

An entry with stored encodings (:mod:`pyisr.compression`) gets ready answers per
encoding too, with their own ``Content-Encoding``, ``Content-Length`` and ETag: a
request picks one by its ``Accept-Encoding``, negotiated once per distinct header value
and entry and then found with one dictionary lookup of the header's bytes, and is
answered with bytes stored long before. Nothing here compresses.

It has its own memory budget (it can hold entries the memory tier has evicted), and is
cleared whole when it is full rather than tracking recency on every hit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.types import Scope, Send

from pyisr.cache.entry import CacheEntry
from pyisr.compression import negotiate
from pyisr.engine import CacheStatus, Engine, window_end
from pyisr.http import (
    Headers,
    answer_body,
    cache_status,
    coding_etag,
    entry_headers,
    etag_matches,
    not_modified_headers,
)

#: Bounds of the index: bodies (and encodings) plus ~1 KB of ready headers each, outside
#: the tier's budget.
HOT_LIMIT = 10_000
HOT_BYTES = 16 * 1024 * 1024


class HotAnswer:
    """One ready response of a hot entry, with its headers for the current ``Age``.

    The header list with ``Age`` is rebuilt once per second of age, not per request.
    RSGI's ``str`` form is made on its first use only, so a server that never uses it
    never holds it. (The lists handed out are never changed afterwards, only replaced.)
    """

    __slots__ = (
        "status",
        "headers",
        "body",
        "served",
        "counted",
        "_text",
        "_asgi",
        "_asgi_age",
        "_rsgi",
        "_rsgi_age",
    )

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        #: Times answered, and how many of those the engine's events were told of
        #: (:meth:`FastPath.collect`): one addition per request, nothing more.
        self.served = 0
        self.counted = 0
        self._text: list[tuple[str, str]] | None = None
        self._asgi: Headers = []
        self._asgi_age = -1
        self._rsgi: list[tuple[str, str]] = []
        self._rsgi_age = -1

    def asgi_headers(self, age: int) -> Headers:
        if age != self._asgi_age:
            self._asgi = [*self.headers, (b"age", str(age).encode())]
            self._asgi_age = age
        return self._asgi

    def rsgi_headers(self, age: int) -> list[tuple[str, str]]:
        if age != self._rsgi_age:
            if self._text is None:
                self._text = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.headers]
            self._rsgi = [*self._text, ("age", str(age))]
            self._rsgi_age = age
        return self._rsgi


#: The four ready answers of one representation: index ``2 * stale + not_modified``.
Answers = tuple[HotAnswer, HotAnswer, HotAnswer, HotAnswer]
#: One representation: its ETag and its ready answers.
Variant = tuple[str, Answers]
#: Distinct ``Accept-Encoding`` values whose choice one hot entry remembers, and the
#: longest remembered: browsers send a handful of short ones (``gzip, deflate, br, zstd``);
#: anything else is negotiated each time (still no compressing), so a client sending
#: odd values costs the index at most ~1 kB per page.
ACCEPT_MEMO = 8
ACCEPT_MEMO_LENGTH = 64


@dataclass(slots=True)
class HotResponse:
    """A cached page with its responses built once.

    ``answers`` holds the 200 (or cached status) and the 304, as HIT and as STALE:
    index ``2 * stale + not_modified``; ``encoded`` the same for each stored encoding
    the server serves, with its ETag; ``codings`` names them, preferred first
    (``encoded`` is ``None`` when there are none: ``Accept-Encoding`` is not even read);
    ``by_accept`` the variant chosen for each ``Accept-Encoding`` value seen (its bytes
    from ASGI, its text from RSGI).
    """

    entry: CacheEntry
    #: The route's pattern (the metrics' label).
    route: str
    #: When the entry's window ends (:func:`~pyisr.engine.window_end`), never the end of a
    #: failed regeneration's back-off: past it the answer is STALE, whatever the back-off.
    stale_at: float | None
    #: When the entry may no longer be served at all (its ``expire``): the full way then
    #: renders it, blocking.
    expires_at: float | None
    tags_version: int
    etag: str
    answers: Answers
    codings: tuple[str, ...] = ()
    encoded: dict[str, Variant] | None = None
    by_accept: dict[bytes | str, Variant] | None = None

    def all_answers(self) -> list[Answers]:
        """The ready answers of every representation, identity first."""
        return [self.answers, *(answers for _etag, answers in (self.encoded or {}).values())]

    def variant(self, accept_encoding: bytes | str) -> Variant:
        """The representation a request with this ``Accept-Encoding`` gets (the entry has
        stored encodings): negotiated once per value, then remembered."""
        assert self.encoded is not None and self.by_accept is not None
        text = accept_encoding.decode("latin-1") if isinstance(accept_encoding, bytes) else accept_encoding
        coding = negotiate(text, self.codings)
        chosen = self.encoded[coding] if coding is not None else (self.etag, self.answers)
        if len(self.by_accept) < ACCEPT_MEMO and len(accept_encoding) <= ACCEPT_MEMO_LENGTH:
            self.by_accept[accept_encoding] = chosen
        return chosen


def _stale_from(entry: CacheEntry) -> float | None:
    """When a hot answer stops being a plain HIT: the window's end, or for an entry only an
    invalidation ends, its expiry (checked only once past this, so a HIT pays nothing)."""
    end = window_end(entry)
    return end if end is not None else entry.expires_at()


def hot_size(entry: CacheEntry) -> int:
    """What one page costs the index's budget: its body, its encodings and ~1 KB of ready
    headers for each."""
    return len(entry.body) + 1024 + sum(len(data) + 1024 for data in entry.encodings.values())


class FastPath:
    """The index of hot pages of one server, by raw path (ASGI) and decoded path (RSGI)."""

    def __init__(self, engine: Engine, *, enabled: bool) -> None:
        self.engine = engine
        self.enabled = enabled
        #: raw request path -> ready responses of a cached page.
        self.by_raw_path: dict[bytes, HotResponse] = {}
        #: The same, by decoded path: what RSGI gives (see pyisr/server/rsgi.py).
        self.by_path: dict[str, HotResponse] = {}
        self.bytes = 0
        #: The draft cookie's name when draft mode is on (``pyisr.draft``): a request that
        #: carries it goes the full way, where its signature is checked.
        self.draft_cookie: str | None = None
        self._draft_bytes: bytes | None = None
        #: Bound once: it is asked on every answer.
        self._tags_version = engine.handler.tags_version
        self._clock = engine.clock
        #: Counts of answers no longer in the index, for the next :meth:`collect`.
        self._uncollected: list[tuple[str, str, str, int]] = []
        engine.events.add_source(self.collect)

    def use_draft_cookie(self, name: str) -> None:
        """Send requests that carry cookie ``name`` the full way (draft mode is on)."""
        self.draft_cookie, self._draft_bytes = name, name.encode()

    def may_be_draft(self, cookie_header: str | None) -> bool:
        """Whether a request with this (decoded, RSGI) ``Cookie`` header must go the full way,
        where its draft cookie's signature is checked; ASGI headers: :meth:`serve_asgi`."""
        return self.draft_cookie is not None and self.draft_cookie in (cookie_header or "")

    def answer(
        self,
        hot: HotResponse,
        method: str,
        if_none_match: str | None,
        accept_encoding: bytes | str | None = None,
    ) -> tuple[HotAnswer, bytes, int] | None:
        """The ready answer to a request for a hot entry, its body and its Age, or ``None``.

        The answer is in the stored encoding ``accept_encoding`` picks, if the entry has
        any (identity otherwise), and a 304 only for that encoding's ETag.

        Valid while the handler's tag state is the one the entry was checked against, and
        while the entry is within its window or this process is regenerating it (the
        engine would say STALE, revalidating, and start nothing). Anything else (past the
        window with no regeneration under way, which includes the back-off of a failed
        one; a tag revalidated anywhere; a method other than GET/HEAD) goes the full way,
        which re-validates and says why the page is old.
        """
        now = self._clock()
        stale = hot.stale_at is not None and now >= hot.stale_at
        if stale and (
            not self.engine.regenerating(hot.entry.key)
            or (hot.expires_at is not None and now >= hot.expires_at)
        ):
            return None
        if self._tags_version() != hot.tags_version:
            return None
        if method != "GET" and method != "HEAD":
            return None
        if hot.by_accept is not None and accept_encoding is not None:
            chosen = hot.by_accept.get(accept_encoding)
            etag, answers = chosen if chosen is not None else hot.variant(accept_encoding)
        else:
            answers, etag = hot.answers, hot.etag
        not_modified = if_none_match is not None and etag_matches(if_none_match, etag)
        answer = answers[2 * stale + (not_modified and hot.entry.status == 200)]
        answer.served += 1
        age = max(0, int(now - hot.entry.created_at))
        if self.engine.log.enabled:
            self.engine.log.decision(hot.entry.key, "STALE" if stale else "HIT", f"age={age}s")
        return answer, b"" if method == "HEAD" else answer.body, age

    async def serve_asgi(self, hot: HotResponse, scope: Scope, send: Send) -> bool:
        """Answer from a hot entry; ``False`` when the request must go the full way."""
        if_none_match = accept_encoding = None
        draft = self._draft_bytes
        for name, value in scope["headers"]:
            if name == b"if-none-match":
                if_none_match = value.decode("latin-1")
            elif name == b"accept-encoding":
                accept_encoding = value
            elif draft is not None and name == b"cookie" and draft in value:
                return False  # maybe in draft mode: the full way checks the cookie
        found = self.answer(hot, scope["method"], if_none_match, accept_encoding)
        if found is None:
            return False
        answer, body, age = found
        headers = answer.asgi_headers(age)
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return True

    def collect(self) -> list[tuple[str, str, str, int]]:
        """Answers given since the last call: ``(key, route, status, n)`` (pyisr.events.Source)."""
        found, self._uncollected = self._uncollected, []
        for hot in self.by_raw_path.values():
            _uncounted(hot, found)
        return found

    def forget_all(self) -> None:
        """Empty the index (its counts are kept for the next :meth:`collect`)."""
        for hot in self.by_raw_path.values():
            _uncounted(hot, self._uncollected)
        self.by_raw_path.clear()
        self.by_path.clear()
        self.bytes = 0

    def remember(self, scope: Scope, entry: CacheEntry, route: str) -> None:
        """Keep the responses of ``entry`` (of route ``route``) for its path, in every
        stored encoding the server serves (the engine's ``compress``)."""
        raw = scope.get("raw_path")
        version = self._tags_version()
        if not self.enabled or raw is None or version is None:
            return
        size = hot_size(entry)
        replaced = self.by_raw_path.get(raw)
        if replaced is not None:
            self.bytes -= hot_size(replaced.entry)
            _uncounted(replaced, self._uncollected)
        if len(self.by_raw_path) >= HOT_LIMIT or self.bytes + size > HOT_BYTES:
            # Start over rather than track recency on every hit: pages that are really
            # hot come back at their next request.
            self.forget_all()
        self.bytes += size
        codings = tuple(entry.encodings) if self.engine.compress else ()
        encoded = {c: (coding_etag(entry.etag, c), self._answers(entry, c)) for c in codings}
        hot = HotResponse(
            entry,
            route,
            _stale_from(entry),
            entry.expires_at(),
            version,
            entry.etag,
            self._answers(entry, None),
            codings,
            encoded or None,
            {} if encoded else None,
        )
        self.by_raw_path[raw] = hot
        if b"%2f" not in raw.lower():
            # RSGI hands over the decoded path; an encoded slash would make it ambiguous.
            self.by_path[scope["path"]] = hot

    def _answers(self, entry: CacheEntry, coding: str | None) -> Answers:
        """The four ready answers of ``entry`` in ``coding`` (``None``: identity), with the
        headers :func:`pyisr.http.entry_headers` gives every other answer."""
        headers = entry_headers(
            entry,
            CacheStatus.HIT,
            cdn_tag_headers=self.engine.cdn_tag_headers,
            coding=coding,
            build=self.engine.edge_build,
        )
        common = [h for h in headers if h[0] != b"x-pyisr-cache" and h[0] != b"cache-status"]
        body = answer_body(entry, coding)
        answers = []
        for status in (CacheStatus.HIT, CacheStatus.STALE):
            full = [
                *common,
                (b"content-length", str(len(body)).encode()),
                (b"x-pyisr-cache", status.value.encode()),
                (b"cache-status", cache_status(status).encode()),
            ]
            answers.append(HotAnswer(entry.status, full, body))
            answers.append(HotAnswer(304, not_modified_headers(full), b""))
        ready: Any = tuple(answers)  # four answers, by construction
        return ready


def _uncounted(hot: HotResponse, into: list[tuple[str, str, str, int]]) -> None:
    """Add ``hot``'s answers not yet collected to ``into``, and mark them collected."""
    for answers in hot.all_answers():
        for index, answer in enumerate(answers):
            n = answer.served - answer.counted
            if n:
                answer.counted = answer.served
                into.append((hot.entry.key, hot.route, "STALE" if index >= 2 else "HIT", n))
