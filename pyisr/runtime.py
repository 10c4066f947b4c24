"""The process-wide default engine, and running async work from sync code.

``cached``, ``fetch``, ``revalidate_tag`` and ``revalidate_path`` work from any code,
so they need an engine without being handed one. A started server makes its engine the
default; a script names its site (``configure(site="mysite")``, or ``PYISR_SITE``) and
gets the very cache the site's server uses (``pyisr.site_store``), or a cache URL
(``configure("redis://...")``, ``PYISR_CACHE``). Inside a page render, data calls use
the engine rendering the page, whatever the default is.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

from pyisr import lifetimes
from pyisr.cache.urls import build_handler, parse_size
from pyisr.engine import Engine

T = TypeVar("T")

_engine: Engine | None = None
_engine_lock = threading.Lock()


def site_engine(site: str | os.PathLike[str], **options: Any) -> Engine:
    """An engine over a site's cache, configured as the site's server configures its own."""
    from pyisr.config import load_config
    from pyisr.log import configure_fetch_logging
    from pyisr.site_store import open_site_cache

    config = load_config(site)
    lifetimes.use_config(config)  # the site's cache profiles, for this script's data calls
    configure_fetch_logging(config.log_fetches, config.log_fetches_full_url)
    tier = options.pop("memory_tier_bytes", None)
    handler = open_site_cache(site, config, memory_tier_bytes=tier)
    options.setdefault("render_timeout", config.render_timeout)
    options.setdefault("max_concurrent_renders", config.render_concurrency)
    options.setdefault("debug", config.debug_cache or None)
    options.setdefault("cdn_tag_headers", config.cdn_tag_headers)
    options.setdefault("compress", config.compress)
    options.setdefault("rewarm_rate", config.rewarm_rate)
    cdn = options.pop("cdn", None)
    return _with_cdn(Engine(handler, **options), config.cdn if cdn is None else cdn)


def _build(cache: object | None, options: dict[str, Any]) -> Engine:
    site = options.pop("site", None)
    if site is None and cache is None and os.environ.get("PYISR_SITE"):
        site = os.environ["PYISR_SITE"]
    if site is not None:
        if cache is not None:
            raise ValueError("configure(): give a cache or a site, not both (the site names its cache)")
        if options.get("build_id") is not None:
            raise ValueError("configure(): a site has builds of its own (pyisr build): give no build_id")
        options.pop("build_id", None)
        return site_engine(site, **options)
    tier = options.pop("memory_tier_bytes", os.environ.get("PYISR_MEMORY_TIER", "50MB"))
    base_dir = options.pop("base_dir", ".")
    _serving_defaults(options)
    cdn = options.pop("cdn", None)
    build_id = options.pop("build_id", None)
    where = "configure(build_id=...)"
    if build_id is None and os.environ.get("PYISR_BUILD_ID"):
        build_id, where = os.environ["PYISR_BUILD_ID"], "PYISR_BUILD_ID"
    url = cache if cache is not None else os.environ.get("PYISR_CACHE")
    if build_id is None:
        engine = Engine(build_handler(url, base_dir=base_dir, memory_tier_bytes=parse_size(tier)), **options)
    else:
        from pyisr.app_builds import AppBuild, check_build_id, record_for, scope_cache

        if url is not None and not isinstance(url, str):
            raise ValueError(f"{where}: a build scopes a cache named by URL; scope your own handler yourself")
        check_build_id(build_id, where)
        try:
            scoped = scope_cache(url, build_id, base_dir)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        handler = build_handler(scoped, base_dir=base_dir, memory_tier_bytes=parse_size(tier))
        engine = Engine(handler, **options)
        engine.edge_build = build_id
        engine.app_build = AppBuild(build_id, record_for(url, handler, base_dir))
    if cdn is None:
        return _with_cdn(engine, os.environ.get("PYISR_CDN", ""), "PYISR_CDN")
    return _with_cdn(engine, cdn, "configure(cdn=...)")


def _serving_defaults(options: dict[str, Any]) -> None:
    """How pages are served (``compress``, ``cdn_tag_headers``, ``rewarm_rate``) when not
    given: from ``PYISR_COMPRESS``, ``PYISR_CDN_TAG_HEADERS`` and ``PYISR_REWARM_RATE``,
    read and checked as a site's server reads them, else their defaults."""
    from pyisr.config import SERVING_KEYS, load_config

    if all(name in options for name in SERVING_KEYS):
        return
    variables = {f"PYISR_{name.upper()}" for name in SERVING_KEYS}
    config = load_config(None, environ={k: v for k, v in os.environ.items() if k in variables})
    for name in SERVING_KEYS:
        options.setdefault(name, getattr(config, name))


def _with_cdn(engine: Engine, urls: Iterable[str] | str, where: str = "cdn") -> Engine:
    """``engine``, purging the CDNs ``urls`` name (a list, or ``PYISR_CDN``'s comma-separated
    form); a bad URL or a missing token is a ``ValueError`` that says ``where`` it was named."""
    from pyisr.cdn import attach_cdn
    from pyisr.cdn.urls import parse_cdn_urls

    try:
        attach_cdn(engine, parse_cdn_urls(urls))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return engine


def configure(
    cache: object | None = None, *, site: str | os.PathLike[str] | None = None, **options: Any
) -> Engine:
    """Install the default engine: over a handler URL or object, or over a site's cache.

    ``site="mysite"`` uses exactly the store and namespace the site's server uses (its
    ``pyisr.toml``, ``PYISR_*`` and current build id), so a script's ``revalidate_tag``
    reaches the running server. Otherwise ``cache`` is a URL or handler; with neither,
    ``PYISR_SITE``, then ``PYISR_CACHE``, then ``.pyisr/cache``. ``memory_tier_bytes``
    sizes the memory tier (``0`` disables it); ``base_dir`` anchors a relative ``file:``
    URL; ``cdn`` names the CDNs every invalidation purges (URLs, as the ``cdn`` setting;
    else the site's setting, or ``PYISR_CDN``); ``build_id`` (else ``PYISR_BUILD_ID``)
    names an app's deploy, whose pages then never mix with another's, in the cache or at
    the edge (:mod:`pyisr.app_builds`); other options go to :class:`Engine`.
    Returns the engine; call it once at start-up. Resolvers registered on the engine it
    replaces (``@isr`` views decorated earlier) are kept.
    """
    global _engine
    engine = _build(cache, {**options, "site": site})
    with _engine_lock:
        previous, _engine = _engine, engine
    if previous is not None:
        for resolver in previous.resolvers():
            engine.add_resolver(resolver)
    return engine


def set_engine(engine: Engine | None) -> None:
    """Make ``engine`` the default (the server and tests use this)."""
    global _engine
    with _engine_lock:
        _engine = engine


def get_engine() -> Engine:
    """The default engine, created from the environment (``PYISR_CACHE``) on first use."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _build(None, {})
        return _engine


class _SyncBridge:
    """A private event loop in a daemon thread, for sync callers with no loop of their own."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def _forget(self) -> None:
        """After ``fork`` the loop's thread exists only in the parent: start afresh."""
        self._loop = None
        self._lock = threading.Lock()

    def loop(self) -> asyncio.AbstractEventLoop:
        """The bridge's long-lived loop (started on first use): work submitted to it
        outlives the caller's own short-lived loop (e.g. ``async_to_sync``'s)."""
        return self._ensure()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="pyisr-sync", daemon=True)
                thread.start()
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the bridge loop and wait for it.

        Called from an event loop thread this blocks that loop for the duration, which
        is why every sync function has an async twin for async code.
        """
        if threading.current_thread().name == "pyisr-sync":
            coro.close()
            raise RuntimeError(
                "a sync pyisr call was made from async code running on pyisr's own sync "
                "bridge; use the async form (e.g. `await fn.aio(...)`)"
            )
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._ensure())
        return future.result()


bridge = _SyncBridge()
if hasattr(os, "register_at_fork"):
    # Pre-forking servers (gunicorn --preload) fork after the app may have made sync calls.
    os.register_at_fork(after_in_child=bridge._forget)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    return bridge.run(coro)
