"""``cached``: Next.js' ``unstable_cache`` for Python functions, sync or async.

The key is the function's identity (module, qualified name and a hash of its code, so
an edited function does not serve results of the old one), the ``key_parts``, the
call's arguments and the serializer. Results are stored as JSON by default (JSON
types plus tuples, sets, bytes, dates and times, Decimal and UUID; anything else is
refused when stored), or pickled and signed with ``serializer="pickle"``: a cache
shared with others must never be a way to make this process run their code. See
:mod:`pyisr.data.serializer`.

A value is decoded once and shared: a hit on an unchanged entry reads nothing and
decodes nothing, and identical calls in one render share one computation
(:mod:`pyisr.data.memo`). So each call gets its own top-level list or dict of a JSON
value, but what is nested in it is shared and read-only (:mod:`pyisr.data.frozen`: copy
an item to change it); a pickled value is unpickled afresh for each caller.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import inspect
import os
import threading
import types
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, overload

from pyisr import lifetimes
from pyisr.cache.tags import validate_tags
from pyisr.data import memo
from pyisr.data import serializer as codec
from pyisr.data._lookup import DataRequest, data_key, read_through, read_through_sync, record_in_render
from pyisr.data.frozen import freeze, own
from pyisr.data.memo import Decoded
from pyisr.data.serializer import SerializerName
from pyisr.data.signing import signing_key
from pyisr.engine import Rendered
from pyisr.runtime import get_engine

F = TypeVar("F", bound=Callable[..., Any])


def _stable_repr(value: Any) -> str:
    """``repr`` of a code constant, the same in every process (no addresses, no hash order)."""
    if isinstance(value, types.CodeType):
        return "code:" + _code_digest(value)
    if isinstance(value, frozenset):
        return "frozenset(" + ",".join(sorted(_stable_repr(v) for v in value)) + ")"
    if isinstance(value, tuple):
        return "(" + ",".join(_stable_repr(v) for v in value) + ")"
    return repr(value)


def _code_digest(code: types.CodeType) -> str:
    # The bytecode alone misses the names it uses (``db.posts()`` vs ``db.users()``), and
    # ``repr`` of nested code objects (comprehensions, lambdas) holds their address.
    h = hashlib.sha256(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        h.update(_stable_repr(const).encode())
        h.update(b"\0")
    return h.hexdigest()


def _function_identity(fn: Callable[..., Any]) -> str:
    code = getattr(fn, "__code__", None)
    digest = _code_digest(code)[:16] if isinstance(code, types.CodeType) else ""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}#{digest}"


_data_threads: ThreadPoolExecutor | None = None
_data_threads_lock = threading.Lock()


def _data_executor() -> ThreadPoolExecutor:
    """Threads for sync data functions, apart from the engine's render threads.

    A sync page holds a render thread while it waits for its data; if the data needed a
    render thread too, as many concurrent pages as there are render threads would wait
    for each other until the render timeout.
    """
    global _data_threads
    with _data_threads_lock:
        if _data_threads is None:
            _data_threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="pyisr-data")
        return _data_threads


def _forget_data_threads() -> None:
    # A forked child has none of the parent's threads; an inherited pool would never run.
    global _data_threads, _data_threads_lock
    _data_threads = None
    _data_threads_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_data_threads)


@overload
def cached(
    fn: F,
    key_parts: Iterable[str] | None = None,
    *,
    revalidate: int | bool | str | None = None,
    tags: Iterable[str] | None = None,
    serializer: SerializerName = "json",
    expire: int | None = None,
) -> F: ...


@overload
def cached(
    fn: None = None,
    key_parts: Iterable[str] | None = None,
    *,
    revalidate: int | bool | str | None = None,
    tags: Iterable[str] | None = None,
    serializer: SerializerName = "json",
    expire: int | None = None,
) -> Callable[[F], F]: ...


def cached(
    fn: Callable[..., Any] | None = None,
    key_parts: Iterable[str] | None = None,
    *,
    revalidate: int | bool | str | None = None,
    tags: Iterable[str] | None = None,
    serializer: SerializerName = "json",
    expire: int | None = None,
) -> Any:
    """Cache ``fn``'s results with stale-while-revalidate.

    ``revalidate``: seconds, ``None``/``False`` to keep until a tag is revalidated, or a
    profile name (``"hours"``, or one of ``pyisr.toml``'s); ``0`` is refused: a value
    that is never cached needs no ``cached``. ``expire``: seconds after which a value
    is never served (else the profile's, or the site's one year). ``tags``:
    names for ``revalidate_tag``. ``serializer``: ``"json"`` (the default; a result
    JSON cannot bring back as the same type is refused with a ``TypeError``) or
    ``"pickle"`` (any picklable result, signed; needs ``PYISR_SIGNING_KEY`` with a
    shared cache such as Redis). Usable as ``cached(fn, [...], ...)`` or as a
    decorator ``@cached(key_parts=[...], ...)``. A sync function gets a sync wrapper
    with an async twin at ``.aio``; an async function an async wrapper.
    """
    if fn is None:
        return lambda f: cached(
            f, key_parts, revalidate=revalidate, tags=tags, serializer=serializer, expire=expire
        )
    if not callable(fn):
        raise TypeError(f"cached() needs a function, not {type(fn).__name__}")
    name = getattr(fn, "__name__", fn)
    lifetime = lifetimes.deferred(revalidate, expire, where=f"cached({name!r})")
    seconds = None if isinstance(revalidate, str) else lifetime().revalidate
    if seconds == 0:
        raise ValueError(
            f"cached({name!r}) got revalidate=0, which would never "
            "cache: pass seconds > 0, or None/False to cache until a tag is revalidated"
        )
    if serializer not in codec.SERIALIZERS:
        raise ValueError(
            f"cached({name!r}) got serializer={serializer!r}; use 'json' (the default) or 'pickle'"
        )
    tag_tuple = validate_tags(tags, where=f"cached({name!r}) tags")
    parts = [str(p) for p in (key_parts or [])]
    identity = _function_identity(fn)
    is_async = inspect.iscoroutinefunction(fn)
    where = f"cached({name!r})"
    what = f"cached({identity.partition('#')[0]})"

    def key_for(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        # The serializer is part of the key: bytes of one format never reach the other's reader.
        return data_key("cached", serializer, identity, parts, list(args), kwargs)

    def secret(request: DataRequest) -> bytes | None:
        # Asked on every call: the engine (and so the store) is only known once called.
        if serializer != "pickle":
            return None
        engine = request.engine if request.engine is not None else get_engine()
        return signing_key(engine.handler, where=where)

    def compute_for(
        key: str, signing: bytes | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable[[], Awaitable[Rendered]]:
        def encode(value: Any) -> bytes:
            return codec.dumps(serializer, value, data_key=key, secret=signing, where=where)

        if is_async:

            async def compute_async() -> Rendered:
                return Rendered(encode(await fn(*args, **kwargs)))

            return compute_async

        def run() -> bytes:
            return encode(fn(*args, **kwargs))

        async def compute_sync() -> Rendered:
            loop = asyncio.get_running_loop()
            call = functools.partial(contextvars.copy_context().run, run)
            return Rendered(await loop.run_in_executor(_data_executor(), call))

        return compute_sync

    def decoder(key: str, signing: bytes | None) -> Callable[[bytes], Decoded]:
        if serializer == "pickle":

            def decode_pickle(body: bytes) -> Decoded:
                assert signing is not None
                payload = codec.pickle_payload(body, data_key=key, secret=signing)
                codec.unpickle(payload)  # unreadable now, not in a caller's handout
                return Decoded(payload, 3 * len(payload), copy=codec.unpickle)

            return decode_pickle

        def decode_json(body: bytes) -> Decoded:
            value, size = freeze(codec.loads_json(body), len(body))
            return Decoded(value, size, copy=own)

        return decode_json

    def read_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        # Made on the caller's thread: the render context (and so the engine) is read there.
        request = DataRequest.from_context()
        key, signing = key_for(args, kwargs), secret(request)
        compute = compute_for(key, signing, args, kwargs)
        return key, compute, lifetime(), tag_tuple, request, decoder(key, signing), what

    async def call_async(*args: Any, **kwargs: Any) -> Any:
        found = read_args(args, kwargs)
        life = found[2]

        async def read() -> memo.Result:
            decoded, entry, _ = await read_through(*found)
            return decoded, entry

        memo_key = memo.memo_key(found[0], life.revalidate, life.expire, tag_tuple)
        decoded, entry = await memo.shared(memo.scopes(), memo_key, read)
        record_in_render(entry, life)
        return decoded.handout()

    if is_async:
        wrapper = functools.wraps(fn)(call_async)
    else:

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            found = read_args(args, kwargs)
            life = found[2]

            def read() -> memo.Result:
                decoded, entry, _ = read_through_sync(*found)
                return decoded, entry

            memo_key = memo.memo_key(found[0], life.revalidate, life.expire, tag_tuple)
            decoded, entry = memo.shared_sync(memo.scopes(), memo_key, read)
            record_in_render(entry, life)
            return decoded.handout()

        wrapper.aio = call_async  # type: ignore[attr-defined]
    wrapper.cache_tags = tag_tuple  # type: ignore[attr-defined]
    wrapper.cache_revalidate = revalidate if isinstance(revalidate, str) else seconds  # type: ignore[attr-defined]
    wrapper.cache_serializer = serializer  # type: ignore[attr-defined]
    return wrapper
