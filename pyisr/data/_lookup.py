"""One data-cache read, shared by ``cached`` and ``fetch``.

A data entry is an ordinary cache entry of kind DATA, so it gets the engine's
stale-while-revalidate, single-flight and keep-last-good for free. What is special
is its link to the page rendering around it: the read is checked against the page's
implicit tags (so ``revalidate_path`` refreshes the page's data too), a stale value
is refetched in the foreground while the page itself regenerates, and the entry's
tags and revalidate flow up into the page.

A read decodes an entry's bytes once: the value is kept beside the entry in the
memory tier, and identical calls in one render (or one build) share one result
(:mod:`pyisr.data.memo`).

The store may hold bytes this process did not write (anyone who can write to a
shared Redis or the cache directory can put them there). An entry that does not
decode is treated as missing: it is logged once, replaced by a freshly computed
value, and never executed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyisr.cache.entry import CacheEntry, EntryKind
from pyisr.cache.tags import key_tag
from pyisr.context import current_render
from pyisr.data.memo import Decoded, keep, kept, scope_engine
from pyisr.data.serializer import UnreadableEntry
from pyisr.engine import CacheStatus, Engine, RenderFn, RenderPolicy, RevalidationError
from pyisr.lifetimes import Lifetime
from pyisr.runtime import get_engine, run_sync

logger = logging.getLogger("pyisr.data")

#: Part of every data key: entries written in another format by older versions are never read.
DATA_KEY_VERSION = "v2"


def data_key(*parts: Any) -> str:
    """A stable key for the data cache: ``data:`` + sha256 of the parts as JSON."""
    raw = json.dumps([DATA_KEY_VERSION, *parts], separators=(",", ":"), default=repr, sort_keys=True)
    return "data:" + hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class DataRequest:
    """What the caller's thread knows about the render it is part of."""

    soft_tags: tuple[str, ...]
    stale_blocks: bool
    #: The engine rendering the page around the read (``None``: the process default).
    engine: Engine | None = None

    @classmethod
    def from_context(cls) -> DataRequest:
        """The render's engine, else the build's (static params), else the process default."""
        ctx = current_render()
        if ctx is None:
            return cls((), False, scope_engine())
        return cls(ctx.soft_tags, ctx.is_revalidating, ctx.engine)


def data_policy(key: str, lifetime: Lifetime, tags: tuple[str, ...], request: DataRequest) -> RenderPolicy:
    """The policy of a data entry: the same for a normal read and for replacing a bad entry."""
    return RenderPolicy(
        kind=EntryKind.DATA,
        revalidate=lifetime.revalidate,
        expire=lifetime.expire,
        tags=(*tags, key_tag(key)),
        soft_tags=request.soft_tags,
        stale_blocks=request.stale_blocks,
    )


#: Keys already warned about; bounded so a flood of bad entries cannot grow it for ever.
_warned: set[str] = set()
_WARNED_MAX = 10_000


def _warn_unreadable(key: str, what: str, exc: UnreadableEntry) -> None:
    """Once per key: a store that keeps serving bad bytes must not flood the log."""
    if key in _warned:
        logger.debug("%s: stored value under %s is unreadable again (%s)", what, key, exc)
        return
    if len(_warned) >= _WARNED_MAX:
        _warned.clear()
    _warned.add(key)
    logger.warning(
        "%s: ignoring the stored value under %s (%s) and computing it afresh; it is never loaded. "
        "If this repeats, check who can write to the cache and that every instance uses the same "
        "PYISR_SIGNING_KEY.",
        what,
        key,
        exc,
    )


async def read_through(
    key: str,
    compute: RenderFn,
    lifetime: Lifetime,
    tags: tuple[str, ...],
    request: DataRequest,
    decode: Callable[[bytes], Decoded],
    what: str,
) -> tuple[Decoded, CacheEntry, CacheStatus]:
    """The decoded value of ``key``, its entry and how it was served.

    The engine decides which entry is served; the value decoded from that very entry
    object is reused while the memory tier holds it (:func:`pyisr.data.memo.kept`).
    ``decode`` raises :class:`UnreadableEntry` for bytes it does not trust; the entry
    is then dropped and computed again on the engine's on-demand path, which renders
    whatever else is cached and is not fenced by the dropped entry's time stamp.
    """
    policy = data_policy(key, lifetime, tags, request)
    engine = request.engine if request.engine is not None else get_engine()
    served = await engine.get(key, compute, policy)
    entry = served.entry
    assert entry is not None
    decoded = kept(engine.handler, entry, what)
    if decoded is not None:
        return decoded, entry, served.status
    try:
        decoded = decode(entry.body)
    except UnreadableEntry as exc:
        _warn_unreadable(key, what, exc)
    else:
        keep(engine.handler, entry, what, decoded)
        return decoded, entry, served.status
    try:
        await engine.handler.delete(key)
    except Exception as exc:  # noqa: BLE001 - the fresh entry replaces it anyway (or is fenced)
        logger.debug("%s: could not delete the unreadable entry %s: %s", what, key, exc)
    try:
        entry = await engine.revalidate_now(key, compute, policy)
    except RevalidationError as exc:
        failure: BaseException = exc.__cause__ or exc
    else:
        decoded = decode(entry.body)
        keep(engine.handler, entry, what, decoded)
        return decoded, entry, CacheStatus.MISS
    # The caller gets what computing raised, as for any missing entry (raised outside the
    # ``except`` so the engine's wrapper does not show up as its context).
    raise failure


def record_in_render(entry: CacheEntry, lifetime: Lifetime) -> None:
    """Let the page being rendered inherit this data's tags, revalidate and the expire the
    call asked for (not the site's default its entry got: that would shorten a page with
    a longer ``expire`` of its own)."""
    ctx = current_render()
    if ctx is not None:
        ctx.record(entry.tags, entry.revalidate, lifetime.expire)


def read_through_sync(
    key: str,
    compute: RenderFn,
    lifetime: Lifetime,
    tags: tuple[str, ...],
    request: DataRequest,
    decode: Callable[[bytes], Decoded],
    what: str,
) -> tuple[Decoded, CacheEntry, CacheStatus]:
    """:func:`read_through` for sync callers (``request`` read on their thread)."""
    return run_sync(read_through(key, compute, lifetime, tags, request, decode, what))
