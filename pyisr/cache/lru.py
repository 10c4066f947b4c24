"""An LRU map bounded by the bytes its values hold, not by their number.

Pages differ in size by orders of magnitude, so a count limit either wastes memory
or evicts too much. Values report their own size through ``size_of``.

A value may carry *attachments*: things derived from it (a data entry's decoded value)
that live exactly as long as that very value stays under its key, counted in the same
budget and evicted with it (:meth:`ByteLRU.attach`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class _Item(Generic[V]):
    __slots__ = ("attachments", "size", "value")

    def __init__(self, value: V, size: int) -> None:
        self.value = value
        #: Bytes of the value and of its attachments.
        self.size = size
        self.attachments: dict[str, tuple[object, int]] | None = None


class ByteLRU(Generic[V]):
    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._items: OrderedDict[str, _Item[V]] = OrderedDict()
        self.bytes = 0
        # Sync callers reach the cache from the bridge thread while the server's loop uses it.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def keys(self) -> Iterator[str]:
        return iter(list(self._items))

    def get(self, key: str) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item.value

    def peek(self, key: str) -> V | None:
        item = self._items.get(key)
        return None if item is None else item.value

    def put(self, key: str, value: V) -> bool:
        """Store ``value`` (dropping what was attached to the one it replaces); returns
        ``False`` if it alone is larger than the whole budget."""
        size = self._size_of(value)
        with self._lock:
            self._pop(key)
            if size > self.max_bytes:
                return False
            self._items[key] = _Item(value, size)
            self.bytes += size
            self._evict()
            return True

    def attached(self, key: str, value: V, name: str) -> object | None:
        """What :meth:`attach` put beside ``value`` under ``name``, while ``value`` itself
        (the same object, not an equal one) is still stored under ``key``."""
        item = self._items.get(key)
        if item is None or item.value is not value or item.attachments is None:
            return None
        found = item.attachments.get(name)
        return None if found is None else found[0]

    def attach(self, key: str, value: V, name: str, thing: object, size: int) -> bool:
        """Keep ``thing`` (``size`` bytes) beside ``value`` for as long as ``value`` is stored
        under ``key``: replaced or evicted, it goes too. ``False`` (nothing kept) when
        ``value`` is no longer what ``key`` holds, or the two would not fit the budget."""
        with self._lock:
            item = self._items.get(key)
            if item is None or item.value is not value:
                return False
            attachments = item.attachments or {}
            old = attachments.pop(name, None)
            total = item.size - (old[1] if old is not None else 0) + size
            if total > self.max_bytes:
                item.attachments = attachments or None
                if old is not None:
                    item.size -= old[1]
                    self.bytes -= old[1]
                return False
            attachments[name] = (thing, size)
            item.attachments = attachments
            self.bytes += total - item.size
            item.size = total
            self._items.move_to_end(key)  # just used: never the one evicted to make room
            self._evict()
            return True

    def _evict(self) -> None:
        while self.bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.bytes -= evicted.size

    def pop(self, key: str) -> V | None:
        with self._lock:
            return self._pop(key)

    def _pop(self, key: str) -> V | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.bytes -= item.size
        return item.value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0
