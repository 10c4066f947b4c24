"""Read-only containers: how one decoded data value is shared by every caller.

A ``cached()`` value is decoded once and kept in memory beside its entry
(:mod:`pyisr.data.memo`), so a hit costs no read, no digest and no decode. Callers
then share what the value holds, which must therefore not change:

* each call gets a container of its own at the top (:func:`own`: a new ``list``,
  ``dict`` or ``set`` of the same items, a copy of pointers, not of the data), so
  ``posts.append(...)``, ``posts.sort()`` or ``post["seen"] = True`` on the value
  returned stay the caller's;
* everything nested in it is shared, so its lists, dicts and sets are
  :class:`FrozenList`, :class:`FrozenDict` and :class:`FrozenSet`: subclasses of
  ``list``, ``dict`` and ``set`` that refuse every change with a ``TypeError`` saying
  how to copy them. Everything that reads them works as before (indexing, iteration,
  ``len``, ``==``, ``isinstance(item, dict)``, ``json.dumps``, templates); to change
  one, copy it: ``dict(item)``, ``list(item)``, or ``copy.deepcopy(value)`` for a
  value that is plain all the way down, as it was before it was stored. Pickling a
  frozen container stores the plain type.

The other values JSON brings back (``str``, numbers, ``bytes``, dates and times,
``Decimal``, ``UUID``, tuples and frozensets of them) cannot be changed anyway.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

_FIX = "copy it first: list(v) / dict(v) / set(v) for a shallow copy, copy.deepcopy(v) for a full one"


def _refuse(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
    kind = type(self).__mro__[1].__name__
    raise TypeError(
        f"this {kind} came from pyisr's data cache and is shared with every other caller, "
        f"so it cannot be changed; {_FIX}"
    )


class FrozenList(list[Any]):
    """A ``list`` that refuses changes (see the module docstring)."""

    __slots__ = ()
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return [thaw(item) for item in self]

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (list(self),))


class FrozenDict(dict[Any, Any]):
    """A ``dict`` that refuses changes (see the module docstring)."""

    __slots__ = ()
    clear = pop = popitem = setdefault = update = _refuse
    __setitem__ = __delitem__ = __ior__ = _refuse

    def __copy__(self) -> dict[Any, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[Any, Any]:
        return {key: thaw(value) for key, value in self.items()}

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))


class FrozenSet(set[Any]):
    """A ``set`` that refuses changes (see the module docstring)."""

    __slots__ = ()
    add = discard = remove = pop = clear = update = _refuse
    difference_update = intersection_update = symmetric_difference_update = _refuse
    __ior__ = __iand__ = __isub__ = __ixor__ = _refuse

    def __copy__(self) -> set[Any]:
        return set(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> set[Any]:
        return set(self)  # members are hashable, hence immutable already

    def __reduce__(self) -> tuple[Any, ...]:
        return (set, (list(self),))


#: Rough bytes of a CPython container beyond its items, and of one item slot with a
#: small object behind it (measured with tracemalloc: a list of 20,000 small dicts of
#: numbers takes 6.4 times its JSON size, text-heavy posts about 2 times).
_CONTAINER_BYTES = 72
_ITEM_BYTES = 24


class _Freezer:
    """One walk over a decoded value: its read-only twin and an estimate of its size."""

    def __init__(self) -> None:
        self.containers = 0
        self.items = 0

    def freeze(self, value: Any) -> Any:
        cls = type(value)
        if cls is list:
            self.containers += 1
            self.items += len(value)
            return FrozenList([self.freeze(item) for item in value])
        if cls is dict:
            self.containers += 1
            self.items += len(value)
            return FrozenDict({key: self.freeze(item) for key, item in value.items()})
        if cls is set:
            self.containers += 1
            self.items += len(value)
            return FrozenSet(value)
        if cls is tuple:
            self.containers += 1
            self.items += len(value)
            return tuple(self.freeze(item) for item in value)
        return value


def freeze(value: Any, encoded_bytes: int = 0) -> tuple[Any, int]:
    """``value`` with every list, dict and set replaced by its read-only twin (tuples are
    rebuilt around frozen items), and about how many bytes it holds, given the length
    of the bytes it was decoded from. Only the exact built-in types are replaced: JSON
    decodes to nothing else."""
    walk = _Freezer()
    frozen = walk.freeze(value)
    size = 2 * encoded_bytes + _CONTAINER_BYTES * walk.containers + _ITEM_BYTES * walk.items
    return frozen, max(size, sys.getsizeof(frozen))


def own(value: Any) -> Any:
    """The caller's own top-level container over the shared (frozen) items."""
    cls = type(value)
    if cls is FrozenList:
        return list(value)
    if cls is FrozenDict:
        return dict(value)
    if cls is FrozenSet:
        return set(value)
    return value


def thaw(value: Any) -> Any:
    """A plain, changeable copy of a frozen value, all the way down."""
    cls = type(value)
    if cls is FrozenList or cls is list:
        return [thaw(item) for item in value]
    if cls is FrozenDict or cls is dict:
        return {key: thaw(item) for key, item in value.items()}
    if cls is FrozenSet or cls is set:
        return set(value)
    if cls is tuple:
        return tuple(thaw(item) for item in value)
    return value
