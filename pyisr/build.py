"""``pyisr build``: prerender every known page of a site into its cache.

Every route is loaded and checked first; then static params are collected and all
known pages render concurrently (bounded by the render concurrency). A page that
raises fails the build with its path and the error. The build writes a new build id
and a manifest of routes, their kinds, revalidate times and prerendered paths.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyisr.cache.urls import build_handler
from pyisr.config import Config
from pyisr.engine import Engine, RevalidationError
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
    build_id = build_id or secrets.token_hex(8)
    if not config.cache:
        # A new build replaces the old pages; the default cache lives inside .pyisr/.
        shutil.rmtree(dot / "cache", ignore_errors=True)
        cache: Any = str(dot / "cache")
    else:
        cache = config.cache
    if isinstance(cache, str) and cache.startswith(("redis", "rediss")):
        sep = "&" if "?" in cache else "?"
        cache = f"{cache}{sep}build_id={build_id}"
    if isinstance(cache, str) and not config.cache:
        from pyisr.cache.filesystem import FileSystemCache

        # A fresh build directory: a crash only means building again, so pages are not
        # fsynced one by one (that was most of the build's time); one sync at the end.
        handler: Any = FileSystemCache(cache, fsync=False)
        durable_at_end = True
    else:
        handler = build_handler(cache, base_dir=site.root, memory_tier_bytes=0)
        durable_at_end = False
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
    semaphore = asyncio.Semaphore(config.render_concurrency)

    async def prerender(report: RouteReport, key: str) -> None:
        nonlocal done
        route = report.route
        _, params = site.match(key)  # type: ignore[misc]
        async with semaphore:
            try:
                entry = await engine.revalidate_now(
                    key, route.renderer(key, params), route.policy(key, bot=True)
                )
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
    await engine.drain()
    await handler.close()
    if durable_at_end:
        os.sync()
    set_engine(None)
    result = BuildResult(build_id, reports, errors, time.perf_counter() - started)
    if not errors:
        _write_manifest(site, result)
    return result


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
