"""The ISR state machine (DESIGN.md, "The engine's state machine").

Given a key, a render callable and a policy, :meth:`Engine.get` answers with an entry
and how it was obtained:

- fresh → HIT;
- stale (past its window, or one of its tags marked stale) → the stale entry now
  (STALE) and one background regeneration;
- past its ``expire`` → treated as missing: never served;
- missing or tag-invalidated → render now, concurrent callers share that render (MISS);
- missing and not allowed → NOT_ALLOWED (the server answers 404);
- missing with ``fallback: True`` → FALLBACK and a background render;
- a render that belongs to its visitor (it sets a cookie, says ``private``/``no-store``
  or ``Vary: *``, or its framework saw it use a session or CSRF token) → PRIVATE: never
  stored; the caller answers it to its own visitor, and the key stays private for
  :data:`PRIVATE_RETRY` seconds before a shared render is tried again.

It knows nothing of HTTP. Renders run under a timeout and a concurrency limit, sync
ones on the engine's own threads (:mod:`pyisr.render_slots`); when every render slot is
held by a render stuck past its timeout, a page that must render fails at once
(:class:`RenderSlotsExhausted`) while cached pages are still served. A failed render
never replaces a good entry: the old one is kept, marked with the failure and a back-off,
and answered STALE (``regeneration_failed``) until the next attempt. A render the store
refuses (disk full, read-only, down) is still answered, and the failure is counted for
:meth:`Engine.health` and logged once a minute per reason (:mod:`pyisr.incidents`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyisr.cache.activity import Invalidation
from pyisr.cache.entry import UNSET, CacheEntry
from pyisr.cache.handler import CacheHandler, as_handler
from pyisr.cache.tags import key_tag, stale_tag, tags_for_revalidate_path, validate_tags
from pyisr.cdn.keys import CACHE_TAG, SURROGATE_KEY
from pyisr.events import Events
from pyisr.incidents import Incidents
from pyisr.log import CacheLog
from pyisr.loop_local import LoopLocal
from pyisr.private_keys import PRIVATE_RETRY, PrivateKeys
from pyisr.provenance import current_source
from pyisr.regeneration import (
    FORCED,
    Made,
    Mode,
    PrivateRender,
    Regenerator,
    answers_fresh,
    past_window,
)
from pyisr.render import (
    DEFAULT_POLICY,
    CacheStatus,
    NoPageError,
    NotShareable,
    OnMissing,
    Rendered,
    RenderFailed,
    RenderFn,
    RenderPolicy,
    RenderSlotsExhausted,
    RenderTimeout,
    Resolver,
    RevalidationError,
    Served,
    window_end,
)
from pyisr.render_slots import RenderSlots

if TYPE_CHECKING:
    from pyisr.app_builds import AppBuild
    from pyisr.cdn.queue import PurgeQueue

logger = logging.getLogger("pyisr")

#: Told of an invalidation after the store has it (:meth:`Engine.on_invalidation`).
InvalidationListener = Callable[[Invalidation], None]


@dataclass
class _LoopState:
    """Single-flight maps belong to one event loop (render slots to the process)."""

    inflight: dict[tuple[str, str], asyncio.Task[Made]] = field(default_factory=dict)
    background: set[asyncio.Task[Any]] = field(default_factory=set)


class Engine(Regenerator):
    """Serves cache entries with stale-while-revalidate over a :class:`CacheHandler`.

    ``clock`` returns wall-clock epoch seconds; tests pass a fake one.
    """

    def __init__(
        self,
        handler: object,
        *,
        clock: Callable[[], float] = time.time,
        render_timeout: float = 30.0,
        max_concurrent_renders: int = 16,
        lock_poll: float = 0.02,
        debug: bool | None = None,
        cdn_tag_headers: tuple[str, ...] = (SURROGATE_KEY, CACHE_TAG),
        compress: bool = True,
        rewarm_rate: float = 0.0,
    ) -> None:
        if render_timeout <= 0:
            raise ValueError(f"render_timeout must be > 0 seconds, not {render_timeout!r}")
        if max_concurrent_renders < 1:
            raise ValueError(f"max_concurrent_renders must be >= 1, not {max_concurrent_renders!r}")
        if not 0 <= rewarm_rate < math.inf:
            raise ValueError(f"rewarm_rate must be >= 0 pages per second, not {rewarm_rate!r}")
        self.handler: CacheHandler = as_handler(handler)
        self.clock = clock
        self.render_timeout = render_timeout
        self.max_concurrent_renders = max_concurrent_renders
        self.lock_ttl = render_timeout + 5.0
        self.lock_poll = lock_poll
        self.log = CacheLog(debug)
        #: What this engine did, counted for the store's activity record and the metrics.
        self.events = Events(clock, self.handler)
        #: The render limit and the render threads; a refused render is told to come back
        #: after the render timeout, by when every render running now has ended or is stuck.
        self.slots = RenderSlots(max_concurrent_renders, retry_after=max(1, math.ceil(render_timeout)))
        #: Writes (and locks) the store refused, per reason: for health, logged once a minute.
        self.store_failures = Incidents(clock, "store", on_record=self.events.store_error)
        self._refusals = Incidents(clock, "render")
        self._states: LoopLocal[_LoopState] = LoopLocal(_LoopState)
        #: Keys whose last shared render belonged to its visitor (see pyisr.private_keys).
        self._private = PrivateKeys(self.clock)
        #: Who can regenerate a path (``revalidate(path)``): the site and each integration
        #: using this engine add theirs; asked in the order they were added.
        self._resolvers: dict[Resolver, None] = {}
        #: Headers that carry an answer's tags to a CDN (``cdn_tag_headers``; pyisr.cdn.keys).
        self.cdn_tag_headers = cdn_tag_headers
        #: Store gzip and brotli encodings of text pages with them, and serve them to the
        #: requests that accept them (``compress``; pyisr.compression).
        self.compress = compress
        #: Pages a second re-warmed after a wide invalidation by the integrations that
        #: start a re-warmer from the engine (Django, Flask: pyisr.rewarm's
        #: ``rewarm_in_background``); ``configure()`` sets it from the settings, and an
        #: engine made by hand re-warms nothing unless given one. The site server and
        #: the ASGI middleware have their own setting.
        self.rewarm_rate = rewarm_rate
        #: The build whose pages this engine serves, named on every cacheable answer as an
        #: edge key so a deploy can purge it (pyisr.cdn.deploys); set by the site server,
        #: and by ``configure(build_id=)`` for an app.
        self.edge_build: str | None = None
        #: An app's build (``configure(build_id=)``): its record of the builds that
        #: served, and its purges (pyisr.app_builds); ``None`` for a site's server,
        #: whose builds are pyisr.deploys'.
        self.app_build: AppBuild | None = None
        #: Told of every invalidation once this engine's store has it (pyisr.cdn's purges,
        #: pyisr.rewarm): called on the engine's loop, they must return at once.
        self._invalidation_listeners: list[InvalidationListener] = []
        #: Told the key of a page marked stale once a background regeneration replaced it
        #: (:meth:`~pyisr.regeneration.Regenerator.on_stale_replaced`).
        self._stale_replaced: list[Callable[[str], None]] = []
        #: The purges of the CDNs in front of this engine's pages (pyisr.cdn.attach_cdn).
        self.cdn: PurgeQueue | None = None

    def _state(self) -> _LoopState:
        return self._states.get()

    # -- who hears of invalidations --------------------------------------------------------

    def on_invalidation(self, listener: InvalidationListener) -> None:
        """Call ``listener`` after each invalidation this engine makes has reached the store.

        For a tag, a path, a pattern or a layout: once the tag times are written. For
        ``revalidate(path)``: once the new entry is stored, as an ``Invalidation`` of kind
        ``regenerate`` whose tags are the key's own tag (``key_tag``). A listener that
        raises is logged and never fails the caller.
        """
        self._invalidation_listeners.append(listener)

    def _tell(self, invalidation: Invalidation) -> None:
        for listener in self._invalidation_listeners:
            try:
                listener(invalidation)
            except Exception as exc:  # noqa: BLE001 - the invalidation itself is done
                logger.error("an invalidation listener failed: %s: %s", type(exc).__name__, exc, exc_info=exc)

    # -- who can regenerate a path ----------------------------------------------------------

    def add_resolver(self, resolver: Resolver) -> None:
        """Let ``revalidate(path)`` regenerate the paths ``resolver`` knows (idempotent)."""
        self._resolvers[resolver] = None

    @property
    def has_resolvers(self) -> bool:
        return bool(self._resolvers)

    def resolvers(self) -> list[Resolver]:
        return list(self._resolvers)

    async def resolve(self, key: str) -> tuple[str, RenderFn, RenderPolicy] | None:
        """What to render for ``key``: the first resolver's answer, or ``None``."""
        for resolver in list(self._resolvers):
            found = await resolver(key)
            if found is not None:
                return found
        return None

    async def get(self, key: str, render: RenderFn, policy: RenderPolicy = DEFAULT_POLICY) -> Served:
        """Answer one request for ``key``. Raises what the render raised when nothing is cached.

        The caller that answers a visitor with it tells :attr:`events` (``served``): data
        reads come here too, and are parts of a page's render, not answers.
        """
        if self._private and key in self._private:
            self.log.decision(key, "PRIVATE", "its last shared render belonged to its visitor")
            return Served(None, CacheStatus.PRIVATE)
        entry = await self.handler.get(key)
        now = self.clock()
        if entry is not None and entry.is_expired(now):
            # Past ``expire``: never served, whatever else holds (SPEC S-67).
            self.log.decision(key, "EXPIRED", f"age={entry.age(now)}s expire={entry.expire}")
            entry = None
        if entry is not None:
            times = await self._tag_times_for(entry, policy)
            if entry.is_invalidated(times, also=policy.soft_tags):
                if self._in_failure_backoff(entry, times, now):
                    self.log.decision(key, "STALE", "invalidated; last regeneration failed, in back-off")
                    return Served(entry, CacheStatus.STALE, regeneration_failed=True)
                self.log.decision(key, "INVALIDATED", "tag revalidated after the entry was made")
                return await self._blocking(key, render, policy, previous=entry)
            marked = entry.is_marked_stale(times, also=policy.soft_tags)
            if marked or past_window(entry, now):
                if entry.retry_at is not None and now < entry.retry_at:
                    # Its regeneration failed: old (STALE, and said so), but not retried yet.
                    wait = entry.retry_at - now
                    self.log.decision(
                        key,
                        "STALE",
                        f"age={entry.age(now)}s; regeneration failed, next attempt in {wait:.1f}s",
                    )
                    return Served(entry, CacheStatus.STALE, regeneration_failed=True)
                if policy.stale_blocks:
                    return await self._blocking(key, render, policy, previous=entry)
                why = "a tag was marked stale" if marked else f"revalidate={entry.revalidate}"
                self.log.decision(key, "STALE", f"age={entry.age(now)}s {why}")
                self._start_background(key, render, policy, entry)
                return Served(entry, CacheStatus.STALE)
            self.log.decision(key, "HIT", f"age={entry.age(now)}s")
            return Served(entry, CacheStatus.HIT)
        if policy.on_missing is OnMissing.NOT_FOUND:
            self.log.decision(key, "NOT_ALLOWED", "not prerendered and the route renders no unknown paths")
            return Served(None, CacheStatus.NOT_ALLOWED)
        if policy.on_missing is OnMissing.FALLBACK:
            self.log.decision(key, "FALLBACK", "serving the fallback shell; rendering in the background")
            self._start_background(key, render, policy, None)
            return Served(None, CacheStatus.FALLBACK)
        return await self._blocking(key, render, policy, previous=None)

    def is_private(self, key: str) -> bool:
        """Whether ``key`` is being served per visitor now (its last shared render was private)."""
        return bool(self._private) and key in self._private

    def _in_failure_backoff(self, entry: CacheEntry, times: Mapping[str, float], now: float) -> bool:
        """An invalidated entry whose re-render failed after the invalidation is kept for its back-off."""
        failure = entry.last_failure
        if failure is None or entry.retry_at is None or now >= entry.retry_at:
            return False
        newest = max((times.get(t, float("-inf")) for t in entry.tags), default=float("-inf"))
        return failure.at >= newest

    async def _blocking(
        self, key: str, render: RenderFn, policy: RenderPolicy, previous: CacheEntry | None
    ) -> Served:
        task, started = self._flight(key, render, policy, previous, Mode.BLOCKING)
        try:
            made = await asyncio.shield(task)
        except PrivateRender as private:
            # Only the caller whose request started the render may see it; others that
            # joined render for their own visitor.
            return Served(private.entry if started else None, CacheStatus.PRIVATE)
        except Exception:
            if previous is not None and not policy.stale_blocks:
                # Keep serving the last good entry (the failure is logged and recorded).
                # Not while a page regenerates: its data must not hide a failure, so the
                # page's regeneration fails and the last good *page* stays instead.
                return Served(previous, CacheStatus.STALE, regeneration_failed=True)
            raise
        if made.skipped:
            # It joined a background regeneration (a re-warm) that found the key locked by
            # another process: its previous entry is no answer; wait like any request.
            return await self._blocking(key, render, policy, previous)
        if made.entry.revalidate == 0:
            return Served(made.entry, CacheStatus.BYPASS)
        return Served(made.entry, CacheStatus.MISS, stored=made.stored)

    def _flight(
        self,
        key: str,
        render: RenderFn,
        policy: RenderPolicy,
        previous: CacheEntry | None,
        mode: Mode,
    ) -> tuple[asyncio.Task[Made], bool]:
        """The one render of ``key`` in this loop: join it if it runs, start it if not.

        Also says whether this call started it.
        """
        state = self._state()
        # On-demand revalidation must not join a normal render that started earlier.
        lane = "on_demand" if mode in FORCED else "normal"
        task = state.inflight.get((key, lane))
        if task is not None:
            return task, False
        task = asyncio.create_task(self._regenerate(key, render, policy, previous, mode))
        state.inflight[(key, lane)] = task

        def _done(t: asyncio.Task[Made], slot: tuple[str, str] = (key, lane)) -> None:
            if state.inflight.get(slot) is t:
                del state.inflight[slot]
            if not t.cancelled():
                t.exception()  # retrieved: failures are logged where they happen

        task.add_done_callback(_done)
        return task, True

    def _start_background(
        self, key: str, render: RenderFn, policy: RenderPolicy, previous: CacheEntry | None
    ) -> None:
        state = self._state()
        if (key, "normal") in state.inflight:
            return
        task, _ = self._flight(key, render, policy, previous, Mode.BACKGROUND)
        state.background.add(task)
        task.add_done_callback(state.background.discard)

    def regenerating(self, key: str) -> bool:
        """Whether this loop is regenerating ``key`` in the background right now.

        While it is, a stale copy may be served without asking the engine again: the
        answer would be STALE and the regeneration is already under way.
        """
        state = self._states.peek()
        return state is not None and (key, "normal") in state.inflight

    async def rewarm(self, key: str, render: RenderFn, policy: RenderPolicy = DEFAULT_POLICY) -> Made | None:
        """Regenerate ``key`` in the background now if its entry needs it (:mod:`pyisr.rewarm`).

        The regeneration a STALE answer starts, awaited: this loop's single flight, the
        handler's lock (a key another process is rendering is skipped, ``Made.skipped``;
        one it stored meanwhile is adopted), counted in :attr:`events` like any. Unlike
        :meth:`revalidate_now` it records no invalidation and tells no listener: it is
        not one. Its render never takes the last free render slot. Returns ``None`` when
        nothing was needed: this loop is rendering the key already, or its entry is
        missing, expired, answers fresh or waits out a failed render's back-off (a
        missing page stays lazy). Raises what the render raised; the last good entry
        stays, marked with the failure.
        """
        state = self._state()
        if (key, "normal") in state.inflight:
            return None
        previous = await self.handler.get(key)
        now = self.clock()
        if previous is None or previous.is_expired(now):
            return None
        times = await self._tag_times_for(previous, policy)
        if answers_fresh(previous, times, policy, now):
            return None
        if previous.is_invalidated(times, also=policy.soft_tags):
            waiting = self._in_failure_backoff(previous, times, now)  # as get() decides
        else:
            waiting = previous.retry_at is not None and now < previous.retry_at
        if waiting:
            return None
        task, _ = self._flight(key, render, policy, previous, Mode.REWARM)
        state.background.add(task)  # drain() waits for it, as for a STALE answer's
        task.add_done_callback(state.background.discard)
        return await asyncio.shield(task)

    async def drain(self) -> None:
        """Wait for every background regeneration started in this loop (tests, shutdown)."""
        state = self._state()
        while state.background:
            await asyncio.gather(*list(state.background), return_exceptions=True)

    # -- health ---------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What the engine knows is wrong, JSON-able: store failures per reason, stuck renders,
        the CDN purges (per CDN; empty without one)."""
        now = time.monotonic()
        stuck = self.slots.stuck()
        return {
            "store_failures": self.store_failures.report(),
            "stuck_renders": [{"key": s.key, "running_for": round(now - s.started, 1)} for s in stuck],
            "render_slots": {
                "size": self.slots.size,
                "busy": self.slots.busy(),
                "stuck": len(stuck),
                "refused": self.slots.refused,
            },
            "cdn": self.cdn.health() if self.cdn is not None else {},
        }

    def degraded_reasons(self, *, edge: bool = True) -> list[str]:
        """Why this engine serves worse than it should now; empty when all is well.

        Fit to show anyone (a load balancer's health check): the exception type and errno
        name only, never a message, which may name files or hosts (:meth:`health` has them).
        ``edge=False`` leaves out failing CDN purges: they make the edge serve old pages,
        not this process serve worse (what a load balancer asks).
        """
        now = self.clock()
        reasons = [
            f"the cache store failed ({reason.split(':', 1)[0]}) {now - incident.last_at:.0f}s ago: "
            "pages are answered but not stored"
            for reason, incident in self.store_failures.recent().items()
        ]
        if self.slots.all_stuck():
            reasons.append(
                f"all {self.slots.size} render slots are held by renders stuck past their "
                f"{self.render_timeout:g}s timeout: pages that must render are answered 503"
            )
        if edge and self.cdn is not None:
            reasons += self.cdn.degraded_reasons()
        return reasons

    # -- on-demand ----------------------------------------------------------------------

    async def revalidate_now(
        self,
        key: str,
        render: RenderFn,
        policy: RenderPolicy = DEFAULT_POLICY,
        *,
        prerender: bool = False,
        by: str | None = None,
    ) -> CacheEntry:
        """Regenerate ``key`` now and return only once it is stored (``res.revalidate``).

        Raises :class:`RevalidationError` if the render fails; the old entry stays served.
        ``prerender=True`` is for a build filling a store nobody serves yet: there is no
        previous entry to read and no other process holding a copy to tell. ``by`` says
        who asked, for the store's record of invalidations (else the calling code).
        """
        by = by or current_source()
        previous = None if prerender else await self.handler.get(key)
        mode = Mode.PRERENDER if prerender else Mode.ON_DEMAND
        if not prerender:
            await self._record(Invalidation(self.clock(), "regenerate", key, (), by))
        task, _ = self._flight(key, render, policy, previous, mode)
        try:
            entry = (await asyncio.shield(task)).entry
        except PrivateRender as exc:
            raise NotShareable(
                f"Failed to revalidate {key}: {policy.route or key} {exc.reason}, so it is served uncached"
            ) from None
        except RenderSlotsExhausted as exc:
            raise RenderSlotsExhausted(f"Failed to revalidate {key}: {exc}", exc.retry_after) from exc
        except Exception as exc:
            raise RevalidationError(f"Failed to revalidate {key}: {exc}") from exc
        if not prerender:
            self._tell(Invalidation(self.clock(), "regenerate", key, (key_tag(key),), by))
        return entry

    async def revalidate_tags(
        self,
        tags: Iterable[str],
        *,
        stale: bool = False,
        kind: str = "tag",
        target: str | None = None,
        by: str | None = None,
    ) -> None:
        """Mark every entry carrying any of ``tags``: one manifest write however many.

        By default they are invalidated: the next request of each waits for a fresh render
        (Next.js 15's ``revalidateTag``, 16's ``updateTag``). ``stale=True`` marks them
        stale instead (Next.js 16's ``revalidateTag(tag, "max")``): each is still answered
        at once, STALE, while one background render refreshes it at its next visit.

        The store keeps a record of it (:class:`~pyisr.cache.activity.Invalidation`):
        ``kind`` and ``target`` say what the caller named (a tag, a path, a route's pages,
        a layout), ``by`` who called (else :func:`pyisr.provenance.current_source`).
        """
        tags = list(tags)
        if not tags:
            return
        by = by or current_source()
        recorded = [stale_tag(t) for t in tags] if stale else tags
        at = self.clock()
        await self.handler.revalidate_tags(recorded, at)
        for tag in tags:
            self.log.decision(
                tag, "MARK_STALE" if stale else "INVALIDATE", f"tag revalidated by {by}", kind=kind, by=by
            )
        target = target if target is not None else " ".join(tags)
        invalidation = Invalidation(at, kind, target, tuple(tags), by, stale)
        self._tell(invalidation)
        await self._record(invalidation)

    async def _record(self, invalidation: Invalidation) -> None:
        """Count an invalidation and keep it in the store's record; a failure only costs the record."""
        self.events.invalidated(invalidation)
        try:
            await self.handler.record_invalidation(invalidation)
        except Exception as exc:  # noqa: BLE001 - the invalidation itself is done
            self.store_failures.record(exc, invalidation.target, "recording an invalidation", op="record")

    async def revalidate_tag(self, tag: str, *, stale: bool = False, by: str | None = None) -> None:
        """``revalidate_tag`` on this engine (what :func:`pyisr.arevalidate_tag` calls)."""
        tags = validate_tags([tag], where="revalidate_tag()")
        await self.revalidate_tags(tags, stale=stale, kind="tag", target=tag, by=by)

    async def revalidate_path(
        self,
        path: str,
        type: str | None = None,  # noqa: A002
        *,
        stale: bool = False,
        by: str | None = None,
    ) -> None:
        """``revalidate_path`` on this engine: a path, a route's pages, or a subtree."""
        kind = type if type in ("page", "layout") else "path"
        tags = tags_for_revalidate_path(path, type)
        await self.revalidate_tags(tags, stale=stale, kind=kind, target=path, by=by)

    async def inspect(self, key: str) -> CacheEntry | None:
        return await self.handler.reload(key)

    async def close(self) -> None:
        try:
            await self.drain()
        finally:
            self.slots.close()
            if self.cdn is not None:
                await self.cdn.aclose()  # its pending purges, for a few seconds at most
            await self.handler.close()


#: The engine's vocabulary (pyisr.render) and the shared sentinel, importable from here.
__all__ = [
    "DEFAULT_POLICY",
    "PRIVATE_RETRY",
    "UNSET",
    "CacheStatus",
    "Engine",
    "NoPageError",
    "NotShareable",
    "OnMissing",
    "RenderFailed",
    "RenderFn",
    "RenderPolicy",
    "RenderSlotsExhausted",
    "RenderTimeout",
    "Rendered",
    "Resolver",
    "RevalidationError",
    "Served",
    "window_end",
]
