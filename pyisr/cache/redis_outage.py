"""Degraded mode of ``RedisCache``: what an instance does while Redis is unreachable.

A connection error or timeout marks Redis as down, logs one warning and from then on
every call fails fast (no request waits for a timeout): ``get`` returns ``None``,
``set`` ``False``, tag reads come from the mirror, the lock is an in-process one and
invalidations are queued. One probe per event loop retries at most every
``retry_interval`` seconds; when Redis answers, the queued invalidations are written,
the mirror is resynced, and one info line is logged.

The race this guards against: an invalidation queued while the probe is flushing the
queue. Redis is declared back only once the queue is empty, under the same lock the
queue is filled under, so no invalidation is left behind until the next outage.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from redis import exceptions as redis_errors

from pyisr.cache.tags import TagTimes

logger = logging.getLogger("pyisr.cache")

#: Errors that mean "Redis is unreachable or not answering": they switch to degraded mode.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterError,
    redis_errors.RedisClusterException,
    redis_errors.TryAgainError,
    redis_errors.ReadOnlyError,  # a failover in progress: the old primary is now a replica
    TimeoutError,
    OSError,
)
_PROBE_ERRORS: tuple[type[BaseException], ...] = (*OUTAGE_ERRORS, redis_errors.RedisError)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Outage:
    """Whether Redis is down, since when, when to try again, and the invalidations waiting for it.

    Shared by every event loop that uses the handler (hence the lock). ``where`` names
    Redis in log lines (without its password); ``on_recovery`` runs when Redis is
    back, to resync what pub/sub may have missed meanwhile.
    """

    def __init__(self, where: str, *, retry_interval: float, on_recovery: Callable[[], None]) -> None:
        self._where = where
        self.retry_interval = retry_interval
        self._on_recovery = on_recovery
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self.last_error: str | None = None
        self._outages = 0
        self._error_logged: dict[str, float] = {}
        #: Invalidations made while Redis was down, written when it is back (tag -> time).
        self._pending = TagTimes()

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def went_down(self, exc: BaseException) -> None:
        """Enter degraded mode (one warning per outage, however many calls fail)."""
        with self._lock:
            self.last_error = _describe(exc)
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
                self._retry_at = self._down_since + self.retry_interval
                self._outages += 1
        if first:
            logger.warning(
                "Redis unreachable at %s (%s); serving from memory and rendering locally until it is back",
                self._where,
                self.last_error,
            )

    def queue(self, times: Mapping[str, float]) -> None:
        """Keep invalidations Redis could not take, to write them when it is back."""
        with self._lock:
            self._pending.merge(times)

    async def probe(
        self,
        ping: Callable[[], Awaitable[object]],
        publish: Callable[[list[str], float], Awaitable[object]],
        *,
        closed: Callable[[], bool],
    ) -> None:
        """Retry Redis at most every ``retry_interval``; on success flush queued invalidations."""
        while self._down_since is not None and not closed():
            await asyncio.sleep(max(0.0, self._retry_at - time.monotonic()))
            if self._down_since is None:
                return
            self._retry_at = time.monotonic() + self.retry_interval
            try:
                await ping()
                # Invalidations queued while we flush would wait for the next outage if
                # we declared Redis back first: flush until nothing is left.
                while not self._came_back_if_flushed():
                    await self._flush_pending(publish)
            except _PROBE_ERRORS as exc:
                self.last_error = _describe(exc)

    def queued(self) -> list[str]:
        """The tags whose invalidation waits for Redis."""
        with self._lock:
            return sorted(self._pending)

    async def flush_now(
        self, ping: Callable[[], Awaitable[object]], publish: Callable[[list[str], float], Awaitable[object]]
    ) -> None:
        """One attempt, now, to write what is queued (a process about to end); raises what
        Redis raised. Redis is in use again if it succeeds."""
        await ping()
        while not self._came_back_if_flushed():
            await self._flush_pending(publish)

    def _came_back_if_flushed(self) -> bool:
        """Leave degraded mode if no invalidation is still queued; True once Redis is in use."""
        with self._lock:
            if self._down_since is None:
                return True
            if self._pending:
                return False
            down_for = time.monotonic() - self._down_since
            self._down_since = None
            self._on_recovery()
        logger.info("Redis at %s is reachable again after %.1fs of outage", self._where, down_for)
        return True

    async def _flush_pending(self, publish: Callable[[list[str], float], Awaitable[object]]) -> None:
        """Write invalidations queued during an outage (raises if Redis fails meanwhile)."""
        with self._lock:
            pending, self._pending = self._pending, TagTimes()
        by_time: dict[float, list[str]] = {}
        for tag, at in pending.items():
            by_time.setdefault(at, []).append(tag)
        try:
            for at, tags in sorted(by_time.items()):
                await publish(tags, at)
                for tag in tags:
                    del pending[tag]
        finally:
            if pending:
                self.queue(pending)

    def log_error(self, what: str, exc: BaseException) -> None:
        """Warn about a non-outage Redis error, at most once a minute per message."""
        message = _describe(exc)
        now = time.monotonic()
        if now - self._error_logged.get(message, float("-inf")) >= 60:
            self._error_logged[message] = now
            logger.warning("Redis error during %s at %s: %s", what, self._where, message)

    def health(self) -> dict[str, Any]:
        """Whether Redis is in use, for the health endpoint and monitoring."""
        down = self._down_since
        return {
            "status": "degraded" if down is not None else "ok",
            "degraded": down is not None,
            "down_for": None if down is None else round(time.monotonic() - down, 3),
            "last_error": self.last_error,
            "outages": self._outages,
            "queued_invalidations": len(self._pending),
        }
