"""How one regeneration runs: the lock, adopting another's render, rendering, storing.

The engine (:mod:`pyisr.engine`) decides *whether* a key is rendered and who waits for
it; this is the run itself. It takes the handler's cross-process lock (and goes on
without it when the store cannot lock), adopts an entry another process stored
meanwhile, renders under a render slot and the timeout (:mod:`pyisr.render_slots`),
and stores the result (with its gzip and brotli encodings, made here once:
:mod:`pyisr.compression`). A failed render marks the old entry with the failure and a
back-off; a result the store refuses is still returned (``Made.stored`` is ``False``)
and the refusal counted for health (:mod:`pyisr.incidents`). Nothing a store raises
while recording either of those turns a rendered page into an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import NamedTuple

from pyisr import context as render_context
from pyisr.cache.entry import CacheEntry, EntryKind
from pyisr.cache.handler import CacheHandler
from pyisr.cache.tags import PATH_TAG, with_stale_tags
from pyisr.compression import compress_entry
from pyisr.events import Events, route_label
from pyisr.incidents import Incidents
from pyisr.log import CacheLog
from pyisr.private_keys import PrivateKeys
from pyisr.render import (
    RenderFn,
    RenderPolicy,
    RenderSlotsExhausted,
    RenderTimeout,
    make_entry,
    private_reason,
    window_end,
)
from pyisr.render_slots import RenderSlots, run_render

logger = logging.getLogger("pyisr")


class PrivateRender(Exception):
    """A render that may not be shared; carries it for the one caller that asked for it."""

    def __init__(self, entry: CacheEntry, reason: str) -> None:
        super().__init__(reason)
        self.entry = entry
        self.reason = reason


class Mode(StrEnum):
    BLOCKING = "blocking"
    BACKGROUND = "background"
    ON_DEMAND = "on_demand"
    PRERENDER = "prerender"  # a build filling a store nobody serves yet
    #: A re-warm after a wide invalidation (pyisr.rewarm): a background regeneration whose
    #: render never takes the last free render slot, which stays for visitors.
    REWARM = "rewarm"


#: Modes that render whatever else has rendered meanwhile (they never adopt another's entry).
FORCED = frozenset({Mode.ON_DEMAND, Mode.PRERENDER})
#: Modes that replace an entry still served meanwhile: when it was marked stale, a cache in
#: front of pyisr may hold its answer (:meth:`Regenerator.on_stale_replaced`).
_REFRESHES = frozenset({Mode.BACKGROUND, Mode.REWARM})


class Made(NamedTuple):
    """What a regeneration gives: the entry, and whether the store kept it."""

    entry: CacheEntry
    stored: bool = True
    #: Nothing was done: another process holds the key's lock (a background regeneration
    #: skips it), so ``entry`` is the previous one, unchanged.
    skipped: bool = False


#: The "token" of a render that goes on without the handler's lock because the store
#: failed to lock (a read-only directory): rendering beats refusing the page.
UNLOCKED = ""


def backoff(entry: CacheEntry) -> float:
    """Next.js' back-off after a failed regeneration: ``clamp(revalidate, 3, 30)`` seconds."""
    return float(min(max(entry.revalidate or 3, 3), 30))


def past_window(entry: CacheEntry, now: float) -> bool:
    """Whether ``entry`` is answered STALE: its window is over, whatever its back-off says."""
    due = window_end(entry)
    return due is not None and now >= due


def answers_fresh(entry: CacheEntry, times: Mapping[str, float], policy: RenderPolicy, now: float) -> bool:
    """Whether ``entry`` would be answered HIT now: not expired, invalidated, marked stale
    by a tag or past its window."""
    return not (
        entry.is_expired(now)
        or entry.is_invalidated(times, also=policy.soft_tags)
        or entry.is_marked_stale(times, also=policy.soft_tags)
        or past_window(entry, now)
    )


class Regenerator:
    """The regeneration half of :class:`~pyisr.engine.Engine` (which sets these attributes)."""

    handler: CacheHandler
    clock: Callable[[], float]
    render_timeout: float
    lock_ttl: float
    lock_poll: float
    log: CacheLog
    slots: RenderSlots
    store_failures: Incidents
    _refusals: Incidents
    events: Events
    _private: PrivateKeys
    _stale_replaced: list[Callable[[str], None]]
    compress: bool

    async def _tag_times_for(self, entry: CacheEntry, policy: RenderPolicy) -> Mapping[str, float]:
        tags = entry.tags + policy.soft_tags if policy.soft_tags else entry.tags
        if not tags:
            return {}
        return await self.handler.tag_times(with_stale_tags(tags))

    def _usable(
        self,
        entry: CacheEntry | None,
        times: Mapping[str, float],
        policy: RenderPolicy,
        previous: CacheEntry | None,
        now: float,
    ) -> bool:
        if entry is None or not answers_fresh(entry, times, policy, now):
            return False
        return previous is None or entry.created_at > previous.created_at

    async def _adoptable(
        self, key: str, policy: RenderPolicy, previous: CacheEntry | None
    ) -> CacheEntry | None:
        """An entry another process stored since ``previous`` that makes our render needless."""
        current = await self.handler.reload(key)
        if current is None:
            return None
        times = await self._tag_times_for(current, policy)
        return current if self._usable(current, times, policy, previous, self.clock()) else None

    async def _regenerate(
        self,
        key: str,
        render: RenderFn,
        policy: RenderPolicy,
        previous: CacheEntry | None,
        mode: Mode,
    ) -> Made:
        # A build fills a store nobody serves yet: no lock (that spares it one per page).
        # On-demand regeneration takes the lock too, though it renders whatever else ran:
        # holding it keeps another process's background regeneration from starting while
        # it renders and storing a newer entry that this process's memory tier would
        # never hear of (fencing orders results, it does not tell other tiers).
        token = None if mode is Mode.PRERENDER else await self._lock(key)
        if token is None and mode in (Mode.BACKGROUND, Mode.REWARM):
            self.log.decision(
                key, "REGENERATE", "skipped: another process is regenerating it", route=route_label(policy)
            )
            self.events.regenerated(route_label(policy), "skipped", 0.0)
            if previous is None:
                raise RuntimeError(f"{key} is being rendered by another process")
            return Made(previous, skipped=True)
        if token is None and mode in (Mode.BLOCKING, Mode.ON_DEMAND):
            deadline = time.monotonic() + self.lock_ttl
            delay = self.lock_poll
            while token is None and time.monotonic() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.25)
                if mode is Mode.BLOCKING:
                    adopted = await self._adoptable(key, policy, previous)
                    if adopted is not None:
                        route = route_label(policy)
                        self.log.decision(key, "ADOPT", "rendered by another process", route=route)
                        self.events.regenerated(route_label(policy), "adopted", 0.0)
                        return Made(adopted)
                token = await self._lock(key)
        try:
            if mode not in FORCED and token is not None:
                adopted = await self._adoptable(key, policy, previous)
                if adopted is not None:
                    self.log.decision(key, "ADOPT", "rendered by another process", route=route_label(policy))
                    self.events.regenerated(route_label(policy), "adopted", 0.0)
                    return Made(adopted)
            return await self._render_and_store(key, render, policy, previous, mode)
        finally:
            if token:
                try:
                    await self.handler.release_lock(key, token)
                except Exception as exc:  # noqa: BLE001 - the lock expires by itself
                    self.store_failures.record(exc, key, "releasing the regeneration lock", op="unlock")

    async def _lock(self, key: str) -> str | None:
        """The handler's regeneration lock for ``key``: a token, or ``None`` if another holds it.

        A store that fails to lock (a read-only directory, a store that is down) must not
        stop the page from rendering: the render goes on without the lock.
        """
        try:
            return await self.handler.acquire_lock(key, self.lock_ttl)
        except Exception as exc:  # noqa: BLE001 - counted and logged once a minute
            self.store_failures.record(
                exc, key, "taking the regeneration lock; rendering without it", op="lock"
            )
            return UNLOCKED

    async def _render_and_store(
        self,
        key: str,
        render: RenderFn,
        policy: RenderPolicy,
        previous: CacheEntry | None,
        mode: Mode,
    ) -> Made:
        started_at = self.clock()
        t0 = time.perf_counter()
        ctx = render_context.RenderContext(
            engine=self,
            key=key,
            soft_tags=policy.tags if policy.kind is not EntryKind.DATA else policy.soft_tags,
            is_revalidating=previous is not None or mode in FORCED,
            page_revalidate=policy.revalidate,
        )
        if mode is Mode.PRERENDER:
            word = "PRERENDER"
        else:
            word = "REGENERATE" if previous is not None or mode is not Mode.BLOCKING else "MISS"
        try:
            # Data computes run inside page renders: if they took a slot of the limit too,
            # max_concurrent_renders pages waiting for their data would deadlock.
            slots = self.slots if policy.kind is not EntryKind.DATA else None
            spare = 1 if mode is Mode.REWARM else 0
            rendered = await run_render(render, ctx, slots, self.render_timeout, spare=spare)
            private = private_reason(rendered, policy)
            entry = make_entry(key, rendered, policy, ctx, started_at, private=private is not None)
        except Exception as exc:
            elapsed = (time.perf_counter() - t0) * 1000
            self.events.regenerated(route_label(policy), _result_of(exc), elapsed / 1000)
            await self._failed(key, exc, previous, word, elapsed, route_label(policy))
            raise
        elapsed = (time.perf_counter() - t0) * 1000
        if private is not None:
            self.events.regenerated(route_label(policy), "private", elapsed / 1000)
            self._private.mark(key, policy.route or key, private)
            self.log.decision(key, "PRIVATE", f"{private}: not stored")
            raise PrivateRender(entry, private)
        if self._private:
            self._private.forget(key)  # a shared render again: cache it as before
        if entry.revalidate == 0:
            self.log.decision(
                key,
                word,
                f"rendered in {elapsed:.1f}ms; revalidate=0, not cached",
                route=route_label(policy),
                duration_ms=round(elapsed, 1),
            )
            self.events.regenerated(route_label(policy), "ok", elapsed / 1000)
            return Made(entry)
        if self.compress:
            # Once per stored render, off the loop: every later answer serves these bytes.
            entry = await compress_entry(entry)
        made = await self._store(entry, mode, word, started_at, elapsed, route_label(policy))
        if self._stale_replaced and made.stored and previous is not None and mode in _REFRESHES:
            await self._tell_stale_replaced(previous, policy)
        return made

    def on_stale_replaced(self, listener: Callable[[str], None]) -> None:
        """Call ``listener`` with a page's key once a background regeneration (or a re-warm)
        stored a new entry in place of one a tag had marked stale.

        What a cache in front of pyisr needs (pyisr.cdn): while the page regenerated, it
        may have fetched the stale answer, and would keep it for a whole ``s-maxage``.
        Called on the engine's loop; it must return at once, and what it raises is logged.
        """
        self._stale_replaced.append(listener)

    async def _tell_stale_replaced(self, previous: CacheEntry, policy: RenderPolicy) -> None:
        if previous.kind is EntryKind.DATA:
            return  # the pages that read it were marked too, and tell their own
        try:
            marked = previous.is_marked_stale(await self._tag_times_for(previous, policy), policy.soft_tags)
        except Exception:  # noqa: BLE001 - the store's failure is counted where it matters
            return
        if not marked:
            return  # past its window only: its answers said so (Age), no cache kept them fresh
        for listener in self._stale_replaced:
            try:
                listener(previous.key)
            except Exception as exc:  # noqa: BLE001 - the regeneration itself is done
                logger.error(
                    "a stale-replaced listener failed: %s: %s", type(exc).__name__, exc, exc_info=exc
                )

    async def _failed(
        self,
        key: str,
        exc: Exception,
        previous: CacheEntry | None,
        word: str,
        elapsed: float,
        route: str | None = None,
    ) -> None:
        """Log a render that failed, and mark ``previous`` (kept in service) with it and a back-off."""
        if isinstance(exc, RenderSlotsExhausted):
            self._refusals.record(exc, key, f"{word.lower()} refused", reason=type(exc).__name__)
        elif getattr(exc, "pyisr_expected", False):
            # An outcome, not an error (a fetch that answered 404): never cached either.
            self.log.decision(
                key, "UNCACHED", f"{exc} after {elapsed:.0f}ms", route=route, duration_ms=round(elapsed, 1)
            )
        else:
            self.log.failure(
                key,
                "FAILED",
                exc,
                f"{word.lower()} after {elapsed:.0f}ms",
                route=route,
                duration_ms=round(elapsed, 1),
            )
        if previous is not None:
            failed = previous.with_failure(exc, self.clock(), backoff(previous))
            try:
                await self.handler.set(failed)
            except Exception as store_exc:  # noqa: BLE001 - the render's own failure is what is raised
                self.store_failures.record(store_exc, key, "recording a failed regeneration", op="set")

    async def _store(
        self, entry: CacheEntry, mode: Mode, word: str, started_at: float, elapsed: float, route: str
    ) -> Made:
        """Store a render; one the store refuses is still returned, unless a build or
        ``revalidate(path)`` asked for it (they promise a stored page)."""
        key = entry.key
        try:
            stored = await self.handler.set(entry)
        except Exception as exc:
            self.events.regenerated(route, "unstored", elapsed / 1000)
            if mode is Mode.PRERENDER:
                raise  # the build reports what it could not write
            self.store_failures.record(exc, key, "storing a render; answered, not kept", op="set")
            if mode is Mode.ON_DEMAND:
                raise
            self.log.decision(
                key,
                "UNSTORED",
                f"rendered in {elapsed:.1f}ms; the store refused it",
                route=route,
                duration_ms=round(elapsed, 1),
            )
            return Made(entry, stored=False)
        self.events.regenerated(route, "ok" if stored else "fenced", elapsed / 1000)
        if not stored:
            self.log.decision(
                key,
                "FENCED",
                f"rendered in {elapsed:.1f}ms; a newer entry exists",
                route=route,
                duration_ms=round(elapsed, 1),
            )
        else:
            self.log.decision(
                key,
                word,
                f"rendered in {elapsed:.1f}ms status={entry.status} "
                f"revalidate={entry.revalidate} size={len(entry.body)}",
                route=route,
                duration_ms=round(elapsed, 1),
            )
            if mode is Mode.ON_DEMAND and PATH_TAG + key in entry.tags:
                # Other processes' memory tiers drop their copies of this page: every entry
                # made before this render started is invalidated, ours is not.
                await self.handler.revalidate_tags([PATH_TAG + key], started_at - 1e-6)
        return Made(entry)


def _result_of(exc: BaseException) -> str:
    """A failed render's ``result`` label (pyisr.events.RESULTS)."""
    if isinstance(exc, RenderSlotsExhausted):
        return "refused"
    if isinstance(exc, RenderTimeout):
        return "timeout"
    if getattr(exc, "pyisr_expected", False):
        return "uncached"  # an outcome, not an error (a fetch that answered 404)
    return "failed"
