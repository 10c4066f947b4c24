"""An LRU map bounded by the bytes its values hold, not by their number.

Pages differ in size by orders of magnitude, so a count limit either wastes memory
or evicts too much. Values report their own size through ``size_of``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
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
            return item[0]

    def peek(self, key: str) -> V | None:
        item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key: str, value: V) -> bool:
        """Store ``value``; returns ``False`` if it alone is larger than the whole budget."""
        size = self._size_of(value)
        with self._lock:
            self._pop(key)
            if size > self.max_bytes:
                return False
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self.bytes -= evicted
            return True

    def pop(self, key: str) -> V | None:
        with self._lock:
            return self._pop(key)

    def _pop(self, key: str) -> V | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.bytes -= item[1]
        return item[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0
