"""The engine's vocabulary: what a render returns, how it may be cached, how it was served.

A render callable returns a :class:`Rendered`; the caller describes the key's caching
with a :class:`RenderPolicy`; :meth:`pyisr.engine.Engine.get` answers with
:class:`Served` (an entry and a :class:`CacheStatus`). The errors of rendering and of
on-demand revalidation live here too, each revalidation error with the HTTP status that
says why. None of this knows HTTP or storage; ``pyisr.engine`` re-exports all of it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pyisr import lifetimes
from pyisr.cache.entry import UNSET, CacheEntry, EntryKind, Revalidate, min_revalidate
from pyisr.cache.shareable import storable_headers, unshareable_reason, visitor_headers
from pyisr.cache.tags import merge_tags, validate_tags
from pyisr.context import RenderContext


class CacheStatus(StrEnum):
    HIT = "HIT"
    STALE = "STALE"
    MISS = "MISS"
    REVALIDATED = "REVALIDATED"
    #: The path is unknown and the route does not render unknown paths (404).
    NOT_ALLOWED = "NOT_ALLOWED"
    #: ``fallback: True``: the caller serves its fallback shell; the page renders meanwhile.
    FALLBACK = "FALLBACK"
    #: ``revalidate = 0``: rendered for this request, never stored.
    BYPASS = "BYPASS"
    #: The render belongs to one visitor (a cookie, ``private``...): never stored or shared.
    #: With an entry, it is the caller's own render; without, the caller renders for its
    #: visitor itself (the key is known to be private, or another caller's render was).
    PRIVATE = "PRIVATE"


class OnMissing(StrEnum):
    RENDER = "render"
    NOT_FOUND = "not_found"
    FALLBACK = "fallback"


@dataclass
class Rendered:
    """What a render callable returns.

    ``revalidate`` left UNSET means "the route's default"; a value given here (a Pages
    page's ``get_static_props`` result: seconds, ``False`` or a profile name) replaces
    that default for this entry, as ``expire`` (seconds) replaces the route's expire.
    """

    body: bytes | str
    status: int = 200
    #: A mapping, or name/value pairs when a name repeats (``Set-Cookie``).
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = field(default_factory=dict)
    revalidate: Any = UNSET
    expire: Any = None
    tags: Iterable[str] = ()
    #: Why this render may not be shared, found by the framework that made it (it read
    #: the session, used a CSRF token...); header reasons are found by the engine.
    private: str | None = None


@dataclass(frozen=True)
class RenderPolicy:
    kind: EntryKind = EntryKind.PAGE
    #: The route's revalidate: seconds, ``None`` (never), or ``0`` (never cached).
    revalidate: Revalidate = None
    #: The route's expire in seconds; ``None``: the site's default (pyisr.lifetimes).
    expire: int | None = None
    #: Tags stored with the entry (explicit and implicit).
    tags: tuple[str, ...] = ()
    #: Tags checked against but not stored (a page's tags, for data read while it renders).
    soft_tags: tuple[str, ...] = ()
    on_missing: OnMissing = OnMissing.RENDER
    #: Treat a stale entry like a missing one (data read during a regeneration).
    stale_blocks: bool = False
    #: The route the key belongs to (``/blog/[id]``), named in warnings; the key if unset.
    route: str | None = None


DEFAULT_POLICY = RenderPolicy()

RenderFn = Callable[[], Awaitable[Rendered] | Rendered]


@dataclass(frozen=True, slots=True)
class Served:
    entry: CacheEntry | None
    status: CacheStatus
    #: STALE because the regeneration of this entry failed and its back-off runs: none is
    #: under way or started until the back-off ends (``Cache-Status: ...;
    #: detail=regeneration-failed``), unlike a STALE that starts or joins one.
    regeneration_failed: bool = False
    #: ``False`` for a render the store refused (disk full, read-only, a store that is
    #: down): answered, but the next request renders again, so nobody may keep it as cached.
    stored: bool = True


def window_end(entry: CacheEntry) -> float | None:
    """When ``entry``'s revalidate window ends (``None``: only an invalidation ends it).

    From then on the entry is answered STALE. Unlike :meth:`CacheEntry.stale_at` it
    ignores the back-off of a failed regeneration: the back-off only delays the next
    attempt, it never makes an old page fresh again.
    """
    return None if entry.revalidate is None else entry.created_at + entry.revalidate


class RenderFailed(RuntimeError):
    """A render returned a 5xx result: treated exactly like an exception."""


class RenderTimeout(TimeoutError):
    pass


class RevalidationError(RuntimeError):
    """``revalidate(path)`` could not regenerate the page; the old one is still served.

    ``status`` is the HTTP status that says why (the revalidate endpoint answers it).
    """

    status = 500


class NoPageError(RevalidationError):
    """``revalidate(path)`` of a path no page answers (or with no site registered)."""

    status = 404


class NotShareable(RevalidationError):
    """The page rendered for ``revalidate(path)`` or a build belongs to its visitor: not stored."""

    status = 409


class RenderSlotsExhausted(RevalidationError):
    """Every render slot is held by a render past its timeout whose thread still runs.

    Python cannot stop a thread, so such a slot frees itself only when its render really
    ends, which may be never. A page that must be rendered now fails at once rather than
    queue behind those threads; cached pages need no slot and are still served. The
    server answers 503 with ``Retry-After: retry_after`` (seconds: the render timeout,
    the time after which a render running now has ended or is stuck too).
    """

    status = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


#: Finds what to render for a path: ``(key, render, policy)``, or ``None`` for no page there.
Resolver = Callable[[str], Awaitable[tuple[str, RenderFn, RenderPolicy] | None]]


def private_reason(rendered: Rendered, policy: RenderPolicy) -> str | None:
    """Why this render may not be stored (DESIGN.md, "What may be stored"), or ``None``."""
    if policy.kind is EntryKind.DATA:
        return None  # values of cached()/fetch(): no headers, never a response
    return rendered.private or unshareable_reason(rendered.headers)


def make_entry(
    key: str,
    rendered: Rendered,
    policy: RenderPolicy,
    ctx: RenderContext,
    started_at: float,
    *,
    private: bool = False,
) -> CacheEntry:
    """The entry a render makes: its own lifetime or the route's, lowered by the data it
    read, its tags with the data's and the route's, and only the headers it may keep.

    A 5xx is a failed render (:class:`RenderFailed`), never an entry.
    """
    if rendered.status >= 500:
        raise RenderFailed(f"render of {key} returned status {rendered.status}")
    revalidate, expire = _lifetime(key, rendered, policy, ctx)
    body = rendered.body.encode() if isinstance(rendered.body, str) else bytes(rendered.body)
    tags = merge_tags(validate_tags(list(rendered.tags), where=key), ctx.tags, policy.tags)
    return CacheEntry(
        key=key,
        body=body,
        created_at=started_at,
        revalidate=revalidate,
        expire=expire,
        kind=policy.kind,
        status=rendered.status,
        headers=visitor_headers(rendered.headers) if private else storable_headers(rendered.headers),
        tags=tags,
    )


def _lifetime(
    key: str, rendered: Rendered, policy: RenderPolicy, ctx: RenderContext
) -> tuple[Revalidate, int | None]:
    """The entry's revalidate and expire: the render's own (a ``get_static_props`` result)
    or the route's, each lowered by the data read during the render (the shortest wins,
    as with Next.js' ``cacheLife``); expire never below revalidate, and the site's
    default expire when nothing named one."""
    if rendered.revalidate is UNSET and rendered.expire is None:
        revalidate, expire = policy.revalidate, policy.expire
    else:
        given = policy.revalidate if rendered.revalidate is UNSET else rendered.revalidate
        own = lifetimes.parse(given, rendered.expire, where=key)
        revalidate, expire = own.revalidate, own.expire if own.expire is not None else policy.expire
    if ctx.had_data_calls and revalidate != 0:
        revalidate = min_revalidate(revalidate, ctx.revalidate)
        expire = lifetimes.min_expire(expire, ctx.expire)
    expire = lifetimes.entry_expire(revalidate, expire)
    if expire is not None and revalidate is not None and revalidate > expire:
        revalidate = expire  # data that expires sooner than the page revalidates shortens both
    return revalidate, expire
