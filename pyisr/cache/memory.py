"""``MemoryCache``: the whole cache in this process, bounded by bytes.

For tests, single-process servers and scripts. Nothing survives a restart, and
other processes do not see it; use ``FileSystemCache`` or ``RedisCache`` for that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pyisr.cache.entry import CacheEntry
from pyisr.cache.handler import CacheHandler
from pyisr.cache.lru import ByteLRU
from pyisr.cache.tags import TagTimes

DEFAULT_MEMORY_BYTES = 50 * 1024 * 1024


class HeldEntries:
    """What every in-process store of entries shares (this one, and the memory tier in
    front of a file or Redis store): which entry it keeps, and what it keeps beside one."""

    _entries: ByteLRU[CacheEntry]

    def _keep_newest(self, entry: CacheEntry) -> bool:
        """Keep ``entry`` unless a newer one is held (the store's fencing, in memory);
        whether it was kept."""
        current = self._entries.peek(entry.key)
        if current is not None and current.created_at > entry.created_at:
            return False
        self._entries.put(entry.key, entry)
        return True

    def attached(self, entry: CacheEntry, name: str) -> object | None:
        """What :meth:`attach` kept beside ``entry`` (this very object, as served from here)
        under ``name``, while it is still the one held; ``None`` otherwise."""
        return self._entries.attached(entry.key, entry, name)

    def attach(self, entry: CacheEntry, name: str, thing: object, size: int) -> bool:
        """Keep ``thing`` (``size`` bytes, counted in the budget) beside ``entry`` for as
        long as this very entry is held: its decoded data value (:mod:`pyisr.data.memo`)."""
        return self._entries.attach(entry.key, entry, name, thing, size)


class MemoryCache(HeldEntries, CacheHandler):
    name = "memory"

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self._entries = ByteLRU(max_bytes, CacheEntry.size)
        self._tag_times = TagTimes()
        self._tag_versions: dict[str, int] = {}
        self._tags_version = 0

    async def get(self, key: str) -> CacheEntry | None:
        return self._entries.get(key)

    async def set(self, entry: CacheEntry) -> bool:
        return self._keep_newest(entry)

    async def delete(self, key: str) -> None:
        self._entries.pop(key)

    async def revalidate_tags(self, tags: Iterable[str], at: float) -> None:
        self._tags_version += 1
        for tag in self._tag_times.record(tags, at):
            self._tag_versions[tag] = self._tags_version

    def tags_version(self) -> int | None:
        return self._tags_version

    async def tag_changes(self, cursor: Any) -> tuple[Any, Mapping[str, float]] | None:
        since = cursor if isinstance(cursor, int) else -1
        changed = {t: self._tag_times[t] for t, v in self._tag_versions.items() if v > since}
        return self._tags_version, changed

    async def tag_times(self, tags: Iterable[str]) -> Mapping[str, float]:
        return self._tag_times.pick(tags)

    async def keys(self, prefix: str = "") -> AsyncIterator[str]:
        for key in self._entries.keys():
            if key.startswith(prefix):
                yield key

    def signing_key_home(self) -> Path | Literal["process"] | None:
        """Only this process reads the entries, so a key it makes up is enough."""
        return "process"

    def describe(self) -> dict[str, Any]:
        return {
            "handler": self.name,
            "entries": len(self._entries),
            "bytes": self._entries.bytes,
            "max_bytes": self._entries.max_bytes,
        }
