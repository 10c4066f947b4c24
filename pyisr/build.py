"""``pyisr build``: prerender every known page of a site into its cache.

Every route is loaded and checked first; then static params are collected and all
known pages render concurrently (bounded by the render concurrency). A page that
raises fails the build with its path and the error. The build writes a new build id
and a manifest of routes, their kinds, revalidate times and prerendered paths.

A build fills a cache namespace of its own and becomes current only once it succeeded
(``pyisr.deploys``): servers running meanwhile keep serving their own build, untouched.

The work is pipelined, so its time grows with the number of pages and no faster:

* data calls are shared by the whole build (:func:`pyisr.data.memo.build_scope`): a
  value every page reads is computed or read from the store once, then handed to each
  page from memory (up to the ``memory_tier`` budget);
* writes leave the renders' path (:class:`PipelinedWrites`): a rendered page is handed
  to the store's writer and the render slot goes to the next page at once, while the
  writer keeps the disk busy; a write that fails fails the build.

The result says where the time went (:class:`BuildTimings`, also kept in the manifest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyisr.cache.entry import CacheEntry
from pyisr.cache.files import exclusive_lock
from pyisr.cache.handler import CacheHandler
from pyisr.config import Config
from pyisr.data.memo import DataMemo, build_scope
from pyisr.deploys import (
    STAGING_PREFIX,
    make_current,
    publish_pages,
    read_manifest,
    record_build,
    registry_lock,
    remove_stale_staging,
    remove_unused_builds,
)
from pyisr.engine import Engine, NotShareable, RevalidationError
from pyisr.origin import CanonicalOrigin
from pyisr.site.route import Route
from pyisr.site.site import Site
from pyisr.site_store import is_shared_cache, is_valid_build_id, local_cache_root, open_site_cache

logger = logging.getLogger("pyisr.build")


@dataclass
class RouteReport:
    route: Route
    keys: list[str] = field(default_factory=list)
    bytes: int = 0
    revalidates: set[Any] = field(default_factory=set)


@dataclass
class BuildTimings:
    """Where a build's time went. Pages render concurrently, so ``render`` and ``data``
    are summed over them (they may exceed the wall time); ``write`` is the wall time the
    store was busy with the build's writes, which overlap the renders."""

    #: Seconds pages took to render, their data reads excluded.
    render: float = 0.0
    #: Seconds data reads took that computed a value or read it from the store.
    data: float = 0.0
    #: Seconds the store was writing.
    write: float = 0.0
    #: Data calls made, and how many of them got another call's result.
    data_calls: int = 0
    data_shared: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "render_s": round(self.render, 3),
            "data_s": round(self.data, 3),
            "write_s": round(self.write, 3),
            "data_calls": self.data_calls,
            "data_shared": self.data_shared,
        }


@dataclass
class BuildResult:
    build_id: str
    reports: list[RouteReport]
    errors: list[tuple[str, str]]
    seconds: float
    timings: BuildTimings = field(default_factory=BuildTimings)

    @property
    def pages(self) -> int:
        return sum(len(r.keys) for r in self.reports)

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        """One line: pages, wall time, pages/s and where the time went."""
        t = self.timings
        return (
            f"Built {self.pages} pages in {self.seconds:.2f}s ({self.pages_per_second:.0f} pages/s); "
            f"render {t.render:.2f}s, data {t.data:.2f}s ({t.data_calls - t.data_shared:,} reads "
            f"for {t.data_calls:,} calls), write {t.write:.2f}s (render and data summed over "
            "concurrent pages)."
        )


ProgressFn = Callable[[int, int], None]


async def build_site(
    site_dir: str | Path, config: Config, *, progress: ProgressFn | None = None, build_id: str | None = None
) -> BuildResult:
    """Prerender the site; returns the result (errors listed, not raised)."""
    started = time.perf_counter()
    build_id = build_id or secrets.token_hex(8)
    if not is_valid_build_id(build_id):
        raise ValueError(f"invalid build id {build_id!r}: letters, digits, '_' and '-' only")
    if read_manifest(site_dir, build_id) is not None:
        raise ValueError(f"build {build_id} exists already: a build id names one build")
    site = Site.load(site_dir)
    dot = site.dot_dir
    dot.mkdir(parents=True, exist_ok=True)
    with _exclusive_build(dot):
        return await _build_locked(site, config, progress, build_id, started)


class BuildInProgress(RuntimeError):
    """Another ``pyisr build`` of the same site is running."""


@contextlib.contextmanager
def _exclusive_build(dot: Path) -> Iterator[None]:
    """One build of a site at a time: a second one would remove the first's staging directory."""
    lock = dot / "build.lock"
    held = exclusive_lock(lock, blocking=False)
    try:
        held.__enter__()
    except BlockingIOError:
        raise BuildInProgress(f"another `pyisr build` of this site is running ({lock})") from None
    try:
        yield
    finally:
        held.__exit__(None, None, None)


async def _build_locked(
    site: Site, config: Config, progress: ProgressFn | None, build_id: str, started: float
) -> BuildResult:
    stores, staging, fresh_store = _open_build_store(site, config, build_id)
    # A store nobody reads yet takes writes off the renders' path; another is written as usual.
    handler = PipelinedWrites(stores) if fresh_store else stores[0]
    engine = Engine(
        handler,
        render_timeout=config.render_timeout,
        max_concurrent_renders=config.render_concurrency,
        debug=config.debug_cache or None,
        compress=config.compress,
    )
    timings = BuildTimings()
    complete = False
    # Pages' data calls go through this engine too (the render context carries it), and
    # identical ones, static params included, are read once for the whole build.
    with build_scope(config.memory_tier, engine) as memo:
        reports, jobs, errors = await _plan(site)
        planned_data = memo.read_seconds
        try:
            rendering = await _prerender_all(
                engine, site, config, jobs, errors, fresh_store=fresh_store, progress=progress
            )
            await engine.drain()
            if isinstance(handler, PipelinedWrites):
                errors.extend(await handler.flush())
                timings.write = handler.busy_seconds
            complete = not errors
        finally:
            await handler.close()
            if staging is not None and not complete:
                shutil.rmtree(staging, ignore_errors=True)  # failed or interrupted: never published
    _account(timings, memo, rendering, planned_data)
    result = BuildResult(build_id, reports, errors, time.perf_counter() - started, timings)
    if not errors:
        _publish(site, config, result, staging)
    logger.info("%s", result.summary())
    return result


def _account(timings: BuildTimings, memo: DataMemo, rendering: float, planned_data: float) -> None:
    """Split the pages' summed render time into their data reads and the rest."""
    timings.data = memo.read_seconds
    timings.data_calls, timings.data_shared = memo.calls, memo.shared
    timings.render = max(0.0, rendering - (memo.read_seconds - planned_data))


T = TypeVar("T")


class PipelinedWrites(CacheHandler):
    """A store that nobody reads yet, written behind the renders.

    ``set`` hands the entry to the store and returns at once (``True``: nobody else
    writes this namespace, so nothing can fence it off), so a render slot goes to the
    next page while earlier pages are written; at most ``max_writes`` writes or
    ``max_bytes`` bytes wait at a time, so memory stays bounded when the disk is slower
    than the renders. ``stores`` are handlers over the one namespace, each with its own
    writer: a key always goes to the same one, so writes of one key keep their order
    while several keys are written at once (creating a file mostly waits for the disk,
    and files in different directories do not wait for each other). :meth:`flush` waits
    for every write and returns those that failed (a failed write fails the build, as
    it did when it was awaited).

    Nobody else uses the namespace, so this process knows what it holds: ``get`` sees an
    entry as soon as it is handed over, answers a key never written with no I/O, and
    the regeneration lock is this process's own (no lock file per data value).
    """

    def __init__(
        self, stores: list[CacheHandler], *, max_writes: int = 256, max_bytes: int = 32 * 1024**2
    ) -> None:
        self.stores = stores
        self.store = stores[0]
        self.name = self.store.name
        self.max_writes = max_writes
        self.max_bytes = max_bytes
        self._room = asyncio.Condition()
        self._writing = 0
        self._bytes = 0
        #: The newest write of each key still under way, and its entry (read-your-writes).
        self._last: dict[str, tuple[CacheEntry, asyncio.Task[None]]] = {}
        #: Every key handed over: any other is not in the store.
        self._written: set[str] = set()
        self._failures: list[tuple[str, str]] = []
        #: Wall time with at least one write under way.
        self.busy_seconds = 0.0
        self._busy_since = 0.0
        #: The build's loop: the condition and the write tasks belong to it. A sync render's
        #: data call reaches the store from pyisr's bridge loop in another thread; its calls
        #: are run here (an asyncio condition notified from another thread wakes nobody).
        self._loop = asyncio.get_running_loop()

    async def _on_own_loop(self, call: Coroutine[Any, Any, T]) -> T:
        if asyncio.get_running_loop() is self._loop:
            return await call
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, self._loop))

    async def get(self, key: str) -> CacheEntry | None:
        return await self._on_own_loop(self._get(key))

    async def _get(self, key: str) -> CacheEntry | None:
        if key not in self._written:
            return None
        last = self._last.get(key)
        return last[0] if last is not None else await self.store.get(key)

    async def set(self, entry: CacheEntry) -> bool:
        return await self._on_own_loop(self._set(entry))

    async def _set(self, entry: CacheEntry) -> bool:
        size = len(entry.body)
        async with self._room:
            await self._room.wait_for(
                lambda: (
                    self._writing == 0
                    or (self._writing < self.max_writes and self._bytes + size <= self.max_bytes)
                )
            )
            if self._writing == 0:
                self._busy_since = time.perf_counter()
            self._writing += 1
            self._bytes += size
        before = self._last.get(entry.key)
        self._written.add(entry.key)
        task = asyncio.create_task(self._write(entry, before[1] if before is not None else None))
        self._last[entry.key] = (entry, task)
        return True

    async def _write(self, entry: CacheEntry, before: asyncio.Task[None] | None) -> None:
        try:
            if before is not None:
                await asyncio.wait([before])
            await self.stores[hash(entry.key) % len(self.stores)].set(entry)
        except Exception as exc:  # noqa: BLE001 - reported by flush, with the page
            self._failures.append((entry.key, f"{type(exc).__name__}: {exc}"))
        finally:
            last = self._last.get(entry.key)
            if last is not None and last[0] is entry:
                del self._last[entry.key]
            async with self._room:
                self._writing -= 1
                self._bytes -= len(entry.body)
                if self._writing == 0:
                    self.busy_seconds += time.perf_counter() - self._busy_since
                self._room.notify_all()

    async def flush(self) -> list[tuple[str, str]]:
        """Wait for every write handed over; the (key, error) of those that failed."""
        return await self._on_own_loop(self._flush())

    async def _flush(self) -> list[tuple[str, str]]:
        async with self._room:
            await self._room.wait_for(lambda: self._writing == 0)
        failures, self._failures = self._failures, []
        return failures

    async def delete(self, key: str) -> None:
        await self.flush()
        self._written.discard(key)
        await self.store.delete(key)

    async def revalidate_tags(self, tags: Any, at: float) -> None:
        await self.store.revalidate_tags(tags, at)

    async def tag_times(self, tags: Any) -> Any:
        return await self.store.tag_times(tags)

    async def tag_changes(self, cursor: Any) -> Any:
        return await self.store.tag_changes(cursor)

    def signing_key_home(self) -> Any:
        return self.store.signing_key_home()

    async def close(self) -> None:
        try:
            await self.flush()
        finally:
            for store in self.stores:
                await store.close()


#: Writers a local build keeps busy at once (each its own thread; see PipelinedWrites).
WRITE_LANES = 4


def _open_build_store(site: Site, config: Config, build_id: str) -> tuple[list[Any], Path | None, bool]:
    """The store the build fills (as several handlers when a local one takes concurrent
    writers), its staging directory if any, and whether nobody serves it yet.

    Every build fills a namespace of its own, which nobody serves before the build is
    published, so no server ever sees half a build. A local cache (the default
    ``.pyisr/cache``, or a ``file:`` one) is written into a private staging directory
    beside the namespaces, straight into place and unfsynced (that was most of the
    build's time), then renamed into ``<root>/<build id>`` once the whole build
    succeeded; a failed or killed build publishes nothing. A shared store (Redis) gets
    the build id in its keys.
    """
    root = local_cache_root(site.root, config)
    if root is not None:
        from pyisr.cache.filesystem import FileSystemCache

        remove_stale_staging(site.root, config)
        staging = root / f"{STAGING_PREFIX}{build_id}"
        lanes = [FileSystemCache(staging, fsync=False, staging=True) for _ in range(WRITE_LANES)]
        return lanes, staging, True
    handler = open_site_cache(site.root, config, build_id=build_id, memory_tier_bytes=0)
    return [handler], None, is_shared_cache(config.cache or "")


async def _plan(site: Site) -> tuple[list[RouteReport], list[tuple[RouteReport, str]], list[tuple[str, str]]]:
    """Every route's report, the (route, key) pairs to prerender, and the errors found so far."""
    reports: list[RouteReport] = []
    errors: list[tuple[str, str]] = []
    jobs: list[tuple[RouteReport, str]] = []
    for route in site.routes:
        report = RouteReport(route)
        reports.append(report)
        try:
            paths = await route.static_paths()
            route.fallback, keys = paths.fallback, paths.keys
        except Exception as exc:  # noqa: BLE001 - reported with the route
            errors.append((route.pattern, f"{type(exc).__name__}: {exc}"))
            continue
        seen: set[str] = set()
        for key in keys:
            found = site.match(key)
            if found is None or found[0] is not route:
                errors.append((key, f"static path {key} does not match its route {route.pattern}"))
                continue
            if key not in seen:
                seen.add(key)
                jobs.append((report, key))
    return reports, jobs, errors


async def _prerender_all(
    engine: Engine,
    site: Site,
    config: Config,
    jobs: list[tuple[RouteReport, str]],
    errors: list[tuple[str, str]],
    *,
    fresh_store: bool,
    progress: ProgressFn | None,
) -> float:
    """Render and store every planned page, ``render_concurrency`` at a time; returns the
    seconds the renders took, summed."""
    total, done = len(jobs), 0
    rendering = 0.0
    origin = CanonicalOrigin(config.site_url, config.allowed_hosts).default()
    semaphore = asyncio.Semaphore(config.render_concurrency)

    async def prerender(report: RouteReport, key: str) -> None:
        nonlocal done, rendering
        route = report.route
        _, params = site.match(key)  # type: ignore[misc]
        async with semaphore:
            started = time.perf_counter()
            try:
                entry = await engine.revalidate_now(
                    key,
                    route.renderer(key, params, origin=origin),
                    route.policy(key, bot=True),
                    prerender=fresh_store,
                )
            except NotShareable:
                pass  # served per visitor, with the engine's warning; nothing to prerender
            except RevalidationError as exc:
                cause = exc.__cause__ or exc
                errors.append((key, f"{type(cause).__name__}: {cause}"))
            else:
                if entry.status == 307 or entry.status == 308:
                    errors.append(
                        (key, "redirect can not be returned from get_static_props during prerendering")
                    )
                report.keys.append(key)
                report.bytes += len(entry.body)
                report.revalidates.add(entry.revalidate)
            rendering += time.perf_counter() - started
        done += 1
        if progress is not None:
            progress(done, total)

    await asyncio.gather(*(prerender(r, k) for r, k in jobs))
    return rendering


def _publish(site: Site, config: Config, result: BuildResult, staging: Path | None) -> None:
    """Make a successful build the current one, then remove builds nobody uses any more.

    In this order, each step atomic: the manifest is kept (``builds/<id>/``), the staged
    pages are renamed into their namespace, and ``BUILD_ID`` is written last. A build
    killed before that last write leaves the current build current; what it left is
    removed by a later build. Servers running keep the build they started with.
    """
    if staging is not None:
        os.sync()  # the pages were written unfsynced: durable before anybody reads them
    with registry_lock(site.root):
        record_build(site.root, result.build_id, _manifest(site, result))
        if staging is not None:
            publish_pages(staging, staging.with_name(result.build_id))
        make_current(site.root, result.build_id)
    remove_unused_builds(site.root, config)


def _manifest(site: Site, result: BuildResult) -> dict[str, Any]:
    return {
        "build_id": result.build_id,
        "created_at": time.time(),
        "stats": {
            "pages": result.pages,
            "seconds": round(result.seconds, 3),
            "pages_per_s": round(result.pages_per_second, 1),
            **result.timings.to_json(),
        },
        "routes": [
            {
                "pattern": r.route.pattern,
                "file": str(r.route.file.relative_to(site.root)),
                "kind": r.route.kind.value,
                "type": r.route.describe_kind(),
                "revalidate": r.route.revalidate,
                "dynamic_params": r.route.dynamic_params,
                "fallback": r.route.fallback,
                "prerendered": sorted(r.keys),
                "bytes": r.bytes,
            }
            for r in result.reports
        ],
    }
