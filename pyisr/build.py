"""``pyisr build``: prerender every known page of a site into its cache.

Every route is loaded and checked first; then static params are collected and all
known pages render concurrently (bounded by the render concurrency). A page that
raises fails the build with its path and the error. The build writes a new build id
and a manifest of routes, their kinds, revalidate times and prerendered paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyisr.cache.urls import build_handler
from pyisr.config import Config
from pyisr.engine import Engine, NotShareable, RevalidationError
from pyisr.origin import CanonicalOrigin
from pyisr.runtime import set_engine
from pyisr.site.route import Route
from pyisr.site.site import BUILD_ID, MANIFEST, Site


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
    site = Site.load(site_dir)
    dot = site.dot_dir
    dot.mkdir(parents=True, exist_ok=True)
    with _exclusive_build(dot):
        return await _build_locked(site, config, progress, build_id or secrets.token_hex(8), started)


class BuildInProgress(RuntimeError):
    """Another ``pyisr build`` of the same site is running."""


@contextlib.contextmanager
def _exclusive_build(dot: Path) -> Iterator[None]:
    """One build of a site at a time: a second one would remove the first's staging directory."""
    fd = os.open(dot / "build.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock = dot / "build.lock"
            raise BuildInProgress(f"another `pyisr build` of this site is running ({lock})") from None
        yield
    finally:
        os.close(fd)  # releases the lock


async def _build_locked(
    site: Site, config: Config, progress: ProgressFn | None, build_id: str, started: float
) -> BuildResult:
    dot = site.dot_dir
    staging: Path | None = None
    #: Nobody serves from the store being filled (a private directory, or Redis keys under
    #: this new build's id): no previous entry to read, no other process to tell.
    fresh_store = True
    if not config.cache:
        from pyisr.cache.filesystem import FileSystemCache

        # The default cache lives inside .pyisr/. The new pages go to a private directory
        # that replaces the old cache only once the build succeeded: a server still running
        # on the old build keeps its pages meanwhile, and a failed build loses nothing. As
        # nobody reads that directory yet, pages are written straight into place, unfsynced
        # (that was most of the build's time); one sync before it is published.
        _remove_stale_staging(dot)
        staging = dot / f"{_STAGING_PREFIX}{build_id}"
        handler: Any = FileSystemCache(staging, fsync=False, staging=True)
    else:
        cache: Any = config.cache
        fresh_store = isinstance(cache, str) and cache.startswith(("redis", "rediss"))
        if fresh_store:
            sep = "&" if "?" in cache else "?"
            cache = f"{cache}{sep}build_id={build_id}"
        handler = build_handler(cache, base_dir=site.root, memory_tier_bytes=0)
    engine = Engine(
        handler,
        render_timeout=config.render_timeout,
        max_concurrent_renders=config.render_concurrency,
        debug=config.debug_cache or None,
    )
    set_engine(engine)
    engine.path_resolver = None
    reports: list[RouteReport] = []
    errors: list[tuple[str, str]] = []
    jobs: list[tuple[RouteReport, str]] = []
    for route in site.routes:
        report = RouteReport(route)
        reports.append(report)
        try:
            keys = await route.static_keys()
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

    complete = False
    try:
        await asyncio.gather(*(prerender(r, k) for r, k in jobs))
        await engine.drain()
        complete = not errors
    finally:
        await handler.close()
        set_engine(None)
        if staging is not None and not complete:
            shutil.rmtree(staging, ignore_errors=True)  # failed or interrupted: never published
    if staging is not None and not errors:
        os.sync()
        _publish(staging, dot / "cache")
    result = BuildResult(build_id, reports, errors, time.perf_counter() - started)
    if not errors:
        _write_manifest(site, result)
    return result


_STAGING_PREFIX = "cache.building-"
_RETIRED_PREFIX = "cache.old-"


def _remove_stale_staging(dot: Path) -> None:
    """Directories a killed build or an interrupted publish left behind."""
    for path in dot.glob("cache.*-*"):
        if path.name.startswith((_STAGING_PREFIX, _RETIRED_PREFIX)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    """Swap the freshly built cache in for the old one (two renames, then a cleanup).

    Between the renames ``target`` is briefly absent; a server reading it then finds no
    entry and renders the page, as after a cache purge. A server may even recreate a
    subdirectory of ``target`` in that instant, so the swap is retried.
    """
    retired = target.with_name(f"{_RETIRED_PREFIX}{staging.name.removeprefix(_STAGING_PREFIX)}")
    for attempt in range(5):
        if target.exists():
            os.rename(target, retired if attempt == 0 else retired.with_name(f"{retired.name}-{attempt}"))
        try:
            os.rename(staging, target)
            break
        except OSError:
            if attempt == 4:
                raise
    _remove_stale_staging(target.parent)


def _write_manifest(site: Site, result: BuildResult) -> None:
    manifest = {
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
    dot = site.dot_dir
    _atomic_write(dot / MANIFEST, json.dumps(manifest, indent=2).encode())
    _atomic_write(dot / BUILD_ID, result.build_id.encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
