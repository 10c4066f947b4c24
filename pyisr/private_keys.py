"""Keys whose last shared render belonged to its visitor, and the warning said about them.

A render that sets a cookie (or says ``private``...) is never stored (DESIGN.md, "What
may be stored"). Rendering the same key as a shared render on every request would then
only waste work, so the key is remembered as private for :data:`PRIVATE_RETRY` seconds:
callers render it per visitor meanwhile, and afterwards a shared render is tried again
("until a render stops doing so"). Both memories are bounded, so a crawler walking
millions of private paths cannot grow them without end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger("pyisr")

#: Seconds a key is served per visitor before a shared render is tried again.
PRIVATE_RETRY = 60.0
#: Keys (and route/reason pairs) remembered at most; the oldest is forgotten first.
PRIVATE_KEYS = 10_000


class PrivateKeys:
    """Per process: which keys are private until when, on the engine's clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}
        self._warned: set[tuple[str, str]] = set()

    def __bool__(self) -> bool:
        """Cheap test for the common case of none at all (asked on every lookup)."""
        return bool(self._until)

    def __contains__(self, key: object) -> bool:
        until = self._until.get(key)  # type: ignore[call-overload]
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._until[key]  # type: ignore[arg-type]
        return False

    def mark(self, key: str, route: str, reason: str) -> None:
        """Serve ``key`` per visitor for a while, and warn once per route and reason."""
        if len(self._until) >= PRIVATE_KEYS:
            del self._until[next(iter(self._until))]
        self._until[key] = self._clock() + PRIVATE_RETRY
        if (route, reason) not in self._warned:
            if len(self._warned) >= PRIVATE_KEYS:
                self._warned.clear()
            self._warned.add((route, reason))
            logger.warning("%s %s: served uncached", route, reason)

    def forget(self, key: str) -> None:
        """A shared render of ``key`` succeeded: cache it as before."""
        self._until.pop(key, None)
