"""The storage interface every cache handler implements.

Handlers store entries and tag times; they never decide freshness (that is the
engine's job, with the rule in ``entry.py``). The interface is small so users can
write their own (the seeds' custom ``cacheHandler``): ``get``, ``set``,
``revalidate_tags`` and ``tag_times`` are required; ``delete``, the lock, listing
and ``close`` have working defaults in :class:`CacheHandler`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pyisr.cache.activity import Activity, ActivityLog, ActivityReport, Invalidation
from pyisr.cache.entry import CacheEntry, EntrySummary


class CacheHandler(ABC):
    """Base class for storage back-ends. Subclass it, or duck-type the four required methods."""

    #: Shown by the debug log and ``pyisr cache`` commands.
    name: str = "custom"

    @abstractmethod
    async def get(self, key: str) -> CacheEntry | None:
        """The stored entry for ``key``, or ``None``. Never a half-written one."""

    @abstractmethod
    async def set(self, entry: CacheEntry) -> bool:
        """Store ``entry`` unless a newer one (larger ``created_at``) is already stored.

        Returns ``False`` when fenced off by a newer entry. This is what keeps a slow
        render that started before an on-demand revalidation from overwriting its
        result.
        """

    @abstractmethod
    async def revalidate_tags(self, tags: Iterable[str], at: float) -> None:
        """Record that ``tags`` were revalidated at ``at`` (one write, however many entries)."""

    @abstractmethod
    async def tag_times(self, tags: Iterable[str]) -> Mapping[str, float]:
        """When each of ``tags`` was last revalidated; tags never revalidated are absent."""

    async def delete(self, key: str) -> None:
        """Remove ``key``. The default does nothing (entries then only age out)."""

    async def reload(self, key: str) -> CacheEntry | None:
        """Like ``get`` but bypassing any in-process copy (the memory tier overrides it).

        The engine calls it after taking a regeneration lock, to adopt an entry another
        process stored meanwhile instead of rendering again.
        """
        return await self.get(key)

    async def summary(self, key: str) -> EntrySummary | None:
        """``key``'s metadata and stored size, for listings (``pyisr cache list``, the
        dashboard), bypassing any in-process copy as :meth:`reload` does.

        The default reads the whole entry; a store that keeps metadata apart (the file
        system, Redis) reads it alone, so listing a big cache never reads its bodies.
        """
        entry = await self.reload(key)
        return EntrySummary.of(entry) if entry is not None else None

    async def summaries(self, prefix: str = "") -> AsyncIterator[EntrySummary]:
        """The summary of every stored key starting with ``prefix``, for listings.

        The default asks :meth:`summary` key by key; a remote store answers many keys per
        round trip (Redis: one pipeline per batch), so listing 100,000 entries is not
        100,000 waits for the network.
        """
        async for key in self.keys(prefix):
            found = await self.summary(key)
            if found is not None:
                yield found

    async def flush_queued(self, timeout: float = 2.0) -> list[str]:
        """Write invalidations the store queued while it was unreachable, now (a command
        about to end); returns the tags still not written. The default store queues none."""
        return []

    async def tag_changes(self, cursor: Any) -> tuple[Any, Mapping[str, float]] | None:
        """Tag times recorded since ``cursor`` (``None`` = all), and the cursor to pass next.

        Optional: a handler that can list changes cheaply lets the memory tier mirror the
        whole tag manifest and check tags with no I/O per request. ``None`` means
        unsupported; the tier then asks ``tag_times`` for the tags it needs.
        """
        return None

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        """Try to take the regeneration lock for ``key``; return a token, or ``None`` if held.

        The lock expires after ``ttl`` seconds so a crashed holder cannot block the key
        for ever. The default lock is per handler object (one process).
        """
        locks = self.__dict__.setdefault("_default_locks", {})
        now = time.monotonic()
        held = locks.get(key)
        if held is not None and held[1] > now:
            return None
        token = secrets.token_hex(8)
        locks[key] = (token, now + ttl)
        return token

    async def release_lock(self, key: str, token: str) -> None:
        """Release the lock for ``key`` if ``token`` still holds it."""
        locks = self.__dict__.setdefault("_default_locks", {})
        held = locks.get(key)
        if held is not None and held[0] == token:
            del locks[key]

    async def keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Every stored key starting with ``prefix`` (for the CLI); the default lists none."""
        return
        yield  # pragma: no cover - makes this an async generator

    async def is_locked(self, key: str) -> bool | None:
        """Whether some process holds ``key``'s regeneration lock now (``None``: cannot tell).

        For ``pyisr cache explain`` and the dashboard ("a regeneration is running").
        """
        held = self.__dict__.get("_default_locks", {}).get(key)
        return held is not None and held[1] > time.monotonic()

    # -- activity: what ``pyisr cache`` and the dashboard show (pyisr.cache.activity) ----------
    # The defaults keep it in this handler object's memory: right for a store only this
    # process reads. A shared or persistent store overrides the three methods to keep
    # one record for every process that uses it.

    def _activity_log(self) -> ActivityLog:
        log = self.__dict__.get("_pyisr_activity")
        if log is None:
            log = self.__dict__["_pyisr_activity"] = ActivityLog()
        return log

    async def record_invalidation(self, invalidation: Invalidation) -> None:
        """Keep ``invalidation`` in the store's ring of recent ones."""
        self._activity_log().record_invalidation(invalidation)

    async def add_activity(self, report: ActivityReport, now: float) -> None:
        """Add one process's hits and per-minute counts to the store's."""
        self._activity_log().add(report, now)

    async def activity(self, now: float) -> Activity:
        """The store's record: recent invalidations (newest first), hits, recent minutes."""
        return self._activity_log().read(now)

    def tags_version(self) -> int | None:
        """A number that changes whenever any tag time may have changed, or ``None``.

        Lets the server's fast path reuse a HIT checked against the same tag state
        without asking the handler again. ``None`` (the default) means "unknown":
        every request then takes the full path.
        """
        return None

    async def close(self) -> None:
        """Release connections and files."""

    def signing_key_home(self) -> Path | Literal["process"] | None:
        """Where ``cached(..., serializer="pickle")`` may keep the key that signs its pickles.

        Signing is what stops anyone who can write to the store from making this
        process unpickle (and so run) their bytes, so the key must stay out of their
        reach while every reader of the store shares it:

        * ``None`` (the default, and right for any store other machines or apps may
          share, such as Redis): pyisr cannot make up a key the other readers would
          agree on, so pickle needs an explicit ``PYISR_SIGNING_KEY``;
        * ``"process"``: nobody outside this process reads the store, so a random key
          made per process is enough (``MemoryCache``);
        * a ``Path``: a key file to create once (32 random bytes, mode 0600) and reuse,
          for a store only processes on this machine with access to that file read.
          It must not live inside a directory that is replaced as a whole.

        ``PYISR_SIGNING_KEY``, when set, is used whatever this returns.
        """
        return None

    def describe(self) -> dict[str, Any]:
        """A short description for logs and the health endpoint."""
        return {"handler": self.name}


REQUIRED_METHODS = ("get", "set", "revalidate_tags", "tag_times")


class _DuckHandler(CacheHandler):
    """Gives a duck-typed user object the optional methods it does not define."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)

    async def get(self, key: str) -> CacheEntry | None:
        return await self._inner.get(key)

    async def set(self, entry: CacheEntry) -> bool:
        result = await self._inner.set(entry)
        return True if result is None else bool(result)

    async def revalidate_tags(self, tags: Iterable[str], at: float) -> None:
        await self._inner.revalidate_tags(list(tags), at)

    async def tag_times(self, tags: Iterable[str]) -> Mapping[str, float]:
        return await self._inner.tag_times(list(tags))

    async def tag_changes(self, cursor: Any) -> tuple[Any, Mapping[str, float]] | None:
        if hasattr(self._inner, "tag_changes"):
            return await self._inner.tag_changes(cursor)
        return None

    async def delete(self, key: str) -> None:
        if hasattr(self._inner, "delete"):
            await self._inner.delete(key)

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        if hasattr(self._inner, "acquire_lock"):
            return await self._inner.acquire_lock(key, ttl)
        return await super().acquire_lock(key, ttl)

    async def release_lock(self, key: str, token: str) -> None:
        if hasattr(self._inner, "release_lock"):
            await self._inner.release_lock(key, token)
        else:
            await super().release_lock(key, token)

    async def summary(self, key: str) -> EntrySummary | None:
        if hasattr(self._inner, "summary"):
            found: EntrySummary | None = await self._inner.summary(key)
            return found
        return await super().summary(key)

    async def keys(self, prefix: str = "") -> AsyncIterator[str]:
        if hasattr(self._inner, "keys"):
            async for key in self._inner.keys(prefix):
                yield key

    async def flush_queued(self, timeout: float = 2.0) -> list[str]:
        if hasattr(self._inner, "flush_queued"):
            left: list[str] = await self._inner.flush_queued(timeout)
            return left
        return []

    async def summaries(self, prefix: str = "") -> AsyncIterator[EntrySummary]:
        if hasattr(self._inner, "summaries"):
            async for found in self._inner.summaries(prefix):
                yield found
        else:
            async for found in super().summaries(prefix):
                yield found

    async def is_locked(self, key: str) -> bool | None:
        if hasattr(self._inner, "is_locked"):
            return await self._inner.is_locked(key)
        if hasattr(self._inner, "acquire_lock"):
            return None  # its own lock, which this cannot see
        return await super().is_locked(key)

    async def record_invalidation(self, invalidation: Invalidation) -> None:
        if hasattr(self._inner, "record_invalidation"):
            await self._inner.record_invalidation(invalidation)
        else:
            await super().record_invalidation(invalidation)

    async def add_activity(self, report: ActivityReport, now: float) -> None:
        if hasattr(self._inner, "add_activity"):
            await self._inner.add_activity(report, now)
        else:
            await super().add_activity(report, now)

    async def activity(self, now: float) -> Activity:
        if hasattr(self._inner, "activity"):
            return await self._inner.activity(now)
        return await super().activity(now)

    async def close(self) -> None:
        if hasattr(self._inner, "close"):
            result = self._inner.close()
            if asyncio.iscoroutine(result):
                await result

    def signing_key_home(self) -> Path | Literal["process"] | None:
        # Nothing is known about where a duck-typed store lives: treat it as shared.
        return None


def as_handler(obj: object) -> CacheHandler:
    """Accept a :class:`CacheHandler` or any object with the required async methods."""
    if isinstance(obj, CacheHandler):
        return obj
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(
            f"{type(obj).__name__} cannot be used as a cache handler: it lacks "
            f"{', '.join(missing)}. Subclass pyisr.CacheHandler or define async "
            f"{', '.join(REQUIRED_METHODS)}."
        )
    return _DuckHandler(obj)
