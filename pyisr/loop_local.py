"""``LoopLocal``: one value per running asyncio event loop, like ``threading.local`` for loops.

Many asyncio objects (redis-py and httpx clients, semaphores, tasks) are bound to the
loop that made them and break when used from another. pyisr runs on more than one
loop in one process (the server's, and the sync bridge's in its own thread), so such
objects are kept per loop: made by a factory the first time a loop asks, and found
again by that loop afterwards.

Keys are held weakly, so a loop that is garbage collected takes its value with it; a
loop that is closed but still referenced is forgotten the next time a value is made,
since what it holds can never be used again. Values are made under a lock: two
threads whose loops ask at once each get their own value, and one loop never gets two.

This module imports nothing from pyisr: every layer may use it.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LoopLocal(Generic[T]):
    """A value per event loop, made by ``factory`` on first use in that loop."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self) -> T:
        """The running loop's value, made now if this loop has none yet.

        Raises ``RuntimeError`` outside a running loop, like ``asyncio.get_running_loop``.
        """
        loop = asyncio.get_running_loop()
        value = self._values.get(loop)
        if value is None:
            with self._lock:
                value = self._values.get(loop)
                if value is None:
                    for dead in [other for other in self._values if other.is_closed()]:
                        del self._values[dead]
                    value = self._values[loop] = self._factory()
        return value

    def peek(self) -> T | None:
        """The running loop's value, or ``None``: never makes one (for clean-up paths)."""
        return self._values.get(asyncio.get_running_loop())

    def discard(self) -> None:
        """Forget the running loop's value (it broke, e.g. a closed client): the next
        :meth:`get` makes a new one."""
        with self._lock:
            self._values.pop(asyncio.get_running_loop(), None)

    def pop_all(self) -> list[tuple[asyncio.AbstractEventLoop, T]]:
        """Forget every loop's value and return them with their loops, to be closed.

        Later calls to :meth:`get` start afresh.
        """
        with self._lock:
            values = list(self._values.items())
            self._values = weakref.WeakKeyDictionary()
        return values
