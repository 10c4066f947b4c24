"""``MemoryTier``: hot entries in process memory in front of any handler.

A HIT must not touch the disk or the network, so the tier keeps recent entries in a
byte-bounded LRU and mirrors the tag manifest. Coherence with other processes comes
from the tag manifest, not from the entries: an invalidation anywhere is a tag time,
the tier refreshes its mirror at most every ``tag_refresh`` seconds (default 0.5 s,
so other processes' invalidations are seen within 1 s), and an entry whose tags were
revalidated is re-read from the backing handler.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pyisr.cache.activity import Activity, ActivityReport, Invalidation
from pyisr.cache.entry import CacheEntry, EntrySummary
from pyisr.cache.handler import CacheHandler
from pyisr.cache.lru import ByteLRU
from pyisr.cache.memory import DEFAULT_MEMORY_BYTES, HeldEntries
from pyisr.cache.tags import TagTimes

#: Seconds a tier trusts its mirror of the tag times before it reads the store's again:
#: how late a process may see another's invalidation (the edge's purges wait this out).
TAG_REFRESH = 0.5


class MemoryTier(HeldEntries, CacheHandler):
    def __init__(
        self,
        backing: CacheHandler,
        max_bytes: int = DEFAULT_MEMORY_BYTES,
        *,
        tag_refresh: float = TAG_REFRESH,
    ) -> None:
        self.backing = backing
        self.name = f"memory+{backing.name}"
        self.tag_refresh = tag_refresh
        self._entries: ByteLRU[CacheEntry] = ByteLRU(max_bytes, CacheEntry.size)
        #: Mirror of tag times; complete when the backing supports ``tag_changes``.
        self._tags = TagTimes()
        #: Per-tag "checked at" (monotonic) when only ``tag_times`` is available.
        self._tag_checked: dict[str, float] = {}
        self._cursor: Any = None
        self._mirror_complete: bool | None = None  # unknown until first refresh
        self._refreshed_at = float("-inf")
        self._tags_version = 0
        #: The backing store's "used now" mark (``FileSystemCache.touch``: its eviction is
        #: least recently used, and hits served from here never reach it otherwise).
        self._touch: Callable[[str], None] | None = getattr(backing, "touch", None)

    # -- tag mirror ---------------------------------------------------------------------

    async def _refresh_tags(self) -> None:
        now = time.monotonic()
        if now - self._refreshed_at < self.tag_refresh:
            return
        self._refreshed_at = now
        if self._mirror_complete is False:
            return
        changes = await self.backing.tag_changes(self._cursor)
        if changes is None:
            self._mirror_complete = False
            return
        self._mirror_complete = True
        self._cursor, times = changes
        self._tags_version += len(self._tags.merge(times))

    async def tag_times(self, tags: Iterable[str]) -> Mapping[str, float]:
        await self._refresh_tags()
        if self._mirror_complete:
            return self._tags.pick(tags)
        now = time.monotonic()
        wanted = list(tags)
        expired = [t for t in wanted if now - self._tag_checked.get(t, float("-inf")) >= self.tag_refresh]
        if expired:
            fetched = await self.backing.tag_times(expired)
            for tag in expired:
                self._tag_checked[tag] = now
            self._tags.merge({t: fetched[t] for t in expired if t in fetched})
        return self._tags.pick(wanted)

    async def revalidate_tags(self, tags: Iterable[str], at: float) -> None:
        tags = list(tags)
        await self.backing.revalidate_tags(tags, at)
        self._tags.record(tags, at)
        self._tags_version += 1

    def tags_version(self) -> int | None:
        """Current only while the mirror is complete and refreshed within ``tag_refresh``."""
        if not self._mirror_complete or time.monotonic() - self._refreshed_at >= self.tag_refresh:
            return None
        return self._tags_version

    # -- entries ------------------------------------------------------------------------

    async def get(self, key: str) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            if not entry.tags or not entry.is_invalidated(await self.tag_times(entry.tags)):
                if self._touch is not None:
                    self._touch(key)  # served from memory, still used: the store's LRU hears of it
                return entry
            # Invalidated here; another process may already have stored a newer entry.
        return await self.reload(key)

    def _backing_down(self) -> bool:
        """True while the backing store is unreachable (``RedisCache.degraded``).

        Its answers then mean "unknown", not "missing" or "fenced": the tier keeps
        its copies so this instance goes on serving, and rendering once, from memory.
        """
        return bool(getattr(self.backing, "degraded", False))

    async def summary(self, key: str) -> EntrySummary | None:
        """The backing store's summary (its metadata alone); this tier's copy while it is down."""
        found = await self.backing.summary(key)
        if found is None and self._backing_down():
            entry = self._entries.peek(key)
            return EntrySummary.of(entry) if entry is not None else None
        return found

    async def reload(self, key: str) -> CacheEntry | None:
        entry = await self.backing.get(key)
        if entry is None:
            if self._backing_down():
                return self._entries.peek(key)
            self._entries.pop(key)
        else:
            self._entries.put(key, entry)
        return entry

    async def set(self, entry: CacheEntry) -> bool:
        try:
            stored = await self.backing.set(entry)
        except Exception:
            # The store refused the write (disk full, read-only, down): this process keeps
            # the render and serves it from memory rather than render the page again for
            # every request meanwhile. The failure still reaches the engine, which answers
            # this request MISS (not stored), counts it for health and logs it.
            self._keep_newest(entry)
            raise
        if stored:
            self._entries.put(entry.key, entry)
        elif self._backing_down():
            # The backing store is unreachable: this instance serves the new entry from
            # memory, so for the engine it is stored (not fenced) unless ours is newer.
            if self._keep_newest(entry):
                return True
        else:
            # A newer entry exists in the backing store; drop our copy so it is re-read.
            self._entries.pop(entry.key)
        return stored

    async def delete(self, key: str) -> None:
        self._entries.pop(key)
        await self.backing.delete(key)

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        return await self.backing.acquire_lock(key, ttl)

    async def release_lock(self, key: str, token: str) -> None:
        await self.backing.release_lock(key, token)

    async def tag_changes(self, cursor: Any) -> tuple[Any, Mapping[str, float]] | None:
        return await self.backing.tag_changes(cursor)

    async def keys(self, prefix: str = "") -> AsyncIterator[str]:
        async for key in self.backing.keys(prefix):
            yield key

    async def summaries(self, prefix: str = "") -> AsyncIterator[EntrySummary]:
        async for found in self.backing.summaries(prefix):
            yield found

    async def flush_queued(self, timeout: float = 2.0) -> list[str]:
        return await self.backing.flush_queued(timeout)

    async def is_locked(self, key: str) -> bool | None:
        return await self.backing.is_locked(key)

    async def record_invalidation(self, invalidation: Invalidation) -> None:
        await self.backing.record_invalidation(invalidation)

    async def add_activity(self, report: ActivityReport, now: float) -> None:
        await self.backing.add_activity(report, now)

    async def activity(self, now: float) -> Activity:
        return await self.backing.activity(now)

    async def close(self) -> None:
        self._entries.clear()
        await self.backing.close()

    def signing_key_home(self) -> Path | Literal["process"] | None:
        """The backing store decides: the tier only holds copies of its entries."""
        return self.backing.signing_key_home()

    def describe(self) -> dict[str, Any]:
        info = dict(self.backing.describe())
        info["memory_tier"] = {
            "entries": len(self._entries),
            "bytes": self._entries.bytes,
            "max_bytes": self._entries.max_bytes,
        }
        return info
