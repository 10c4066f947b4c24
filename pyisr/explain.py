"""Why an entry is in its state: the one place that names a state and says it in sentences.

``pyisr cache list`` / ``inspect`` / ``explain`` and the dashboard all show entries
through this module, so a page is never "stale" in one and "fresh" in another:

* :func:`entry_state` names the state of an entry from the engine's own rules
  (``CacheEntry.is_expired``, ``is_invalidated``, ``is_marked_stale``, the retry
  back-off and ``regeneration.past_window``); it restates none of them;
* :func:`list_rows` reads every entry of a store into :class:`EntryRow` (one
  ``tag_times`` call for all of them, hits from the store's activity record),
  filtered and sorted;
* :func:`explain` answers "why" for one key in sentences: since when, which tag or
  path did it and who asked (matched from the store's ring of recent invalidations,
  saying so when the ring no longer holds it), the last failed regeneration and the
  next try, whether a regeneration is running, what is served meanwhile.

Times are shown in local time (``HH:MM:SS``, with the date when not today) and
durations in human units (``2 min ago``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pyisr.cache.activity import MAX_INVALIDATIONS, Invalidation
from pyisr.cache.entry import CacheEntry, EntrySummary, FailureRecord, Revalidate
from pyisr.cache.handler import CacheHandler
from pyisr.cache.tags import LAYOUT_TAG, PAGE_TAG, PATH_TAG, STALE_TAG, with_stale_tags
from pyisr.regeneration import past_window
from pyisr.render import window_end


class EntryState(StrEnum):
    FRESH = "fresh"  # answered HIT
    STALE = "stale"  # answered STALE while one background render refreshes it
    FAILING = "failing"  # answered STALE; its last regeneration failed
    EXPIRED = "expired"  # never answered again: the next request waits for a render
    INVALIDATED = "invalidated"  # a tag of it was revalidated: the next request waits


#: Sort orders of :func:`list_rows` (the most interesting first: most hits, oldest, biggest).
SORTS = ("hits", "age", "size", "key")


@dataclass(frozen=True)
class EntryRow:
    """One entry as a table shows it (``pyisr cache list``, the dashboard)."""

    key: str
    kind: str  # "page" | "route" (a route handler's output) | "data"
    route: str | None  # the route pattern of a page (``/blog/[id]``), None for data
    state: EntryState
    status: int
    created_at: float
    age: float
    revalidate: Revalidate
    expire: int | None
    size: int  # bytes stored: the body and each encoding of it
    tags: tuple[str, ...]  # the tags a user gave (implicit ones left out)
    hits: int
    last_failure: FailureRecord | None
    retry_at: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "route": self.route,
            "state": self.state.value,
            "status": self.status,
            "created_at": self.created_at,
            "age": self.age,
            "revalidate": self.revalidate,
            "expire": self.expire,
            "size": self.size,
            "tags": list(self.tags),
            "hits": self.hits,
            "last_failure": self.last_failure.to_json() if self.last_failure else None,
            "retry_at": self.retry_at,
        }


@dataclass(frozen=True)
class Explanation:
    """The answer of :func:`explain`: the state, the sentences, and what they were made of."""

    key: str
    state: EntryState | None  # None: nothing is cached for the key
    sentences: list[str]
    row: EntryRow | None = None
    invalidations: list[Invalidation] = field(default_factory=list)  # those that touched it, newest first
    regenerating: bool | None = None  # None: the store cannot tell

    @property
    def text(self) -> str:
        return " ".join(self.sentences)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "cached": self.row is not None,
            "state": self.state.value if self.state else None,
            "text": self.text,
            "sentences": list(self.sentences),
            "entry": self.row.to_json() if self.row else None,
            "invalidations": [inv.to_json() for inv in self.invalidations],
            "regenerating": self.regenerating,
        }


# -- the state --------------------------------------------------------------------------


def entry_state(entry: CacheEntry, tag_times: Mapping[str, float], now: float) -> EntryState:
    """The state ``entry`` is in at ``now``, by the engine's rules.

    ``tag_times`` holds the times of the entry's tags and their stale marks (as
    ``handler.tag_times(with_stale_tags(entry.tags))`` gives them). The order is the
    engine's: an expired or invalidated entry is never answered, whatever else is true
    of it; a stale one whose last regeneration failed is failing.
    """
    if entry.is_expired(now):
        return EntryState.EXPIRED
    if entry.is_invalidated(tag_times):
        return EntryState.INVALIDATED
    if entry.last_failure is not None or entry.retry_at is not None:
        return EntryState.FAILING
    if entry.is_marked_stale(tag_times) or past_window(entry, now):
        return EntryState.STALE
    return EntryState.FRESH


def route_of(entry: CacheEntry) -> str | None:
    """The route pattern of a page, from its implicit page tag (``None`` for data)."""
    for tag in entry.tags:
        if tag.startswith(PAGE_TAG):
            return tag[len(PAGE_TAG) :]
    return None


def user_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    """The tags a user gave (``posts``), without pyisr's implicit path, page and layout tags."""
    return tuple(t for t in tags if not t.startswith((PATH_TAG, PAGE_TAG, LAYOUT_TAG, STALE_TAG)))


def _row(summary: EntrySummary, tag_times: Mapping[str, float], hits: int, now: float) -> EntryRow:
    entry = summary.entry
    return EntryRow(
        key=entry.key,
        kind=entry.kind.value,
        route=route_of(entry),
        state=entry_state(entry, tag_times, now),
        status=entry.status,
        created_at=entry.created_at,
        age=max(0.0, now - entry.created_at),
        revalidate=entry.revalidate,
        expire=entry.expire,
        size=summary.stored_bytes,
        tags=user_tags(entry.tags),
        hits=hits,
        last_failure=entry.last_failure,
        retry_at=entry.retry_at,
    )


async def _summaries(handler: CacheHandler) -> list[EntrySummary]:
    """Every entry's metadata and stored size: never a body, so listing a cache of any
    size holds a few hundred bytes per entry, not the pages (:meth:`CacheHandler.summary`)."""
    return [summary async for summary in handler.summaries()]


async def list_rows(
    handler: CacheHandler,
    now: float,
    *,
    state: str | None = None,
    tag: str | None = None,
    route: str | None = None,
    search: str | None = None,
    sort: str = "age",
    limit: int | None = None,
) -> list[EntryRow]:
    """Every entry of ``handler`` as a row, filtered and sorted.

    ``state`` keeps one state (``fresh``, ``stale``...); ``tag`` the entries carrying a
    tag (a user tag, or an implicit one by its full name); ``route`` the pages of a
    route pattern (``/blog/[id]``), or whose key starts with it; ``search`` keys
    containing the text. ``sort`` is one of :data:`SORTS` (hits, age and size largest
    first, key alphabetical). Raises ``ValueError`` for an unknown state or sort.
    """
    wanted = EntryState(state) if state else None
    if sort not in SORTS:
        raise ValueError(f"unknown sort {sort!r}: use one of {', '.join(SORTS)}")
    summaries = await _summaries(handler)
    if tag:
        summaries = [s for s in summaries if tag in s.entry.tags]
    if route:
        summaries = [s for s in summaries if route_of(s.entry) == route or s.entry.key.startswith(route)]
    if search:
        needle = search.lower()
        summaries = [s for s in summaries if needle in s.entry.key.lower()]
    all_tags = {t for s in summaries for t in with_stale_tags(s.entry.tags)}
    times = await handler.tag_times(sorted(all_tags)) if all_tags else {}
    hits = (await handler.activity(now)).hits
    rows = [_row(s, times, hits.get(s.entry.key, 0), now) for s in summaries]
    if wanted is not None:
        rows = [r for r in rows if r.state is wanted]
    if sort == "key":
        rows.sort(key=lambda r: r.key)
    else:
        rows.sort(key=lambda r: (-getattr(r, sort), r.key))
    return rows[:limit] if limit is not None else rows


# -- the sentences ----------------------------------------------------------------------


def clock_time(at: float, now: float) -> str:
    """``12:03:04`` in local time, with the date when ``at`` is not on ``now``'s day."""
    moment, today = time.localtime(at), time.localtime(now)
    if moment[:3] == today[:3]:
        return time.strftime("%H:%M:%S", moment)
    return time.strftime("%Y-%m-%d %H:%M:%S", moment)


def duration(seconds: float) -> str:
    """Seconds in the unit a person reads: ``40 s``, ``2 min``, ``3 h``, ``5 days``."""
    seconds = abs(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def ago(at: float, now: float) -> str:
    """``2 min ago`` / ``in 40 s`` / ``just now``."""
    delta = now - at
    if abs(delta) < 1:
        return "just now"
    return f"{duration(delta)} ago" if delta > 0 else f"in {duration(delta)}"


def when(at: float, now: float) -> str:
    """``12:03:04 (2 min ago)``."""
    return f"{clock_time(at, now)} ({ago(at, now)})"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _seconds(value: int | None, never: str) -> str:
    return never if value is None else f"{value} s"


def _what(inv: Invalidation) -> str:
    """What an invalidation named, in words: ``tag `posts```, ``path /blog/1``."""
    if inv.kind == "tag":
        target = inv.target
        if target.startswith(PATH_TAG):  # pyisr cache purge of an older version named the key tag
            return f"path {target[len(PATH_TAG) :]}"
        return f"tag `{target}`"
    if inv.kind == "page":
        return f"every page of {inv.target}"
    if inv.kind == "layout":
        return f"layout {inv.target}"
    if inv.kind == "regenerate":
        return f"path {inv.target} (regenerated on demand)"
    return f"path {inv.target}"


def _tag_words(tag: str) -> str:
    """An entry's tag as a person reads it (implicit tags by what they stand for)."""
    for prefix, words in ((PATH_TAG, "path"), (PAGE_TAG, "route"), (LAYOUT_TAG, "layout")):
        if tag.startswith(prefix):
            return f"{words} {tag[len(prefix) :]}"
    return f"tag `{tag}`"


def _touching(entry: CacheEntry, invalidations: list[Invalidation]) -> list[Invalidation]:
    """The recorded invalidations that name ``entry``'s tags or key, newest first."""
    tags = set(entry.tags)
    return [
        inv
        for inv in invalidations
        if tags.intersection(inv.tags) or (inv.kind == "regenerate" and inv.target == entry.key)
    ]


def _cause(
    entry: CacheEntry,
    tag_times: Mapping[str, float],
    touching: list[Invalidation],
    *,
    stale: bool,
    now: float,
) -> tuple[float, str]:
    """Since when and by what the entry was invalidated (``stale=False``) or marked stale.

    By the engine's rule, the first invalidation of one of its tags at or after its
    render did it: the store's ring of invalidations says which call that was and who
    asked. When the ring no longer holds it (it keeps the last :data:`MAX_INVALIDATIONS`),
    the tag times still say which tag and when (the latest time of each tag), and the
    sentence says who asked is not known.
    """
    doing = "marked stale" if stale else "revalidated"
    recorded = [
        inv
        for inv in touching
        if inv.kind != "regenerate" and inv.stale == stale and inv.at >= entry.created_at
    ]
    if recorded:
        first, later = recorded[-1], recorded[:-1]  # ``touching`` is newest first
        since = first.at
        said = (
            f"{_what(first)} was {doing} at {clock_time(first.at, now)} by {first.by or 'an unknown caller'}"
        )
        if later:
            times = "time" if len(later) == 1 else "times"
            said += (
                f", and {len(later)} more {times} since (the last at {clock_time(later[0].at, now)} "
                f"by {later[0].by or 'an unknown caller'})"
            )
        return since, said
    candidates = []
    for tag in entry.tags:
        at = tag_times.get(STALE_TAG + tag if stale else tag)
        if at is not None and at >= entry.created_at:
            candidates.append((at, tag))
    since, tag = min(candidates)
    return since, (
        f"{_tag_words(tag)} was {doing} at {clock_time(since, now)}; who asked is no longer in the "
        f"store's record (it keeps the last {MAX_INVALIDATIONS} invalidations)"
    )


def _asked(entry: CacheEntry, touching: list[Invalidation], now: float) -> str | None:
    """Who asked for the regeneration that failed (``revalidate(path)``), if it is recorded."""
    failure = entry.last_failure
    for inv in touching:
        if inv.kind == "regenerate" and failure is not None and entry.created_at <= inv.at <= failure.at:
            return f"It was asked for at {clock_time(inv.at, now)} by {inv.by or 'an unknown caller'}."
    return None


def _failure(entry: CacheEntry, now: float) -> str:
    failure = entry.last_failure
    if failure is None:  # a back-off with no record (a store that dropped it)
        assert entry.retry_at is not None
        return f"Its last regeneration failed; next try at {when(entry.retry_at, now)}."
    count = "" if failure.count <= 1 else f", {_ordinal(failure.count)} in a row"
    message = failure.message if len(failure.message) <= 200 else failure.message[:199] + "…"
    said = f"A regeneration failed at {clock_time(failure.at, now)} ({failure.exc_type}: {message}{count})"
    if entry.retry_at is not None and entry.retry_at > now:
        return f"{said}; next try at {when(entry.retry_at, now)}."
    return f"{said}; the next request tries again."


def _served(entry: CacheEntry, now: float) -> str:
    what = "the page" if entry.kind.value != "data" else "the value"
    return f"Served meanwhile: {what} rendered at {when(entry.created_at, now)}."


def _fresh(entry: CacheEntry, now: float) -> str:
    rendered = f"rendered at {when(entry.created_at, now)}"
    end = window_end(entry)
    if end is None:
        said = f"Fresh until it is revalidated ({rendered}, revalidate = False)."
    else:
        said = f"Fresh until {when(end, now)}: {rendered}, revalidate {entry.revalidate} s."
    expires = entry.expires_at()
    if expires is not None:
        said += f" It expires at {when(expires, now)}."
    return said


def _sentences(
    entry: CacheEntry,
    state: EntryState,
    tag_times: Mapping[str, float],
    touching: list[Invalidation],
    now: float,
) -> list[str]:
    said: list[str] = []
    if state is EntryState.EXPIRED:
        expires = entry.expires_at()
        assert expires is not None
        said.append(
            f"Expired at {when(expires, now)} (expire {entry.expire} s after it was rendered at "
            f"{clock_time(entry.created_at, now)}): it is never served again, the next request "
            "waits for a fresh render."
        )
    elif state is EntryState.INVALIDATED:
        since, cause = _cause(entry, tag_times, touching, stale=False, now=now)
        said.append(f"Invalidated since {when(since, now)}: {cause}.")
        said.append(
            f"The next request waits for a fresh render (the old one, rendered at "
            f"{clock_time(entry.created_at, now)}, is not served)."
        )
    elif state is EntryState.FRESH:
        said.append(_fresh(entry, now))
    else:  # stale or failing: served at once, STALE
        if entry.is_marked_stale(tag_times):
            since, cause = _cause(entry, tag_times, touching, stale=True, now=now)
            said.append(f"Stale since {when(since, now)}: {cause}.")
        elif past_window(entry, now):
            end = window_end(entry)
            assert end is not None
            said.append(f"Stale since {when(end, now)}: its revalidate window of {entry.revalidate} s ended.")
        else:  # failing while still in its window: a regeneration asked for on demand failed
            said.append(
                f"Fresh until {when(window_end(entry) or now, now)}, but a regeneration asked for failed."
            )
        if state is EntryState.FAILING:
            said.append(_failure(entry, now))
            asked = _asked(entry, touching, now)
            if asked:
                said.append(asked)
        elif entry.is_stale(now) or entry.is_marked_stale(tag_times):
            said.append("The next request starts a regeneration in the background.")
        said.append(_served(entry, now))
    return said


async def explain(handler: CacheHandler, key: str, now: float) -> Explanation:
    """Why ``key`` is in its state, in sentences (``pyisr cache explain``, the dashboard)."""
    entry = await handler.reload(key)
    regenerating = await _locked(handler, key)
    activity = await handler.activity(now)
    if entry is None:
        said = [f"Nothing is cached for {key}."]
        if key.startswith("data:"):
            said.append("It is a data key: the next read of that value calls its function and stores it.")
        else:
            said.append(
                "If a route matches this path, the next request renders it (and stores it when the "
                "route caches); if none matches, it answers 404."
            )
        if regenerating:
            said.append("A render of it is running now.")
        return Explanation(key, None, said, None, [], regenerating)
    tag_times = await handler.tag_times(with_stale_tags(entry.tags)) if entry.tags else {}
    state = entry_state(entry, tag_times, now)
    row = _row(EntrySummary.of(entry), tag_times, activity.hits.get(key, 0), now)
    touching = _touching(entry, activity.invalidations)
    said = _sentences(entry, state, tag_times, touching, now)
    if regenerating:
        said.append("A regeneration is running now.")
    return Explanation(key, state, said, row, touching, regenerating)


async def _locked(handler: CacheHandler, key: str) -> bool | None:
    try:
        return await handler.is_locked(key)
    except Exception:  # noqa: BLE001 - the store cannot tell; the rest of the answer stands
        return None
