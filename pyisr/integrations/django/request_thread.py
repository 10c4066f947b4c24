"""A render the request is waiting for runs in that request's thread.

Django keeps one database connection per thread, and ``TestCase`` runs each test inside
a transaction on the test thread's connection: a render on any other thread sees none
of the test's data. So when a sync view's page must be rendered while its request waits
(a MISS, an invalidated page), the render runs in the request's thread, on its
connection, as Django itself would run the view. The engine still drives it (single
flight, timeout, slots): the request thread hands the engine's coroutine to pyisr's
bridge loop and, while waiting, runs the render work the loop sends back.

Work that arrives once the request stopped waiting (a background regeneration started
by a STALE answer) goes to pyisr's render threads instead, like any regeneration.
Only the database connection is the request's: the render runs with the render's own
context variables (language, time zone, URLconf), never the visitor's.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Any, TypeVar

from pyisr.render_slots import call_in_thread
from pyisr.runtime import bridge

T = TypeVar("T")

#: A job of the render: called with ``True`` in the request's thread, ``False`` elsewhere.
Job = Callable[[bool], T]
_Item = tuple[contextvars.Context, Callable[[bool], Any], "Future[Any]"]


class RequestThread:
    """The request thread's side of one cached GET (single use)."""

    def __init__(self) -> None:
        #: Render work for the request thread, then ``None`` once the engine has answered.
        self._queue: SimpleQueue[_Item | None] = SimpleQueue()
        self._lock = threading.Lock()
        #: Until the engine answers: work sent later (a background regeneration the answer
        #: started) is not this request's, and goes to the render threads.
        self._open = True

    async def call(self, job: Callable[[bool], T]) -> T:
        """Run ``job`` in the waiting request thread, or on pyisr's threads if it stopped waiting.

        Called on the bridge loop, inside the render (its context is the render's).
        """
        ctx = contextvars.copy_context()
        future: Future[T] = Future()
        with self._lock:
            waiting = self._open
            if waiting:
                self._queue.put((ctx, job, future))
        if waiting:
            return await asyncio.wrap_future(future)
        return await call_in_thread(job, False)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the bridge loop, doing the render work it sends here meanwhile."""
        if threading.current_thread().name == "pyisr-sync":
            coro.close()
            raise RuntimeError("a sync @isr view was called from pyisr's own bridge loop")
        done: Future[T] = asyncio.run_coroutine_threadsafe(self._answer(coro), bridge.loop())
        done.add_done_callback(lambda _: self._queue.put(None))
        # Nothing is queued after the ``None``: the thread closed before the answer was set.
        while (item := self._queue.get()) is not None:
            _run(item, True)
        return done.result()

    async def _answer(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro``, closing this thread to new work the moment it returns, on the loop:
        before any task it started (a background regeneration) can send any."""
        try:
            return await coro
        finally:
            with self._lock:
                self._open = False


def _run(item: _Item, in_request_thread: bool) -> None:
    ctx, job, future = item
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(ctx.run(job, in_request_thread))
    except BaseException as exc:  # noqa: BLE001 - handed to the render that awaits it
        future.set_exception(exc)
