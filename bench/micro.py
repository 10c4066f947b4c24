"""``python -m bench.micro``: microseconds of pyisr's own work per cached-page request.

In-process, no server and no sockets: the App is called directly with a prepared ASGI
scope (and an RSGI stand-in) for a prerendered page, so only pyisr's code is timed.
Compares the fast path with the full path (route match, engine, tier, headers) that
serves the same HIT when the fast path is off, each for a request without
``Accept-Encoding`` (the identity body) and for a browser's (``gzip, deflate, br, zstd``:
the stored brotli body, pyisr.compression). Prints a table; writes no JSON (the load
scenarios are the numbers the targets are judged on).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import sites
from pyisr.server.app import App

PATH = "/hit/1"
#: What a browser sends: the page's stored brotli encoding answers it.
BROWSER_ACCEPT = "gzip, deflate, br, zstd"


class _Headers:
    def __init__(self, items: dict[str, str]) -> None:
        self._items = items

    def get(self, key: str, default: Any = None) -> Any:
        return self._items.get(key, default)

    def items(self) -> list[tuple[str, str]]:
        return list(self._items.items())


class _RSGIScope:
    proto = "http"
    method = "GET"
    path = PATH
    query_string = ""
    http_version = "1.1"
    scheme = "http"
    client = "127.0.0.1:50000"
    server = "127.0.0.1:3000"
    authority = None

    def __init__(self, accept: str | None = None) -> None:
        items = {"host": "127.0.0.1:3000"}
        if accept is not None:
            items["accept-encoding"] = accept
        self.headers = _Headers(items)


class _RSGIProto:
    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        pass


def _scope(accept: str | None = None) -> dict[str, Any]:
    headers = [(b"host", b"127.0.0.1:3000")]
    if accept is not None:
        headers.append((b"accept-encoding", accept.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 3000),
    }


async def _time_asgi(app: App, n: int, accept: str | None = None) -> float:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = _scope(accept)
    await app(scope, receive, send)  # warm: the first answer makes the page hot
    started = time.perf_counter()
    for _ in range(n):
        await app(scope, receive, send)
        sent.clear()
    return (time.perf_counter() - started) / n * 1e6


async def _time_rsgi(app: App, n: int, accept: str | None = None) -> float:
    scope, proto = _RSGIScope(accept), _RSGIProto()
    await app.__rsgi__(scope, proto)
    started = time.perf_counter()
    for _ in range(n):
        await app.__rsgi__(scope, proto)
    return (time.perf_counter() - started) / n * 1e6


async def _measure(site: Path, n: int) -> list[tuple[str, float]]:
    rows = []
    for label, fast in (("full path (fast path off)", False), ("fast path", True)):
        app = App(site)
        await app.startup()
        app.fast.enabled = fast
        rows.append((f"ASGI, {label}", await _time_asgi(app, n)))
        rows.append((f"ASGI, {label}, brotli", await _time_asgi(app, n, BROWSER_ACCEPT)))
        if fast:
            rows.append((f"RSGI, {label}", await _time_rsgi(app, n)))
            rows.append((f"RSGI, {label}, brotli", await _time_rsgi(app, n, BROWSER_ACCEPT)))
        await app.shutdown()
    return rows


async def _page_sizes(site: Path) -> str:
    """The HIT page's bytes as sent without ``Accept-Encoding`` and to a browser."""
    app = App(site)
    await app.startup()
    try:
        entry = await app.engine.handler.get(PATH)
        assert entry is not None
        sizes = ", ".join(f"{coding} {len(data)} B" for coding, data in entry.encodings.items())
        return f"identity {len(entry.body)} B" + (f", {sizes}" if sizes else " (no stored encodings)")
    finally:
        await app.shutdown()


def _posts(count: int = 2000) -> list[dict[str, Any]]:
    """About 1 MB of JSON: ``count`` blog posts."""
    text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 8
    return [{"id": i, "title": f"Post {i}", "author": "Ada", "content": text} for i in range(count)]


async def _measure_cached_hit(root: Path, n: int) -> list[tuple[str, float]]:
    """``cached()`` hits on an unchanged ~1 MB value, in a warm process: an engine over the
    file-system cache with the default 50 MB memory tier, as a server has."""
    import pyisr
    from pyisr.cache.filesystem import FileSystemCache
    from pyisr.cache.tier import MemoryTier

    engine = pyisr.Engine(MemoryTier(FileSystemCache(root, fsync=False)))
    pyisr.set_engine(engine)
    try:
        get_posts = pyisr.cached(_posts, ["micro-posts"], revalidate=3600, tags=["posts"])
        value = await get_posts.aio()  # computed, stored, decoded once
        size = len(json.dumps(value))
        started = time.perf_counter()
        for _ in range(n):
            await get_posts.aio()
        rows = [(f"cached() hit, {size / 1e6:.1f} MB value, await fn.aio()", _us(started, n))]
        sync = await _sync_hits(get_posts, max(1, n // 10))
        rows.append((f"cached() hit, {size / 1e6:.1f} MB value, sync fn() from a thread", sync))
        return rows
    finally:
        pyisr.set_engine(None)
        await engine.close()


async def _sync_hits(fn: Any, n: int) -> float:
    def run() -> float:
        fn()
        started = time.perf_counter()
        for _ in range(n):
            fn()
        return _us(started, n)

    return await asyncio.to_thread(run)


def _us(started: float, n: int) -> float:
    return (time.perf_counter() - started) / n * 1e6


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    with tempfile.TemporaryDirectory(prefix="pyisr-micro-") as tmp:
        site = sites.hit_site(Path(tmp) / "site")
        build = [sys.executable, "-m", "pyisr.cli", "build", str(site)]
        subprocess.run(build, check=True, capture_output=True)
        rows = asyncio.run(_measure(site, n))
        sizes = asyncio.run(_page_sizes(site))
        data_rows = asyncio.run(_measure_cached_hit(Path(tmp) / "data-cache", max(1, n // 5)))
    print(f"pyisr's own time per HIT of a prerendered page, in-process, {n:,} requests each")
    print(f"(the page: {sizes}; brotli: Accept-Encoding: {BROWSER_ACCEPT})")
    print("| path | µs per request |\n|---|---|")
    for label, micros in rows:
        print(f"| {label} | {micros:.2f} |")
    print()
    print("A data read in a warm process: no file read, no digest, no decode (target: under 20 µs)")
    print("| call | µs per call |\n|---|---|")
    for label, micros in data_rows:
        print(f"| {label} | {micros:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
