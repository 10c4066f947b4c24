"""The purge queue: what every CDN adapter shares.

An invalidation must reach the edge, but never at the caller's expense: ``revalidate_tag``
returns once pyisr's own cache has it, whether the CDN answers in 50 ms, in 5 s or not
at all. So :meth:`PurgeQueue.add` only records the keys and returns, from any thread and
any event loop (a request's, the sync bridge's, a Django view's thread, a script's), and
the purges run on a daemon thread with an event loop of its own. There:

* keys arriving within :data:`WINDOW` (after every instance can see the invalidation)
  are sent together, one batch per CDN and per kind
  (hard, soft), de-duplicated, split by each adapter's ``max_keys`` / ``max_bytes``; a
  hard purge of a key supersedes a pending soft one;
* a failed request is retried with back-off (:data:`FIRST_RETRY` doubling to
  :data:`MAX_RETRY`; meanwhile new keys join the retry rather than making requests of
  their own), and its keys are given up after :data:`GIVE_UP_AFTER`, saying so in the
  log; a refusal that cannot change (``PurgeFailed(retry=False)``: a bad token) is not
  retried;
* failures are logged at most once a minute per CDN and counted in keys (``sent``,
  ``failed``, ``retried``, ``dropped``: every key added ends sent, failed or dropped),
  for :meth:`health` and the metrics, and :meth:`degraded_reasons` says when a CDN's
  purges are failing, until one succeeds again.

:meth:`flush` waits for everything pending (``pyisr cache purge`` before it exits), and
an ``atexit`` hook flushes every open queue for at most :data:`EXIT_WAIT` seconds, so a
script that calls ``revalidate_tag`` and ends has purged the edge by then.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyisr.cache.tier import TAG_REFRESH
from pyisr.cdn.base import EdgePurger, PurgeFailed
from pyisr.log import log_fields

logger = logging.getLogger("pyisr.cdn")

#: Seconds keys wait for others before they are sent together. Longer than a memory tier's
#: trust in its tag times (:data:`~pyisr.cache.tier.TAG_REFRESH`): an edge purged sooner
#: could refetch the page from an instance that has not yet seen the invalidation (the
#: invalidating process is a script, the CLI or another instance) and keep the old page
#: for a whole ``s-maxage``.
WINDOW = TAG_REFRESH + 0.1
#: Seconds before the first retry of a failed purge; doubled at each failure up to MAX_RETRY.
FIRST_RETRY = 0.5
MAX_RETRY = 30.0
#: Seconds after which keys that could not be purged are given up.
GIVE_UP_AFTER = 300.0
#: Seconds between two log lines about one CDN's failures.
LOG_EVERY = 60.0
#: Seconds :meth:`PurgeQueue.close` waits for pending purges (a server's shutdown).
CLOSE_WAIT = 5.0
#: Seconds a process's exit waits for every queue's pending purges.
EXIT_WAIT = 10.0

#: How a key's purge ended (``retried``: it failed and was queued again).
RESULTS = ("sent", "failed", "retried", "dropped")

#: Told ``(cdn name, result, keys)`` for every count (the engine's events: the metrics).
CountSink = Callable[[str, str, int], None]


@dataclass
class _Pending:
    soft: bool
    #: When the key was first queued (monotonic): it is given up GIVE_UP_AFTER later.
    since: float


@dataclass
class _Lane:
    """One CDN's share of the queue: its pending keys, its back-off, its counts."""

    purger: EdgePurger
    pending: dict[str, _Pending] = field(default_factory=dict)
    #: Keys taken for sending and not settled yet.
    in_flight: int = 0
    task: asyncio.Task[None] | None = None
    #: Seconds to wait before the next attempt (0 while purges succeed).
    delay: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))
    requests: int = 0
    #: Since when (epoch seconds) purges fail; ``None`` once one succeeds.
    failing_since: float | None = None
    last_error: str | None = None
    last_error_kind: str | None = None
    last_error_at: float | None = None
    last_sent_at: float | None = None
    logged_at: float | None = None
    unlogged: int = 0

    @property
    def name(self) -> str:
        return self.purger.name

    @property
    def kind(self) -> str:
        """The CDN's scheme (``varnish``): what may be shown to anyone, unlike its host."""
        return self.name.split(":", 1)[0]


class PurgeQueue:
    """Purges keys at each of ``purgers``, batched, retried, off the caller's thread.

    ``clock`` (epoch seconds) dates failures for health; the timings are real (the
    thread sleeps them), and tests shorten them with ``window``, ``first_retry``, ….
    """

    def __init__(
        self,
        purgers: Sequence[EdgePurger],
        *,
        on_count: CountSink | None = None,
        window: float = WINDOW,
        first_retry: float = FIRST_RETRY,
        max_retry: float = MAX_RETRY,
        give_up_after: float = GIVE_UP_AFTER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lanes = [_Lane(p) for p in purgers]
        self.on_count = on_count
        self.window = window
        self.first_retry = first_retry
        self.max_retry = max_retry
        self.give_up_after = give_up_after
        self.clock = clock
        self._lock = threading.Lock()
        #: Notified whenever a lane settles (what :meth:`flush` waits for).
        self._settled = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        _open_queues.add(self)

    @property
    def names(self) -> list[str]:
        return [lane.name for lane in self._lanes]

    # -- adding (any thread, returns at once) ---------------------------------------------------

    def add(self, keys: Iterable[str], *, soft: bool = False) -> None:
        """Purge ``keys`` at every CDN soon; ``soft``: mark stale where the CDN can."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return
        with self._lock:
            if self._closed:
                for lane in self._lanes:
                    self._count(lane, "dropped", len(keys))
                logger.warning("pyisr: %d keys not purged: the purge queue is closed", len(keys))
                return
            loop = self._ensure_thread()
            now = time.monotonic()
            for lane in self._lanes:
                for key in keys:
                    found = lane.pending.get(key)
                    if found is None:
                        lane.pending[key] = _Pending(soft, now)
                    elif not soft:
                        found.soft = False  # a hard purge supersedes a soft one
        for lane in self._lanes:
            loop.call_soon_threadsafe(self._wake, lane)

    def _ensure_thread(self) -> asyncio.AbstractEventLoop:
        """The queue's loop, its thread started on first use (called under the lock)."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="pyisr-cdn", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
        return self._loop

    # -- sending (the queue's thread) -----------------------------------------------------------

    def _wake(self, lane: _Lane) -> None:
        if lane.task is None or lane.task.done():
            assert self._loop is not None
            lane.task = self._loop.create_task(self._drain(lane))

    async def _drain(self, lane: _Lane) -> None:
        """Send ``lane``'s pending keys until none are left, waiting out each back-off."""
        while True:
            await asyncio.sleep(lane.delay or self.window)
            with self._lock:
                taken, lane.pending = lane.pending, {}
                self._give_up_expired(lane, taken)
                lane.in_flight = len(taken)
                if not taken:
                    self._settled.notify_all()
                    return
            try:
                await self._send(lane, taken)
            except Exception as exc:  # noqa: BLE001 - never lose the thread to a bug
                logger.exception("pyisr: purging at %s failed unexpectedly", lane.name, exc_info=exc)
                lane.delay = min(lane.delay * 2, self.max_retry) if lane.delay else self.first_retry
                self._requeue(lane, taken)
            finally:
                with self._lock:
                    lane.in_flight = 0
                    self._settled.notify_all()

    def _give_up_expired(self, lane: _Lane, taken: dict[str, _Pending]) -> None:
        """Drop keys queued more than ``give_up_after`` ago (under the lock)."""
        limit = time.monotonic() - self.give_up_after
        expired = [key for key, pending in taken.items() if pending.since < limit]
        if not expired:
            return
        for key in expired:
            del taken[key]
        self._count(lane, "dropped", len(expired))
        logger.error(
            "%s PURGE GAVE UP on %d keys after %.0fs of failures (%s): the edge may serve "
            "them until their s-maxage ends",
            lane.name,
            len(expired),
            self.give_up_after,
            lane.last_error or "no answer",
            extra=log_fields("PURGE_GAVE_UP", lane.name, keys=len(expired)),
        )

    async def _send(self, lane: _Lane, taken: dict[str, _Pending]) -> None:
        """One attempt at every batch of ``taken``; what failed and may be retried is queued again."""
        batches = [(False, [k for k, p in taken.items() if not p.soft])]
        batches.append((True, [k for k, p in taken.items() if p.soft]))
        chunks = [(soft, chunk) for soft, keys in batches for chunk in split(keys, lane.purger)]
        for i, (soft, chunk) in enumerate(chunks):
            lane.requests += 1
            try:
                await lane.purger.purge(chunk, soft=soft)
            except PurgeFailed as exc:
                rest = [key for _, later in chunks[i:] for key in later]
                self._failed(lane, exc, rest, taken)
                return
            except Exception as exc:  # noqa: BLE001 - an adapter's bug: retried like a failure
                rest = [key for _, later in chunks[i:] for key in later]
                failure = PurgeFailed(f"{type(exc).__name__}: {exc}", kind=type(exc).__name__)
                self._failed(lane, failure, rest, taken)
                return
            self._succeeded(lane, len(chunk))

    def _succeeded(self, lane: _Lane, n: int) -> None:
        with self._lock:
            self._count(lane, "sent", n)
            lane.last_sent_at = self.clock()
            recovered = lane.failing_since is not None
            lane.delay, lane.failing_since = 0.0, None
        if recovered:
            logger.warning("%s purges succeed again", lane.name)

    def _failed(self, lane: _Lane, exc: PurgeFailed, keys: list[str], taken: dict[str, _Pending]) -> None:
        """Count and log a failed request for ``keys`` (it and the batches after it)."""
        now = self.clock()
        with self._lock:
            lane.last_error, lane.last_error_kind, lane.last_error_at = str(exc), exc.kind, now
            if lane.failing_since is None:
                lane.failing_since = now
            if exc.retry:
                lane.delay = min(lane.delay * 2, self.max_retry) if lane.delay else self.first_retry
                self._count(lane, "retried", len(keys))
                self._requeue(lane, {k: taken[k] for k in keys}, locked=True)
                what = f"{len(keys)} keys; next attempt in {lane.delay:g}s"
            else:
                self._count(lane, "failed", len(keys))
                what = f"{len(keys)} keys not purged; not retried: the same request would fail again"
            due = lane.logged_at is None or now - lane.logged_at >= LOG_EVERY
            unlogged = lane.unlogged
            if due:
                lane.logged_at, lane.unlogged = now, 0
            else:
                lane.unlogged += 1
        if due:
            more = f"; {unlogged} more failures since the last line" if unlogged else ""
            logger.error(
                "%s PURGE FAILED %s: %s (%s; logged at most once a minute per CDN%s)",
                lane.name,
                exc.kind,
                exc,
                what,
                more,
                extra=log_fields("PURGE_FAILED", lane.name, reason=exc.kind, message=str(exc), details=what),
            )

    def _requeue(self, lane: _Lane, keys: dict[str, _Pending], *, locked: bool = False) -> None:
        """Put ``keys`` back, keeping when each was first queued and whether any was hard."""
        if not locked:
            with self._lock:
                self._requeue(lane, keys, locked=True)
            return
        for key, pending in keys.items():
            found = lane.pending.get(key)
            if found is None:
                lane.pending[key] = pending
            else:
                found.soft = found.soft and pending.soft
                found.since = min(found.since, pending.since)

    def _count(self, lane: _Lane, result: str, n: int) -> None:
        lane.counts[result] += n
        if self.on_count is not None and n:
            try:
                self.on_count(lane.name, result, n)
            except Exception:  # noqa: BLE001 - counting must never stop a purge
                logger.debug("pyisr: counting a purge failed", exc_info=True)

    # -- waiting and stopping -----------------------------------------------------------------

    def pending(self) -> int:
        """Keys not purged yet, summed over the CDNs (queued, in flight or waiting for a retry)."""
        with self._lock:
            return sum(len(lane.pending) + lane.in_flight for lane in self._lanes)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every key added so far was sent, failed or dropped; False on timeout.

        Keys that keep failing are retried meanwhile: with a CDN down, this waits the
        whole ``timeout``.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("flush() was called on the purge queue's own thread")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._settled:
            while any(lane.pending or lane.in_flight for lane in self._lanes):
                if self._thread is None or not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._settled.wait(1.0 if remaining is None else min(remaining, 1.0))
        return True

    async def aflush(self, timeout: float | None = None) -> bool:
        """:meth:`flush` from async code, without blocking the caller's loop."""
        return await asyncio.to_thread(self.flush, timeout)

    def close(self, timeout: float = CLOSE_WAIT) -> None:
        """Flush for at most ``timeout`` seconds, drop what is left (saying so), stop the thread."""
        if self._closed:
            return
        self.flush(timeout)
        with self._lock:
            self._closed = True
            loop, thread = self._loop, self._thread
            for lane in self._lanes:
                left = len(lane.pending) + lane.in_flight
                if left:
                    self._count(lane, "dropped", left)
                    logger.error(
                        "%s PURGE DROPPED %d keys at shutdown (%s)",
                        lane.name,
                        left,
                        lane.last_error or "still pending",
                        extra=log_fields("PURGE_DROPPED", lane.name, keys=left),
                    )
                lane.pending.clear()
        _open_queues.discard(self)
        if loop is None or thread is None or not thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), loop).result(timeout=2.0)
        except Exception:  # noqa: BLE001 - a stuck adapter must not hold up a shutdown
            logger.debug("pyisr: closing the CDN adapters failed", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=2.0)
        if not thread.is_alive():
            loop.close()

    async def aclose(self, timeout: float = CLOSE_WAIT) -> None:
        """:meth:`close` from async code (an engine's or a server's shutdown)."""
        await asyncio.to_thread(self.close, timeout)

    async def _stop(self) -> None:
        tasks = [lane.task for lane in self._lanes if lane.task is not None and not lane.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self._lanes:
            try:
                await lane.purger.close()
            except Exception:  # noqa: BLE001
                logger.debug("pyisr: closing %s failed", lane.name, exc_info=True)

    def _forget(self) -> None:
        """After ``fork``: the thread and its loop stayed in the parent, and so do its keys."""
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._loop = self._thread = None
        for lane in self._lanes:
            lane.pending, lane.in_flight, lane.task = {}, 0, None

    # -- health ---------------------------------------------------------------------------------

    def health(self) -> dict[str, dict[str, Any]]:
        """Per CDN (by name): its counts in keys, requests, pending keys, the last error."""
        with self._lock:
            return {lane.name: self._lane_health(lane, private=True) for lane in self._lanes}

    def public_health(self) -> list[dict[str, Any]]:
        """What anyone may see: per CDN its scheme, counts and the kind of its last error."""
        with self._lock:
            return [self._lane_health(lane, private=False) for lane in self._lanes]

    def _lane_health(self, lane: _Lane, *, private: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"cdn": lane.kind, **lane.counts, "pending": len(lane.pending) + lane.in_flight}
        out["last_error"] = lane.last_error_kind
        if private:
            out.update(
                requests=lane.requests,
                last_error=lane.last_error,
                last_error_kind=lane.last_error_kind,
                last_error_at=lane.last_error_at,
                failing_since=lane.failing_since,
                last_sent_at=lane.last_sent_at,
                next_retry_in=lane.delay or None,
            )
        return out

    def degraded_reasons(self) -> list[str]:
        """A sentence per CDN whose purges fail now (fit to show anyone: its scheme, the kind)."""
        now = self.clock()
        with self._lock:
            return [
                f"purges at the {lane.kind} CDN have failed for {now - lane.failing_since:.0f}s "
                f"({lane.last_error_kind}): it may serve pages pyisr has invalidated"
                for lane in self._lanes
                if lane.failing_since is not None
            ]


def split(keys: Sequence[str], purger: EdgePurger) -> Iterator[list[str]]:
    """``keys`` in chunks of at most ``purger.max_keys`` keys and ``purger.max_bytes`` bytes
    (each key counted with one separator)."""
    limit = max(1, purger.max_keys)
    budget = purger.max_bytes
    chunk: list[str] = []
    used = 0
    for key in keys:
        size = len(key.encode()) + 1
        if chunk and (len(chunk) >= limit or (budget is not None and used + size > budget)):
            yield chunk
            chunk, used = [], 0
        chunk.append(key)
        used += size
    if chunk:
        yield chunk


#: Every queue not closed: flushed at exit, forgotten in a forked child.
_open_queues: weakref.WeakSet[PurgeQueue] = weakref.WeakSet()


def flush_all(timeout: float = EXIT_WAIT) -> bool:
    """Flush every open queue within ``timeout`` seconds in all (the process is ending)."""
    deadline = time.monotonic() + timeout
    done = True
    for queue in list(_open_queues):
        if not queue.pending():
            continue
        if not queue.flush(max(0.0, deadline - time.monotonic())):
            done = False
            logger.error(
                "pyisr: %d keys were not purged at %s before the process ended",
                queue.pending(),
                ", ".join(queue.names),
            )
    return done


atexit.register(flush_all)
if hasattr(os, "register_at_fork"):

    def _after_fork() -> None:
        for queue in list(_open_queues):
            queue._forget()

    os.register_at_fork(after_in_child=_after_fork)
