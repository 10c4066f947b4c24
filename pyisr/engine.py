"""The ISR state machine (DESIGN.md, "The engine's state machine").

Given a key, a render callable and a policy, :meth:`Engine.get` answers with an entry
and how it was obtained:

- fresh → HIT;
- stale → the stale entry now (STALE) and one background regeneration;
- missing or tag-invalidated → render now, concurrent callers share that render (MISS);
- missing and not allowed → NOT_ALLOWED (the server answers 404);
- missing with ``fallback: True`` → FALLBACK and a background render;
- a render that belongs to its visitor (it sets a cookie, says ``private``/``no-store``
  or ``Vary: *``, or its framework saw it use a session or CSRF token) → PRIVATE: never
  stored; the caller answers it to its own visitor, and the key stays private for
  :data:`PRIVATE_RETRY` seconds before a shared render is tried again.

It knows nothing of HTTP. Renders run under a timeout and a concurrency limit; sync
render functions run in worker threads. A failed render never replaces a good entry:
the old one is kept, marked with the failure and a back-off, and retried later.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pyisr import context as render_context
from pyisr.cache.entry import (
    UNSET,
    CacheEntry,
    EntryKind,
)
from pyisr.cache.handler import CacheHandler, as_handler
from pyisr.cache.tags import PATH_TAG, tags_for_revalidate_path, validate_tags
from pyisr.log import CacheLog
from pyisr.loop_local import LoopLocal
from pyisr.private_keys import PRIVATE_RETRY, PrivateKeys
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
    RenderTimeout,
    Resolver,
    RevalidationError,
    Served,
    make_entry,
    private_reason,
)


class _PrivateRender(Exception):
    """A render that may not be shared; carries it for the one caller that asked for it."""

    def __init__(self, entry: CacheEntry, reason: str) -> None:
        super().__init__(reason)
        self.entry = entry
        self.reason = reason


class _Mode(StrEnum):
    BLOCKING = "blocking"
    BACKGROUND = "background"
    ON_DEMAND = "on_demand"
    PRERENDER = "prerender"  # a build filling a store nobody serves yet


#: Modes that render whatever else has rendered meanwhile (they never adopt another's entry).
_FORCED = frozenset({_Mode.ON_DEMAND, _Mode.PRERENDER})


@dataclass
class _LoopState:
    """Single-flight maps and limits belong to one event loop."""

    inflight: dict[tuple[str, str], asyncio.Task[CacheEntry]] = field(default_factory=dict)
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    renders: asyncio.Semaphore | None = None


def _backoff(entry: CacheEntry) -> float:
    """Next.js' back-off after a failed regeneration: ``clamp(revalidate, 3, 30)`` seconds."""
    return float(min(max(entry.revalidate or 3, 3), 30))


class Engine:
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
    ) -> None:
        if render_timeout <= 0:
            raise ValueError(f"render_timeout must be > 0 seconds, not {render_timeout!r}")
        if max_concurrent_renders < 1:
            raise ValueError(f"max_concurrent_renders must be >= 1, not {max_concurrent_renders!r}")
        self.handler: CacheHandler = as_handler(handler)
        self.clock = clock
        self.render_timeout = render_timeout
        self.max_concurrent_renders = max_concurrent_renders
        self.lock_ttl = render_timeout + 5.0
        self.lock_poll = lock_poll
        self.log = CacheLog(debug)
        self._executor_pid = -1
        self._executor_pool: ThreadPoolExecutor | None = None
        self._states: LoopLocal[_LoopState] = LoopLocal(
            lambda: _LoopState(renders=asyncio.Semaphore(self.max_concurrent_renders))
        )
        #: Keys whose last shared render belonged to its visitor (see pyisr.private_keys).
        self._private = PrivateKeys(self.clock)
        #: Who can regenerate a path (``revalidate(path)``): the site and each integration
        #: using this engine add theirs; asked in the order they were added.
        self._resolvers: dict[Resolver, None] = {}

    @property
    def _executor(self) -> ThreadPoolExecutor:
        """Render threads, created per process: a forked worker inherits no threads."""
        if self._executor_pool is None or self._executor_pid != os.getpid():
            self._executor_pool = ThreadPoolExecutor(
                max_workers=self.max_concurrent_renders, thread_name_prefix="pyisr-render"
            )
            self._executor_pid = os.getpid()
        return self._executor_pool

    def _state(self) -> _LoopState:
        return self._states.get()

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

    async def _tag_times_for(self, entry: CacheEntry, policy: RenderPolicy) -> Mapping[str, float]:
        tags = entry.tags + policy.soft_tags if policy.soft_tags else entry.tags
        if not tags:
            return {}
        return await self.handler.tag_times(tags)

    async def get(self, key: str, render: RenderFn, policy: RenderPolicy = DEFAULT_POLICY) -> Served:
        """Answer one request for ``key``. Raises what the render raised when nothing is cached."""
        if self._private and key in self._private:
            self.log.decision(key, "PRIVATE", "its last shared render belonged to its visitor")
            return Served(None, CacheStatus.PRIVATE)
        entry = await self.handler.get(key)
        now = self.clock()
        if entry is not None:
            times = await self._tag_times_for(entry, policy)
            if entry.is_invalidated(times, also=policy.soft_tags):
                if self._in_failure_backoff(entry, times, now):
                    self.log.decision(key, "STALE", "invalidated; last regeneration failed, in back-off")
                    return Served(entry, CacheStatus.STALE)
                self.log.decision(key, "INVALIDATED", "tag revalidated after the entry was made")
                return await self._blocking(key, render, policy, previous=entry)
            if entry.is_stale(now):
                if policy.stale_blocks:
                    return await self._blocking(key, render, policy, previous=entry)
                self.log.decision(key, "STALE", f"age={entry.age(now)}s revalidate={entry.revalidate}")
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
        task, started = self._flight(key, render, policy, previous, _Mode.BLOCKING)
        try:
            entry = await asyncio.shield(task)
        except _PrivateRender as private:
            # Only the caller whose request started the render may see it; others that
            # joined render for their own visitor.
            return Served(private.entry if started else None, CacheStatus.PRIVATE)
        except Exception:
            if previous is not None and not policy.stale_blocks:
                # Keep serving the last good entry (the failure is logged and recorded).
                # Not while a page regenerates: its data must not hide a failure, so the
                # page's regeneration fails and the last good *page* stays instead.
                return Served(previous, CacheStatus.STALE)
            raise
        if entry.revalidate == 0:
            return Served(entry, CacheStatus.BYPASS)
        return Served(entry, CacheStatus.MISS)

    def _flight(
        self,
        key: str,
        render: RenderFn,
        policy: RenderPolicy,
        previous: CacheEntry | None,
        mode: _Mode,
    ) -> tuple[asyncio.Task[CacheEntry], bool]:
        """The one render of ``key`` in this loop: join it if it runs, start it if not.

        Also says whether this call started it.
        """
        state = self._state()
        # On-demand revalidation must not join a normal render that started earlier.
        lane = "on_demand" if mode in _FORCED else "normal"
        task = state.inflight.get((key, lane))
        if task is not None:
            return task, False
        task = asyncio.create_task(self._regenerate(key, render, policy, previous, mode))
        state.inflight[(key, lane)] = task

        def _done(t: asyncio.Task[CacheEntry], slot: tuple[str, str] = (key, lane)) -> None:
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
        task, _ = self._flight(key, render, policy, previous, _Mode.BACKGROUND)
        state.background.add(task)
        task.add_done_callback(state.background.discard)

    def regenerating(self, key: str) -> bool:
        """Whether this loop is regenerating ``key`` in the background right now.

        While it is, a stale copy may be served without asking the engine again: the
        answer would be STALE and the regeneration is already under way.
        """
        state = self._states.peek()
        return state is not None and (key, "normal") in state.inflight

    async def drain(self) -> None:
        """Wait for every background regeneration started in this loop (tests, shutdown)."""
        state = self._state()
        while state.background:
            await asyncio.gather(*list(state.background), return_exceptions=True)

    # -- regeneration -------------------------------------------------------------------

    def _usable(
        self,
        entry: CacheEntry | None,
        times: Mapping[str, float],
        policy: RenderPolicy,
        previous: CacheEntry | None,
        now: float,
    ) -> bool:
        if entry is None or entry.is_invalidated(times, also=policy.soft_tags) or entry.is_stale(now):
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
        mode: _Mode,
    ) -> CacheEntry:
        # A build fills a store nobody serves yet: no lock (that spares it one per page).
        # On-demand regeneration takes the lock too, though it renders whatever else ran:
        # holding it keeps another process's background regeneration from starting while
        # it renders and storing a newer entry that this process's memory tier would
        # never hear of (fencing orders results, it does not tell other tiers).
        token = None if mode is _Mode.PRERENDER else await self.handler.acquire_lock(key, self.lock_ttl)
        if token is None and mode is _Mode.BACKGROUND:
            self.log.decision(key, "REGENERATE", "skipped: another process is regenerating it")
            if previous is None:
                raise RuntimeError(f"{key} is being rendered by another process")
            return previous
        if token is None and mode in (_Mode.BLOCKING, _Mode.ON_DEMAND):
            deadline = time.monotonic() + self.lock_ttl
            delay = self.lock_poll
            while token is None and time.monotonic() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.25)
                if mode is _Mode.BLOCKING:
                    adopted = await self._adoptable(key, policy, previous)
                    if adopted is not None:
                        self.log.decision(key, "ADOPT", "rendered by another process")
                        return adopted
                token = await self.handler.acquire_lock(key, self.lock_ttl)
        try:
            if mode not in _FORCED and token is not None:
                adopted = await self._adoptable(key, policy, previous)
                if adopted is not None:
                    self.log.decision(key, "ADOPT", "rendered by another process")
                    return adopted
            return await self._render_and_store(key, render, policy, previous, mode)
        finally:
            if token is not None:
                await self.handler.release_lock(key, token)

    async def _render_and_store(
        self,
        key: str,
        render: RenderFn,
        policy: RenderPolicy,
        previous: CacheEntry | None,
        mode: _Mode,
    ) -> CacheEntry:
        started_at = self.clock()
        t0 = time.perf_counter()
        ctx = render_context.RenderContext(
            engine=self,
            key=key,
            soft_tags=policy.tags if policy.kind is not EntryKind.DATA else policy.soft_tags,
            is_revalidating=previous is not None or mode in _FORCED,
            page_revalidate=policy.revalidate,
        )
        if mode is _Mode.PRERENDER:
            word = "PRERENDER"
        else:
            word = "REGENERATE" if previous is not None or mode is not _Mode.BLOCKING else "MISS"
        try:
            rendered = await self._run(render, ctx, limited=policy.kind is not EntryKind.DATA)
            private = private_reason(rendered, policy)
            entry = make_entry(key, rendered, policy, ctx, started_at, private=private is not None)
        except Exception as exc:
            elapsed = (time.perf_counter() - t0) * 1000
            if getattr(exc, "pyisr_expected", False):
                # An outcome, not an error (a fetch that answered 404): never cached either.
                self.log.decision(key, "UNCACHED", f"{exc} after {elapsed:.0f}ms")
            else:
                self.log.failure(key, "FAILED", exc, f"{word.lower()} after {elapsed:.0f}ms")
            if previous is not None:
                failed = previous.with_failure(exc, self.clock(), _backoff(previous))
                await self.handler.set(failed)
            raise
        elapsed = (time.perf_counter() - t0) * 1000
        if private is not None:
            self._private.mark(key, policy.route or key, private)
            self.log.decision(key, "PRIVATE", f"{private}: not stored")
            raise _PrivateRender(entry, private)
        if self._private:
            self._private.forget(key)  # a shared render again: cache it as before
        if entry.revalidate == 0:
            self.log.decision(key, word, f"rendered in {elapsed:.1f}ms; revalidate=0, not cached")
            return entry
        stored = await self.handler.set(entry)
        if not stored:
            self.log.decision(key, "FENCED", f"rendered in {elapsed:.1f}ms; a newer entry exists")
        else:
            self.log.decision(
                key,
                word,
                f"rendered in {elapsed:.1f}ms status={entry.status} "
                f"revalidate={entry.revalidate} size={len(entry.body)}",
            )
            if mode is _Mode.ON_DEMAND and PATH_TAG + key in entry.tags:
                # Other processes' memory tiers drop their copies of this page: every entry
                # made before this render started is invalidated, ours is not.
                await self.handler.revalidate_tags([PATH_TAG + key], started_at - 1e-6)
        return entry

    async def _run(self, render: RenderFn, ctx: render_context.RenderContext, *, limited: bool) -> Rendered:
        state = self._state()
        assert state.renders is not None
        run_ctx = contextvars.copy_context()
        run_ctx.run(render_context.enter, ctx)
        # Data computes run inside page renders: if they took a slot of the limit too,
        # max_concurrent_renders pages waiting for their data would deadlock.
        limit = state.renders if limited else contextlib.nullcontext()
        async with limit:
            if _is_async(render):
                job: Awaitable[Any] = asyncio.create_task(render(), context=run_ctx)  # type: ignore[arg-type]
            else:
                loop = asyncio.get_running_loop()
                job = loop.run_in_executor(self._executor, run_ctx.run, render)
            try:
                result = await asyncio.wait_for(job, self.render_timeout)
            except TimeoutError as exc:
                raise RenderTimeout(f"render of {ctx.key} took longer than {self.render_timeout:g}s") from exc
            if inspect.isawaitable(result):
                # A sync callable that returned a coroutine (e.g. a lambda around an async def).
                result = await asyncio.wait_for(
                    asyncio.create_task(_awaited(result), context=run_ctx), self.render_timeout
                )
        if not isinstance(result, Rendered):
            raise TypeError(f"render of {ctx.key} returned {type(result).__name__}; expected pyisr.Rendered")
        return result

    # -- on-demand ----------------------------------------------------------------------

    async def revalidate_now(
        self, key: str, render: RenderFn, policy: RenderPolicy = DEFAULT_POLICY, *, prerender: bool = False
    ) -> CacheEntry:
        """Regenerate ``key`` now and return only once it is stored (``res.revalidate``).

        Raises :class:`RevalidationError` if the render fails; the old entry stays served.
        ``prerender=True`` is for a build filling a store nobody serves yet: there is no
        previous entry to read and no other process holding a copy to tell.
        """
        previous = None if prerender else await self.handler.get(key)
        mode = _Mode.PRERENDER if prerender else _Mode.ON_DEMAND
        task, _ = self._flight(key, render, policy, previous, mode)
        try:
            return await asyncio.shield(task)
        except _PrivateRender as exc:
            raise NotShareable(
                f"Failed to revalidate {key}: {policy.route or key} {exc.reason}, so it is served uncached"
            ) from None
        except Exception as exc:
            raise RevalidationError(f"Failed to revalidate {key}: {exc}") from exc

    async def revalidate_tags(self, tags: Iterable[str]) -> None:
        """Mark every entry carrying any of ``tags`` as invalidated: one manifest write."""
        tags = list(tags)
        if not tags:
            return
        await self.handler.revalidate_tags(tags, self.clock())
        for tag in tags:
            self.log.decision(tag, "INVALIDATE", "tag revalidated")

    async def revalidate_tag(self, tag: str) -> None:
        """``revalidate_tag`` on this engine (what :func:`pyisr.arevalidate_tag` calls)."""
        await self.revalidate_tags(validate_tags([tag], where="revalidate_tag()"))

    async def revalidate_path(self, path: str, type: str | None = None) -> None:  # noqa: A002
        """``revalidate_path`` on this engine: a path, a route's pages, or a subtree."""
        await self.revalidate_tags(tags_for_revalidate_path(path, type))

    async def inspect(self, key: str) -> CacheEntry | None:
        return await self.handler.reload(key)

    async def close(self) -> None:
        try:
            await self.drain()
        finally:
            if self._executor_pool is not None:
                self._executor_pool.shutdown(wait=False, cancel_futures=True)
            await self.handler.close()


def _is_async(fn: Callable[..., Any]) -> bool:
    """True for async functions, partials of them and objects with an async ``__call__``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


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
    "RenderTimeout",
    "Rendered",
    "Resolver",
    "RevalidationError",
    "Served",
]
