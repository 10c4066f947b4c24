"""What the engine and the server did, counted in memory and reported in batches.

Every answer, regeneration, invalidation and store failure is one call here. The call
only adds to plain in-process counters: the HIT path must not get slower for being
watched, so nothing here writes a file, takes a lock or formats a line per request
(the server's fast path counts on its ready answers instead and is collected from,
see :meth:`Events.add_source`). Every :data:`REPORT_EVERY` seconds the counts since the
last report are taken as one :class:`Delta` and handed to

* the store, as an :class:`~pyisr.cache.activity.ActivityReport` (hits per key, counts
  per minute: what ``pyisr cache`` and the dashboard read, added up across processes);
* each sink (:class:`Sink`): the Prometheus metrics (:mod:`pyisr.metrics`).

Labels are route patterns (``/blog/[id]``), never raw paths, so their number is bounded
by the site's routes whatever visitors request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pyisr.cache.activity import ActivityReport, Invalidation
from pyisr.cache.entry import EntryKind
from pyisr.recent_hits import RecentHits
from pyisr.render import RenderPolicy

if TYPE_CHECKING:
    from pyisr.cache.handler import CacheHandler

logger = logging.getLogger("pyisr.cache")

#: Seconds between two reports to the store and the sinks.
REPORT_EVERY = 5.0
#: Regeneration timings kept between two reports (a burst beyond it is counted, not timed).
MAX_TIMINGS = 10_000
#: Keys whose hits are counted between two reports (the rest wait for the next one).
MAX_KEYS_PER_REPORT = 50_000

#: What :meth:`Events.regenerated` is told, as ``result``.
RESULTS = (
    "ok",  # rendered and stored
    "failed",  # the render raised: the last good entry stays served
    "timeout",  # the render ran past render_timeout
    "refused",  # no render slot: every one is held by a stuck render
    "uncached",  # an expected outcome that is never cached (a fetch answered 404)
    "unstored",  # rendered, but the store refused it
    "fenced",  # rendered, but a newer entry was stored meanwhile
    "private",  # rendered for its visitor only (a cookie, a session): not stored
    "adopted",  # another process rendered it meanwhile: no render here
    "skipped",  # another process is rendering it: nothing done here
)

#: A source of counts made elsewhere (the fast path): yields ``(key, route, status, n)``.
Source = Callable[[], Iterable[tuple[str, str, str, int]]]


@dataclass(slots=True)
class Regeneration:
    """One render's outcome, for the histogram and the per-minute counts."""

    route: str
    result: str
    seconds: float


@dataclass(slots=True)
class Delta:
    """Everything counted since the previous report."""

    #: ``(cache status, route)`` → answers (HIT, STALE, MISS, BYPASS, PRIVATE, …).
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Key → answers HIT or STALE (the store's hit counts).
    hits: dict[str, int] = field(default_factory=dict)
    regenerations: list[Regeneration] = field(default_factory=list)
    #: Regenerations beyond :data:`MAX_TIMINGS`, by ``(route, result)``: counted, not timed.
    untimed: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Invalidation kind (tag, path, page, layout, regenerate) → count.
    invalidations: dict[str, int] = field(default_factory=dict)
    #: Store operation (``set``, ``lock``, …) → failures.
    store_errors: dict[str, int] = field(default_factory=dict)
    #: ``(cdn, result)`` → keys purged at the edge (pyisr.cdn.queue: sent, failed, retried, dropped).
    cdn_purges: dict[tuple[str, str], int] = field(default_factory=dict)
    activity: ActivityReport = field(default_factory=ActivityReport)


def route_label(policy: RenderPolicy) -> str:
    """The ``route`` label of a render or an answer: its route pattern, ``data`` for the data
    cache, ``other`` when the caller named none (never a raw path: labels must stay few)."""
    if policy.kind is EntryKind.DATA:
        return "data"
    return policy.route or "other"


class Sink(Protocol):
    """Receives every report (the metrics); must not raise, must not block for long."""

    def report(self, delta: Delta) -> None: ...


#: Cache statuses counted as hits (a hit ratio's numerator) and as misses, per minute.
_MINUTE_OF_STATUS = {"HIT": "hits", "STALE": "stale", "MISS": "misses"}


class Events:
    """One engine's counters. ``clock`` is the engine's (epoch seconds; tests pass a fake one)."""

    def __init__(
        self, clock: Callable[[], float], handler: CacheHandler, *, report_every: float = REPORT_EVERY
    ) -> None:
        self.clock = clock
        #: The store reports go to (the engine's handler).
        self.handler = handler
        self.report_every = report_every
        self.sinks: list[Sink] = []
        self._sources: list[Source] = []
        self._delta = Delta()
        self._reported_at = time.monotonic()
        self._reporting: asyncio.Task[None] | None = None
        #: CDN purges are counted on the purge queue's thread, hence under a lock of their own.
        self._cdn_lock = threading.Lock()
        self._cdn_purges: dict[tuple[str, str], int] = {}
        #: Hits per key in this process, the older the less (what a re-warm orders by).
        self.recent = RecentHits()

    # -- counting (cheap: called on every answer) ---------------------------------------------

    def served(self, key: str, route: str, status: str) -> None:
        """One answer to a visitor for ``key`` (a page's route pattern), with its cache status.

        Called by whoever answers (the site server, the integrations) on every request
        that reaches the engine: two dictionary additions and a clock read.
        """
        delta = self._delta
        slot = (status, route)
        delta.requests[slot] = delta.requests.get(slot, 0) + 1
        if status == "HIT" or status == "STALE":
            hits = delta.hits
            if key in hits or len(hits) < MAX_KEYS_PER_REPORT:
                hits[key] = hits.get(key, 0) + 1
        if time.monotonic() - self._reported_at >= self.report_every:
            self.report_soon()

    def regenerated(self, route: str, result: str, seconds: float) -> None:
        """One regeneration ended with ``result`` (see :data:`RESULTS`) after ``seconds``."""
        delta = self._delta
        if len(delta.regenerations) < MAX_TIMINGS:
            delta.regenerations.append(Regeneration(route, result, seconds))
        else:
            slot = (route, result)
            delta.untimed[slot] = delta.untimed.get(slot, 0) + 1
        now = self.clock()
        if result in ("failed", "timeout", "refused"):
            delta.activity.count(now, "failures")
        elif result in ("ok", "unstored", "fenced", "private"):
            delta.activity.count(now, "regenerations")

    def invalidated(self, invalidation: Invalidation) -> None:
        delta = self._delta
        delta.invalidations[invalidation.kind] = delta.invalidations.get(invalidation.kind, 0) + 1
        delta.activity.count(invalidation.at, "invalidations")

    def cdn_purged(self, cdn: str, result: str, n: int) -> None:
        """``n`` keys' purges at ``cdn`` ended with ``result`` (called from the purge queue's thread)."""
        with self._cdn_lock:
            slot = (cdn, result)
            self._cdn_purges[slot] = self._cdn_purges.get(slot, 0) + n

    def store_error(self, op: str) -> None:
        errors = self._delta.store_errors
        errors[op] = errors.get(op, 0) + 1

    # -- reporting ----------------------------------------------------------------------------

    def add_source(self, source: Source) -> None:
        """Counts made elsewhere, collected at each report (the fast path's ready answers)."""
        self._sources.append(source)

    def take(self) -> Delta:
        """Everything counted since the last call (sources included), and start over.

        Answers are put in the minute of the take, not of each request: a report is due
        every few seconds, and the per-minute counts need no clock read per request.
        """
        delta, self._delta = self._delta, Delta()
        with self._cdn_lock:
            delta.cdn_purges, self._cdn_purges = self._cdn_purges, {}
        self._reported_at = time.monotonic()
        self._fold_sources(delta)
        activity = delta.activity
        now = self.clock()
        self.recent.add(delta.hits, now)
        for key, n in delta.hits.items():
            activity.hits[key] = n
        for (status, _route), n in delta.requests.items():
            minute = _MINUTE_OF_STATUS.get(status)
            if minute is not None:
                activity.count(now, minute, n)
        return delta

    def _fold_sources(self, delta: Delta) -> None:
        """Add what the sources counted since they were last asked to ``delta``."""
        for source in self._sources:
            for key, route, status, n in source():
                slot = (status, route)
                delta.requests[slot] = delta.requests.get(slot, 0) + n
                if key in delta.hits or len(delta.hits) < MAX_KEYS_PER_REPORT:
                    delta.hits[key] = delta.hits.get(key, 0) + n

    def recent_hits(self) -> dict[str, float]:
        """This process's hits per key, each counting less as it ages (:mod:`pyisr.recent_hits`),
        the ones not taken yet included at full weight: what a re-warm (pyisr.rewarm)
        orders by.

        The sources' counts move into the pending ones, so the next report still has them.
        """
        self._fold_sources(self._delta)
        hits = self.recent.counts(self.clock())
        for key, n in self._delta.hits.items():
            hits[key] = hits.get(key, 0.0) + n
        return hits

    def due(self) -> bool:
        return time.monotonic() - self._reported_at >= self.report_every

    async def report(self) -> None:
        """Hand what was counted to the sinks and the store; a failure is logged, never raised."""
        handler = self.handler
        delta = self.take()
        for sink in self.sinks:
            try:
                sink.report(delta)
            except Exception as exc:  # noqa: BLE001 - watching must never break serving
                logger.warning("pyisr: reporting to %r failed: %s: %s", sink, type(exc).__name__, exc)
        if delta.activity:
            try:
                await handler.add_activity(delta.activity, self.clock())
            except Exception as exc:  # noqa: BLE001
                self.store_error("activity")
                logger.debug("pyisr: storing activity failed: %s: %s", type(exc).__name__, exc)

    def report_soon(self) -> None:
        """Report in the background unless one runs (called from the engine's loop)."""
        if self._reporting is not None and not self._reporting.done():
            return
        self._reported_at = time.monotonic()
        try:
            self._reporting = asyncio.get_running_loop().create_task(self.report())
        except RuntimeError:
            return  # no loop: the next call from one reports

    async def run(self) -> None:
        """Report every :attr:`report_every` seconds until cancelled (a server's background task)."""
        try:
            while True:
                await asyncio.sleep(self.report_every)
                await self.report()
        finally:
            await asyncio.shield(self.report())
