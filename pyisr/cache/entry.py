"""The cache entry and the one freshness rule every handler and the engine share.

An entry is *stale* when ``now >= created_at + revalidate`` and *invalidated* when
any of its tags was revalidated at or after ``created_at`` (DESIGN.md, "The cache
entry"). ``created_at`` is the wall-clock time the render that produced the entry
*started*, so a render that read its data before an invalidation can never look
newer than that invalidation.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from pyisr.cache.tags import stale_names

#: Seconds a ``revalidate = False`` entry advertises to CDNs (Next.js' ``CACHE_ONE_YEAR``).
ONE_YEAR = 31_536_000

Revalidate = int | None
"""Normalised revalidate: seconds (> 0), ``None`` for never, or ``0`` for never cached."""


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: "No revalidate given": a render that keeps its route's, a page with no data calls yet,
#: a ``fetch`` with neither ``cache`` nor ``revalidate``. The one sentinel for all three
#: (``None`` already means "never").
UNSET: Any = _Unset()

#: Bytes of a CPython ``str`` object beyond its characters (ASCII), and of a ``bytes`` one.
_STR_OVERHEAD = 49
_BYTES_OVERHEAD = 33


class _NoEncodings(Mapping[str, bytes]):
    """The encodings of an entry that has none: one shared empty mapping, not a dict per
    entry (most entries have none), that nothing can change and that pickles as itself."""

    __slots__ = ()

    def __getitem__(self, coding: str) -> bytes:
        raise KeyError(coding)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __reduce__(self) -> str:
        return "NO_ENCODINGS"

    def __repr__(self) -> str:
        return "{}"


NO_ENCODINGS: Mapping[str, bytes] = _NoEncodings()


class EntryKind(StrEnum):
    PAGE = "page"
    ROUTE = "route"
    DATA = "data"


def validate_revalidate(value: object, *, where: str = "revalidate") -> Revalidate:
    """Turn a user's ``revalidate`` into seconds, ``None`` (never) or ``0`` (not cached).

    Accepts non-negative integers (and integral floats), ``None`` and ``False``.
    Everything else raises ``ValueError`` naming the value, because a typo here
    silently changes how long stale content is served.
    """
    if value is None or value is False:
        return None
    if value is True:
        # Next.js treats ``revalidate: true`` as 1 second; we follow it.
        return 1
    if isinstance(value, int):
        if value < 0:
            raise ValueError(
                f"Invalid revalidate value {value!r} for {where}: must be a non-negative "
                "number of seconds or False (e.g. revalidate = 60)"
            )
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value) or value < 0 or not value.is_integer():
            raise ValueError(
                f"Invalid revalidate value {value!r} for {where}: must be a whole, "
                "non-negative number of seconds or False (e.g. revalidate = 60)"
            )
        return int(value)
    raise ValueError(
        f"Invalid revalidate value {value!r} for {where}: must be a non-negative number "
        f"of seconds or False, not {type(value).__name__} (e.g. revalidate = 60)"
    )


def min_revalidate(a: Revalidate, b: Revalidate) -> Revalidate:
    """The stricter of two revalidate values (``None`` = never is the loosest)."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def make_etag(body: bytes) -> str:
    """A strong ETag from the body, so the same bytes always give the same tag."""
    digest = hashlib.blake2b(body, digest_size=12).hexdigest()
    return f'"{digest}-{len(body):x}"'


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """Why the last regeneration of an entry failed, kept so tools can explain a stale page."""

    at: float
    exc_type: str
    message: str
    count: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "type": self.exc_type, "message": self.message, "count": self.count}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FailureRecord:
        return cls(
            at=float(data["at"]),
            exc_type=str(data["type"]),
            message=str(data["message"]),
            count=int(data.get("count", 1)),
        )


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached response (a page, a route handler's output) or one data-cache value.

    ``retry_at`` is the back-off after a failed regeneration: no new attempt starts
    before it (Next.js re-sets the old entry for ``clamp(N, 3, 30)`` seconds), though
    the entry is answered STALE from the end of its window on (``pyisr.render.window_end``).
    """

    key: str
    body: bytes
    created_at: float
    revalidate: Revalidate
    kind: EntryKind = EntryKind.PAGE
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    etag: str = ""
    retry_at: float | None = None
    last_failure: FailureRecord | None = None
    #: Seconds after ``created_at`` from which the entry is never served (treated as
    #: missing: the next request renders, blocking); ``None``: it never expires.
    expire: int | None = None
    #: The body's content codings made when the entry was (``"br"``, ``"gzip"``: see
    #: :mod:`pyisr.compression`), preferred first; served as they are, so a HIT never
    #: compresses. Stored with the body by every handler, counted in :meth:`size`.
    encodings: Mapping[str, bytes] = field(default_factory=lambda: NO_ENCODINGS)

    def __post_init__(self) -> None:
        if not self.etag:
            object.__setattr__(self, "etag", make_etag(self.body))

    # -- the freshness rule -------------------------------------------------------------

    def stale_at(self) -> float | None:
        """When the next regeneration is due (the window's end, or the back-off's if later),
        or ``None`` if only an invalidation can end the entry."""
        if self.revalidate is None:
            return None
        due = self.created_at + self.revalidate
        if self.retry_at is not None:
            due = max(due, self.retry_at)
        return due

    def is_stale(self, now: float) -> bool:
        due = self.stale_at()
        return due is not None and now >= due

    def expires_at(self) -> float | None:
        """When the entry stops being servable at all, or ``None`` if never."""
        return None if self.expire is None else self.created_at + self.expire

    def is_expired(self, now: float) -> bool:
        return self.expire is not None and now >= self.created_at + self.expire

    def is_invalidated(self, tag_times: Mapping[str, float], also: Iterable[str] = ()) -> bool:
        """True when any tag was revalidated at or after the render that made this entry.

        ``also`` are tags checked like the entry's own without being stored with it (a
        page's tags, for the data it read).
        """
        for tags in (self.tags, also):
            for tag in tags:
                revalidated_at = tag_times.get(tag)
                if revalidated_at is not None and revalidated_at >= self.created_at:
                    return True
        return False

    def is_marked_stale(self, tag_times: Mapping[str, float], also: Iterable[str] = ()) -> bool:
        """True when any tag was marked stale (``revalidate_tag(tag, stale=True)``) at or
        after the render that made this entry: it is served STALE while it regenerates."""
        if not tag_times:
            return False
        for tags in (self.tags, also):
            for name in stale_names(tuple(tags)):
                marked_at = tag_times.get(name)
                if marked_at is not None and marked_at >= self.created_at:
                    return True
        return False

    def age(self, now: float) -> int:
        return max(0, int(now - self.created_at))

    # -- derived copies -----------------------------------------------------------------

    def with_failure(self, exc: BaseException, now: float, backoff: float) -> CacheEntry:
        """The same content, marked with a failed regeneration and its back-off."""
        count = self.last_failure.count + 1 if self.last_failure else 1
        message = str(exc) or exc.__class__.__name__
        failure = FailureRecord(at=now, exc_type=type(exc).__name__, message=message, count=count)
        return replace(self, retry_at=now + backoff, last_failure=failure)

    def size(self) -> int:
        """Approximate bytes held, for the LRU's budget.

        Python objects cost more than their characters: each string's own header, the
        headers dict and the tags tuple are counted too, so a memory tier set to 50 MB
        holds about 50 MB (measured with tracemalloc on typical pages: within ~5%).
        Every stored encoding counts like the body.
        """
        texts = len(self.key) + len(self.etag) + sum(len(t) for t in self.tags)
        texts += sum(len(k) + len(v) for k, v in self.headers.items())
        strings = 2 + len(self.tags) + 2 * len(self.headers)
        objects = 300 + _STR_OVERHEAD * strings + 8 * len(self.tags) + 100 * len(self.headers)
        if self.encodings:
            texts += sum(len(k) + len(v) for k, v in self.encodings.items())
            # Each: its name (a string), its bytes object's header, a dict slot.
            objects += 100 + (_STR_OVERHEAD + _BYTES_OVERHEAD + 100) * len(self.encodings)
        return len(self.body) + texts + objects

    # -- serialisation (metadata only: bodies and encodings are stored as raw bytes) ----

    def meta_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "key": self.key,
            "kind": self.kind.value,
            "status": self.status,
            "headers": dict(self.headers),
            "created_at": self.created_at,
            "revalidate": self.revalidate,
            "tags": list(self.tags),
            "etag": self.etag,
            "size": len(self.body),
        }
        if self.expire is not None:
            data["expire"] = self.expire
        if self.retry_at is not None:
            data["retry_at"] = self.retry_at
        if self.last_failure is not None:
            data["last_failure"] = self.last_failure.to_json()
        if self.encodings:
            # Each coding's length, in the entry's order: how a reader checks (and the file
            # system cache splits) the bytes stored beside the body.
            data["encodings"] = {coding: len(encoded) for coding, encoded in self.encodings.items()}
        return data

    def meta_bytes(self) -> bytes:
        return json.dumps(self.meta_json(), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_meta(
        cls, meta: Mapping[str, Any], body: bytes, encodings: Mapping[str, bytes] | None = None
    ) -> CacheEntry:
        """Rebuild an entry; raises ``ValueError`` if the metadata does not match the body
        or the encodings (those it lists, of the lengths it lists: none for metadata
        written before encodings existed)."""
        if "size" in meta and int(meta["size"]) != len(body):
            raise ValueError(
                f"cache entry {meta.get('key')!r} is torn: metadata says {meta['size']} bytes, "
                f"body has {len(body)}"
            )
        listed = encoded_sizes(meta)
        stored = dict(encodings or {})
        if {coding: len(data) for coding, data in stored.items()} != listed:
            raise ValueError(f"cache entry {meta.get('key')!r} is torn: its encodings do not match")
        failure = meta.get("last_failure")
        return cls(
            key=str(meta["key"]),
            body=body,
            created_at=float(meta["created_at"]),
            revalidate=meta.get("revalidate"),
            kind=EntryKind(meta.get("kind", "page")),
            status=int(meta.get("status", 200)),
            headers=dict(meta.get("headers") or {}),
            tags=tuple(meta.get("tags") or ()),
            etag=str(meta.get("etag") or ""),
            retry_at=meta.get("retry_at"),
            last_failure=FailureRecord.from_json(failure) if failure else None,
            expire=meta.get("expire"),
            encodings={coding: stored[coding] for coding in listed} if listed else NO_ENCODINGS,
        )


@dataclass(frozen=True, slots=True)
class EntrySummary:
    """An entry as a listing shows it: its metadata, and the bytes it stores.

    Why not the entry: ``pyisr cache list`` and the dashboard look at every entry, and
    reading every body (and its encodings) would read the whole cache into memory to
    draw a table: gigabytes for a big site. ``entry`` is the entry with an empty body
    and no encodings (its ETag, headers, tags, times and failure as stored).
    """

    entry: CacheEntry
    #: The body and every stored encoding, in bytes.
    stored_bytes: int

    @classmethod
    def of(cls, entry: CacheEntry) -> EntrySummary:
        """The summary of an entry read whole."""
        stored = len(entry.body) + sum(len(encoded) for encoded in entry.encodings.values())
        return cls(replace(entry, body=b"", encodings=NO_ENCODINGS), stored)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> EntrySummary:
        """The summary from stored metadata alone; ``ValueError`` (or ``KeyError``,
        ``TypeError``) when it is malformed."""
        stored = int(meta["size"]) + sum(encoded_sizes(meta).values())
        bare = {name: value for name, value in meta.items() if name not in ("size", "encodings")}
        if not bare.get("etag"):
            raise ValueError(f"cache entry {meta.get('key')!r} has no ETag in its metadata")
        return cls(CacheEntry.from_meta(bare, b""), stored)


def encoded_sizes(meta: Mapping[str, Any]) -> dict[str, int]:
    """The encodings stored metadata lists, with their lengths, in order (``{}`` for none,
    as in metadata written before encodings existed); ``ValueError`` if malformed."""
    listed = meta.get("encodings") or {}
    if not isinstance(listed, Mapping) or not all(
        isinstance(c, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 0
        for c, n in listed.items()
    ):
        raise ValueError(f"cache entry {meta.get('key')!r} has malformed encodings: {listed!r}")
    return dict(listed)
