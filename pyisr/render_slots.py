"""Render slots: the engine's limit on concurrent renders, and the threads sync renders use.

A render the engine limits (a page, a route handler: not the data read inside one, which
would deadlock the pages waiting for it) holds one of ``max_concurrent_renders`` slots
while it runs, and its sync code (the page function, ``get_static_props``...) runs on the
engine's own pool of as many threads. Storage I/O has its own threads
(``FileSystemCache``) and sync user code run outside any render (API routes, middleware,
dynamic pages) has :func:`shared_pool`, so none of the three can starve another.

Python cannot stop a thread. A render past its timeout is given up by the engine, but
its thread runs on, so its slot is freed only when that thread really ends; until then
the render is *stuck* (:meth:`RenderSlots.stuck`). When every slot is stuck, a new render
could only queue behind threads that may never end, so it fails at once with
:class:`~pyisr.render.RenderSlotsExhausted` (the server answers 503 with ``Retry-After``)
while cached pages, which need no slot, are served as before.

Slots belong to the process (as threads do) and are shared by every event loop that
uses the engine; a forked worker starts with none taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pyisr import context as render_context
from pyisr.context import RenderContext, current_render
from pyisr.render import Rendered, RenderFn, RenderSlotsExhausted, RenderTimeout

#: Threads for sync user code run outside a render (see :func:`shared_pool`).
SHARED_THREADS = 32


@dataclass(eq=False)
class RenderSlot:
    """One render's hold on the limit: its key, since when, and the threads it started."""

    key: str
    owner: RenderSlots
    started: float = field(default_factory=time.monotonic)
    #: Threads of this render still running (or queued) in the render pool.
    threads: int = 0
    #: The engine is done with the render (a result, an error or the timeout): if threads
    #: still run, the render is stuck and the slot stays taken until they end.
    ended: bool = False

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the engine's render threads, counted on this slot."""
        return await self.owner.run(self, fn, *args)


class RenderSlots:
    """The render limit of one engine, per process, with its pool of render threads."""

    def __init__(self, size: int, *, retry_after: int, name: str = "pyisr-render") -> None:
        self.size = size
        #: Seconds a refused caller is told to wait (``Retry-After``).
        self.retry_after = retry_after
        self._name = name
        self._reset()

    def _reset(self) -> None:
        """Fresh state for this process: a forked child inherits no threads, so no slots."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._held: set[RenderSlot] = set()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._pool: ThreadPoolExecutor | None = None
        #: Renders refused because every slot was stuck, since the process started.
        self.refused = 0

    def _this_process(self) -> None:
        if self._pid != os.getpid():
            self._reset()

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The render threads: as many as there are slots, created in the process using them."""
        self._this_process()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix=self._name)
        return self._pool

    # -- taking and freeing a slot -----------------------------------------------------------

    async def acquire(self, key: str, *, spare: int = 0) -> RenderSlot:
        """A free slot, waiting while renders that are not stuck hold them all.

        ``spare`` slots are left free for others: a re-warm (pyisr.rewarm) passes 1 and
        waits rather than take the last free slot, which a visitor's render may need.
        Raises :class:`RenderSlotsExhausted` at once when every slot is stuck, and as soon
        as the last render still running becomes stuck while this one waits.
        """
        self._this_process()
        loop = asyncio.get_running_loop()
        limit = max(1, self.size - spare)
        while True:
            with self._lock:
                if len(self._held) < limit:
                    slot = RenderSlot(key, self)
                    self._held.add(slot)
                    return slot
                if all(s.ended for s in self._held):
                    self.refused += 1
                    raise RenderSlotsExhausted(
                        f"cannot render {key}: all {self.size} render slots are held by renders past "
                        "their timeout whose threads are still running",
                        self.retry_after,
                    )
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, waiter))
            try:
                await waiter
            finally:
                with self._lock, contextlib.suppress(ValueError):
                    self._waiters.remove((loop, waiter))

    def end(self, slot: RenderSlot) -> None:
        """The engine is done with ``slot``'s render: free it now, or when its threads end."""
        with self._lock:
            slot.ended = True
            if slot.threads == 0:
                self._held.discard(slot)
        # Freed, or one more stuck render (which may leave nothing worth waiting for).
        self._wake_all()

    def _thread_done(self, slot: RenderSlot) -> None:
        with self._lock:
            slot.threads -= 1
            freed = slot.ended and slot.threads == 0 and slot in self._held
            if freed:
                self._held.discard(slot)
        if freed:
            self._wake_all()

    def _wake_all(self) -> None:
        """Let every waiter look again (from any thread; a closed loop has nobody waiting)."""
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake, waiter)

    # -- running sync code -------------------------------------------------------------------

    async def run(self, slot: RenderSlot, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a render thread, counted on ``slot`` until the thread ends.

        Cancelling the await (the render's timeout) cancels the call if it has not
        started; once started it runs to its end, and so the slot stays taken.
        """
        future: Future[Any] = self.executor.submit(fn, *args)
        with self._lock:
            slot.threads += 1
        future.add_done_callback(lambda _: self._thread_done(slot))
        return await asyncio.wrap_future(future)

    # -- what health shows -------------------------------------------------------------------

    def busy(self) -> int:
        with self._lock:
            return len(self._held)

    def stuck(self) -> list[RenderSlot]:
        """Renders given up at their timeout whose threads still run, oldest first."""
        with self._lock:
            return sorted((s for s in self._held if s.ended), key=lambda s: s.started)

    def all_stuck(self) -> bool:
        """Whether every slot is held by a stuck render: new renders are refused."""
        with self._lock:
            return len(self._held) >= self.size and all(s.ended for s in self._held)

    def close(self) -> None:
        """Stop taking work; threads already running finish on their own (they cannot be stopped)."""
        pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.shutdown(wait=False, cancel_futures=True)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


_shared: tuple[int, ThreadPoolExecutor] | None = None
_shared_lock = threading.Lock()


def shared_pool() -> ThreadPoolExecutor:
    """Threads for sync user code run outside any render: API routes, middleware, pages
    rendered per request, ``generate_static_params``.

    Bounded, and apart from the engines' render threads and from storage I/O: a hung API
    route can take these threads, never the ones pages render in or the cache reads with.
    """
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid():
            _shared = (os.getpid(), ThreadPoolExecutor(SHARED_THREADS, thread_name_prefix="pyisr-user"))
        return _shared[1]


async def call_in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a thread, with the caller's context variables.

    Inside a render that holds a slot, on the rendering engine's render threads, counted
    on its slot; anywhere else, on :func:`shared_pool`.
    """
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    render = current_render()
    slot = render.slot if render is not None else None
    if isinstance(slot, RenderSlot):
        return await slot.call(call)
    return await asyncio.wrap_future(shared_pool().submit(call))


async def _within(job: asyncio.Future[Any], timeout: float, key: str) -> Any:
    """``job``'s result, or :class:`RenderTimeout` once ``timeout`` seconds have passed.

    A ``TimeoutError`` the render raised itself (a backend it called timed out) is the
    render's failure, told as it is: only the engine's own deadline is a render timeout.
    """
    try:
        return await asyncio.wait_for(job, timeout)
    except TimeoutError as exc:
        if job.done() and not job.cancelled() and job.exception() is not None:
            raise
        raise RenderTimeout(f"render of {key} took longer than {timeout:g}s") from exc


async def run_render(
    render: RenderFn, ctx: RenderContext, slots: RenderSlots | None, timeout: float, *, spare: int = 0
) -> Rendered:
    """Run one render in ``ctx`` under ``timeout``, holding a slot of ``slots`` if given
    (taken leaving ``spare`` free: :meth:`RenderSlots.acquire`).

    An async render runs as a task, a sync one on the render threads (or the shared ones
    without a slot). At the timeout the engine gives the render up; the slot is handed
    back when the render's threads have really ended (:meth:`RenderSlots.end`).
    """
    slot = await slots.acquire(ctx.key, spare=spare) if slots is not None else None
    ctx.slot = slot
    run_ctx = contextvars.copy_context()
    run_ctx.run(render_context.enter, ctx)
    try:
        job: asyncio.Future[Any]
        if _is_async(render):
            job = asyncio.create_task(render(), context=run_ctx)  # type: ignore[arg-type]
        elif slot is not None:
            job = asyncio.ensure_future(slot.call(run_ctx.run, render))
        else:
            job = asyncio.wrap_future(shared_pool().submit(run_ctx.run, render))
        result = await _within(job, timeout, ctx.key)
        if inspect.isawaitable(result):
            # A sync callable that returned a coroutine (e.g. a lambda around an async def).
            result = await _within(asyncio.create_task(_awaited(result), context=run_ctx), timeout, ctx.key)
    finally:
        if slot is not None:
            assert slots is not None
            slots.end(slot)
    if not isinstance(result, Rendered):
        raise TypeError(f"render of {ctx.key} returned {type(result).__name__}; expected pyisr.Rendered")
    return result


def _is_async(fn: Callable[..., Any]) -> bool:
    """True for async functions, partials of them and objects with an async ``__call__``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
