"""Data read once: decoded values kept beside their entries, and calls shared per render.

Two things make a repeated ``cached()`` / ``fetch()`` cost next to nothing:

**The decoded value lives beside its entry.** The memory tier (or a ``MemoryCache``)
serves an unchanged entry as the very object it holds; :func:`kept` finds the value
decoded from it the last time, attached to that object
(:meth:`pyisr.cache.lru.ByteLRU.attach`). So a hit reads no file, hashes and decodes
nothing, and it is still the engine that decides, with its usual rules, whether the
entry may be served (fresh, stale, invalidated by a tag, expired): a new entry is a
new object, which has nothing attached. The decoded value counts in the tier's byte
budget and is evicted with its entry. A store with no memory tier (``memory_tier =
0``) decodes every read.

**Identical calls share one result** within a scope (Next.js' request memoisation):
one page render (the render context's :attr:`~pyisr.context.RenderContext.data_memo`)
and one ``pyisr build`` (:func:`build_scope`). The first call of a key reads it; the
others, concurrent or later, in any thread, get its result, so the value is computed
(or the URL requested) once. A failed read is not kept: the callers waiting for it get
its error, the next call reads again. A new render starts with nothing shared, so it
asks the engine again (and recomputes a value that went stale).

**What a caller gets** (:meth:`Decoded.handout`): a JSON value in a top-level
container of its own, whose items are shared and so read-only (:mod:`pyisr.data.frozen`:
its lists, dicts and sets refuse changes); a pickled value is unpickled
afresh for each caller (from the verified bytes kept in memory: no read, no signature
check), as it may hold any object; a ``fetch`` response is a new ``httpx.Response``
for each caller, over the same immutable body.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future
from contextvars import ContextVar
from typing import Any

from pyisr.cache.entry import CacheEntry
from pyisr.cache.lru import ByteLRU
from pyisr.cache.memory import MemoryCache
from pyisr.cache.tier import MemoryTier
from pyisr.context import RenderContext, current_render


class Decoded:
    """A data entry's value as this process keeps it, and how each caller gets it."""

    __slots__ = ("_copy", "_value", "size")

    def __init__(self, value: Any, size: int, copy: Callable[[Any], Any] | None = None) -> None:
        self._value = value
        #: About how many bytes ``value`` holds (counted in the memory tier's budget).
        self.size = size
        self._copy = copy

    def handout(self) -> Any:
        """The value for one caller: the shared one, or a copy made for it."""
        return self._value if self._copy is None else self._copy(self._value)


# -- beside the entry -----------------------------------------------------------------------


def kept(handler: object, entry: CacheEntry, kind: str) -> Decoded | None:
    """The value decoded from this very ``entry`` object, if the store still holds both."""
    if isinstance(handler, MemoryTier | MemoryCache):
        found = handler.attached(entry, kind)
        if isinstance(found, Decoded):
            return found
    return None


def keep(handler: object, entry: CacheEntry, kind: str, decoded: Decoded) -> None:
    """Keep ``decoded`` beside ``entry`` in the store's memory, if it has any."""
    if isinstance(handler, MemoryTier | MemoryCache):
        handler.attach(entry, kind, decoded, decoded.size)


# -- shared calls -----------------------------------------------------------------------------

Result = tuple[Decoded, CacheEntry]


class _Abandoned(Exception):
    """The call a memo's waiters were waiting for was cancelled: they read for themselves."""


class DataMemo:
    """Results of data calls shared within one scope, bounded by ``max_bytes`` (a
    scope's results are dropped least recently used first past it; a render's own memo
    is unbounded: it lives as long as the render). ``engine``: the engine data calls in
    the scope use when no render names one (a build's)."""

    def __init__(self, max_bytes: int | None = None, engine: Any = None) -> None:
        self.engine = engine
        self._results: ByteLRU[Result] = ByteLRU(
            sys.maxsize if max_bytes is None else max_bytes,
            lambda result: result[0].size + len(result[1].body),
        )
        #: Reads under way: the future their waiters wait on, made by the first waiter
        #: (most reads have none, and a future costs a lock and a condition).
        self._pending: dict[str, Future[Result] | None] = {}
        self._lock = threading.Lock()
        #: Calls made in this scope; of them, answered by another's result; seconds spent
        #: by the calls that read (summed: concurrent reads overlap).
        self.calls = 0
        self.shared = 0
        self.read_seconds = 0.0

    def _claim(self, key: str) -> Result | Future[Result] | None:
        """A result, another caller's pending read, or ``None``: the caller now owns the read."""
        with self._lock:
            self.calls += 1
            found = self._results.get(key)
            if found is not None:
                self.shared += 1
                return found
            if key in self._pending:
                self.shared += 1
                pending = self._pending[key]
                if pending is None:
                    pending = self._pending[key] = Future()
                return pending
            self._pending[key] = None
            return None

    def _settle(self, key: str, result: Result | None, error: BaseException | None) -> None:
        with self._lock:
            future = self._pending.pop(key)
            if result is not None:
                self._results.put(key, result)
        if future is None:
            return
        if result is not None:
            future.set_result(result)
        else:
            # A cancelled or interrupted read is nobody else's error: they read again.
            future.set_exception(error if isinstance(error, Exception) else _Abandoned())


def memo_key(data_key: str, revalidate: object, expire: object, tags: Iterable[str]) -> str:
    """What makes two data calls identical: the entry they read and the options they read
    it with (two reads of one entry with different lifetimes or tags are two calls)."""
    return f"{data_key}|{revalidate}|{expire}|{','.join(tags)}"


_build_memo: ContextVar[DataMemo | None] = ContextVar("pyisr_build_memo", default=None)
_render_memo_lock = threading.Lock()


@contextlib.contextmanager
def build_scope(max_bytes: int, engine: Any = None) -> Iterator[DataMemo]:
    """Share every data call made inside the block (``pyisr build``), keeping results up
    to ``max_bytes``, and send those made outside a render (``generate_static_params``)
    to ``engine``; yields the memo, whose counters say what the calls cost."""
    memo = DataMemo(max_bytes, engine)
    token = _build_memo.set(memo)
    try:
        yield memo
    finally:
        _build_memo.reset(token)


def _render_memo(ctx: RenderContext) -> DataMemo:
    memo = ctx.data_memo
    if memo is None:
        with _render_memo_lock:
            memo = ctx.data_memo
            if memo is None:
                memo = ctx.data_memo = DataMemo()
    return memo


def scope_engine() -> Any:
    """The engine of the build running here, if any (for data calls outside a render)."""
    build = _build_memo.get()
    return None if build is None else build.engine


def scopes() -> list[DataMemo]:
    """The memos a data call made here shares with: its render's, then its build's."""
    found = []
    ctx = current_render()
    if ctx is not None:
        found.append(_render_memo(ctx))
    build = _build_memo.get()
    if build is not None:
        found.append(build)
    return found


async def shared(memos: list[DataMemo], key: str, read: Callable[[], Awaitable[Result]]) -> Result:
    """``read()``'s result, shared by identical calls in each of ``memos`` (innermost first)."""
    if not memos:
        return await read()
    memo, outer = memos[0], memos[1:]
    while True:
        found = memo._claim(key)
        if found is None:
            break
        if isinstance(found, Future):
            try:
                return await asyncio.wrap_future(found)
            except _Abandoned:
                continue
        return found
    result: Result | None = None
    error: BaseException | None = None
    started = time.perf_counter()
    try:
        result = await shared(outer, key, read)
        return result
    except BaseException as exc:
        error = exc
        raise
    finally:
        if not outer:
            memo.read_seconds += time.perf_counter() - started
        memo._settle(key, result, error)


def shared_sync(memos: list[DataMemo], key: str, read: Callable[[], Result]) -> Result:
    """:func:`shared` for sync callers. On an event loop's thread it never waits for
    another caller's read (that read may need this very loop): it reads by itself."""
    if not memos:
        return read()
    memo, outer = memos[0], memos[1:]
    on_loop = asyncio_running()
    while True:
        found = memo._claim(key)
        if found is None:
            break
        if isinstance(found, Future):
            if on_loop:
                return shared_sync(outer, key, read)
            try:
                return found.result()
            except _Abandoned:
                continue
        return found
    result: Result | None = None
    error: BaseException | None = None
    started = time.perf_counter()
    try:
        result = shared_sync(outer, key, read)
        return result
    except BaseException as exc:
        error = exc
        raise
    finally:
        if not outer:
            memo.read_seconds += time.perf_counter() - started
        memo._settle(key, result, error)


def asyncio_running() -> bool:
    """Whether this thread is running an event loop now."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
