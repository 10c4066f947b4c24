"""``cached``: Next.js' ``unstable_cache`` for Python functions, sync or async.

The key is the function's identity (module, qualified name and a hash of its code, so
an edited function does not serve results of the old one), the ``key_parts`` and the
call's arguments. Results are pickled, like Django's cache: anything picklable works.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import pickle
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from pyisr.cache.entry import validate_revalidate
from pyisr.cache.tags import validate_tags
from pyisr.data._lookup import DataRequest, data_key, read_through, read_through_sync, record_in_render
from pyisr.engine import Rendered

F = TypeVar("F", bound=Callable[..., Any])


def _function_identity(fn: Callable[..., Any]) -> str:
    code = getattr(fn, "__code__", None)
    digest = ""
    if code is not None:
        digest = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16]
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}#{digest}"


@overload
def cached(
    fn: F,
    key_parts: Iterable[str] | None = None,
    *,
    revalidate: int | bool | None = None,
    tags: Iterable[str] | None = None,
) -> F: ...


@overload
def cached(
    fn: None = None,
    key_parts: Iterable[str] | None = None,
    *,
    revalidate: int | bool | None = None,
    tags: Iterable[str] | None = None,
) -> Callable[[F], F]: ...


def cached(
    fn: Callable[..., Any] | None = None,
    key_parts: Iterable[str] | None = None,
    *,
    revalidate: int | bool | None = None,
    tags: Iterable[str] | None = None,
) -> Any:
    """Cache ``fn``'s results with stale-while-revalidate.

    ``revalidate``: seconds, or ``None``/``False`` to keep until a tag is revalidated
    (``0`` is refused: a value that is never cached needs no ``cached``). ``tags``:
    names for ``revalidate_tag``. Usable as ``cached(fn, [...], ...)`` or as a
    decorator ``@cached(key_parts=[...], ...)``. A sync function gets a sync wrapper
    with an async twin at ``.aio``; an async function an async wrapper.
    """
    if fn is None:
        return lambda f: cached(f, key_parts, revalidate=revalidate, tags=tags)
    if not callable(fn):
        raise TypeError(f"cached() needs a function, not {type(fn).__name__}")
    seconds = validate_revalidate(revalidate, where=f"cached({getattr(fn, '__name__', fn)!r})")
    if seconds == 0:
        raise ValueError(
            f"cached({getattr(fn, '__name__', fn)!r}) got revalidate=0, which would never "
            "cache: pass seconds > 0, or None/False to cache until a tag is revalidated"
        )
    tag_tuple = validate_tags(tags, where=f"cached({getattr(fn, '__name__', fn)!r}) tags")
    parts = [str(p) for p in (key_parts or [])]
    identity = _function_identity(fn)
    is_async = inspect.iscoroutinefunction(fn)

    def key_for(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        return data_key("cached", identity, parts, list(args), kwargs)

    def compute_for(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Any]:
        if is_async:

            async def compute_async() -> Rendered:
                return Rendered(pickle.dumps(await fn(*args, **kwargs), protocol=5))

            return compute_async

        def compute_sync() -> Rendered:
            return Rendered(pickle.dumps(fn(*args, **kwargs), protocol=5))

        return compute_sync

    async def call_async(*args: Any, **kwargs: Any) -> Any:
        entry, _ = await read_through(
            key_for(args, kwargs),
            compute_for(args, kwargs),
            seconds,
            tag_tuple,
            DataRequest.from_context(),
        )
        record_in_render(entry)
        return pickle.loads(entry.body)

    if is_async:
        wrapper = functools.wraps(fn)(call_async)
    else:

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            entry, _ = read_through_sync(key_for(args, kwargs), compute_for(args, kwargs), seconds, tag_tuple)
            record_in_render(entry)
            return pickle.loads(entry.body)

        wrapper.aio = call_async  # type: ignore[attr-defined]
    wrapper.cache_tags = tag_tuple  # type: ignore[attr-defined]
    wrapper.cache_revalidate = seconds  # type: ignore[attr-defined]
    return wrapper
