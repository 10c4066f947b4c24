"""``pyisr build``: prerender every known page of a site into its cache.

Every route is loaded and checked first; then static params are collected and all
known pages render concurrently (bounded by the render concurrency). A page that
raises fails the build with its path and the error. The build writes a new build id
and a manifest of routes, their kinds, revalidate times and prerendered paths.

A build fills a cache namespace of its own and becomes current only once it succeeded
(``pyisr.deploys``): servers running meanwhile keep serving their own build, untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyisr.cache.files import exclusive_lock
from pyisr.config import Config
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


@dataclass
class RouteReport:
    route: Route
    keys: list[str] = field(default_factory=list)
    bytes: int = 0
    revalidates: set[Any] = field(default_factory=set)


@dataclass
class BuildResult:
    build_id: str
    reports: list[RouteReport]
    errors: list[tuple[str, str]]
    seconds: float

    @property
    def pages(self) -> int:
        return sum(len(r.keys) for r in self.reports)


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
    handler, staging, fresh_store = _open_build_store(site, config, build_id)
    engine = Engine(
        handler,
        render_timeout=config.render_timeout,
        max_concurrent_renders=config.render_concurrency,
        debug=config.debug_cache or None,
    )
    # Pages' data calls go through this engine too: the render context carries it.
    reports, jobs, errors = await _plan(site)
    complete = False
    try:
        await _prerender_all(engine, site, config, jobs, errors, fresh_store=fresh_store, progress=progress)
        await engine.drain()
        complete = not errors
    finally:
        await handler.close()
        if staging is not None and not complete:
            shutil.rmtree(staging, ignore_errors=True)  # failed or interrupted: never published
    result = BuildResult(build_id, reports, errors, time.perf_counter() - started)
    if not errors:
        _publish(site, config, result, staging)
    return result


def _open_build_store(site: Site, config: Config, build_id: str) -> tuple[Any, Path | None, bool]:
    """The store the build fills, its staging directory if any, and whether nobody serves it yet.

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
        return FileSystemCache(staging, fsync=False, staging=True), staging, True
    handler = open_site_cache(site.root, config, build_id=build_id, memory_tier_bytes=0)
    return handler, None, is_shared_cache(config.cache or "")


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
) -> None:
    """Render and store every planned page, ``render_concurrency`` at a time."""
    total, done = len(jobs), 0
    origin = CanonicalOrigin(config.site_url, config.allowed_hosts).default()
    semaphore = asyncio.Semaphore(config.render_concurrency)

    async def prerender(report: RouteReport, key: str) -> None:
        nonlocal done
        route = report.route
        _, params = site.match(key)  # type: ignore[misc]
        async with semaphore:
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
        done += 1
        if progress is not None:
            progress(done, total)

    await asyncio.gather(*(prerender(r, k) for r, k in jobs))


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
