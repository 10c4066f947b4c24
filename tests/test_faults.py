"""Faults cost no request: a store that refuses writes, renders that hang, regenerations that fail.

Real components on the fake clock of conftest.py. The store failures are real ones: a
1 MB tmpfs filled to the last byte (ENOSPC), or remounted read-only (EROFS), mounted
here as root and unmounted afterwards (skipped, saying why, where mounting is not
permitted). Hung renders are sync renders blocked on a ``threading.Event`` that each
test sets before it ends, so no thread outlives it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FakeClock
from test_fetch import Lines
from test_filesystem_cache import _deny_under as deny_under
from test_site import write

from pyisr import CacheEntry, MemoryCache, MemoryTier, Rendered, RenderPolicy
from pyisr.cache.filesystem import FileSystemCache
from pyisr.cache.tags import implicit_tags
from pyisr.config import Config
from pyisr.engine import CacheStatus, Engine, RenderSlotsExhausted, RenderTimeout
from pyisr.incidents import failure_reason
from pyisr.runtime import set_engine
from pyisr.server.app import App
from pyisr.site.route import call_maybe_async
from pyisr.site_store import open_site_cache

REVALIDATING = "pyisr; hit; fwd=stale; detail=revalidating"
FAILED_STALE = "pyisr; hit; fwd=stale; detail=regeneration-failed"


def policy(key: str, revalidate: int | None = 60) -> RenderPolicy:
    return RenderPolicy(revalidate=revalidate, tags=implicit_tags(key, key))


def page(body: str = "page") -> Callable[[], Rendered]:
    def render() -> Rendered:
        return Rendered(body)

    return render


class Errors(Lines):
    """The ``pyisr.cache`` log lines at ERROR and above, as an operator's log has them."""

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.ERROR)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


@pytest.fixture
def errors() -> Iterator[Errors]:
    handler = Errors()
    cache_log = logging.getLogger("pyisr.cache")
    cache_log.addHandler(handler)
    try:
        yield handler
    finally:
        cache_log.removeHandler(handler)


# -- a real file system that refuses writes -------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs of its own (the disk that fills up, or turns read-only)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.decode().strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        pytest.skip(f"mounting a tmpfs is not permitted here ({detail}): the disk-full case needs one")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(directory: Path) -> None:
    """Write zeros until the file system says it is full."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def read_only(mount_point: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True, capture_output=True)


async def test_a_full_disk_answers_every_miss_and_logs_once_a_minute(
    tmpfs: Path, clock: FakeClock, errors: Errors
) -> None:
    engine = Engine(FileSystemCache(tmpfs / "cache"), clock=clock)
    fill(tmpfs)
    for _ in range(3):
        served = await engine.get("/full", page("<p>full</p>"), policy("/full"))
        assert served.status is CacheStatus.MISS and served.entry is not None
        assert served.entry.status == 200 and served.entry.body == b"<p>full</p>"
        assert not served.stored
    assert await engine.handler.get("/full") is None
    assert errors.count("STORE FAILED OSError[ENOSPC]") == 1, errors.lines
    report = engine.health()["store_failures"]["OSError[ENOSPC]"]
    assert report["count"] == 3 and report["key"] == "/full" and "No space left" in report["message"]
    assert any("OSError[ENOSPC]" in reason for reason in engine.degraded_reasons())
    clock.advance(61)  # a minute later: the next failure is logged again, with the count between
    await engine.get("/full", page(), policy("/full"))
    assert errors.count("STORE FAILED OSError[ENOSPC]") == 2
    assert "2 more since the last line" in errors.lines[-1]
    clock.advance(61)  # a minute with no failure: healthy again (the record stays)
    assert engine.degraded_reasons() == []
    assert engine.health()["store_failures"]["OSError[ENOSPC]"]["count"] == 4
    await engine.close()


async def test_with_a_memory_tier_a_page_the_full_disk_refused_renders_once(
    tmpfs: Path, clock: FakeClock, errors: Errors
) -> None:
    """The tier keeps the render the store refused: later requests are HITs from memory, not
    a render each, while the failure is still counted and logged."""
    renders = 0

    def counted() -> Rendered:
        nonlocal renders
        renders += 1
        return Rendered("<p>kept</p>")

    engine = Engine(MemoryTier(FileSystemCache(tmpfs / "cache"), 1 << 20), clock=clock)
    fill(tmpfs)
    first = await engine.get("/kept", counted, policy("/kept"))
    assert first.status is CacheStatus.MISS and not first.stored
    for _ in range(3):
        again = await engine.get("/kept", counted, policy("/kept"))
        assert (
            again.status is CacheStatus.HIT and again.entry is not None and again.entry.body == b"<p>kept</p>"
        )
    assert renders == 1
    assert errors.count("STORE FAILED OSError[ENOSPC]") == 1
    assert any("ENOSPC" in reason for reason in engine.degraded_reasons())
    await engine.close()


async def test_a_read_only_store_keeps_serving_old_and_new_pages(
    tmpfs: Path, clock: FakeClock, errors: Errors
) -> None:
    """EROFS on the lock and on every write: misses render without the lock, stale pages stay
    served through failed regenerations, and a failure record that cannot be written raises
    nothing either."""
    cache = FileSystemCache(tmpfs / "cache")
    engine = Engine(cache, clock=clock)
    assert (await engine.get("/old", page("old"), policy("/old", 5))).stored
    read_only(tmpfs)
    clock.advance(1)
    for _ in range(3):
        served = await engine.get("/new", page("new"), policy("/new"))
        assert served.status is CacheStatus.MISS and served.entry is not None and served.entry.body == b"new"
    clock.advance(5)  # /old is past its window: regenerated in the background, not storable
    stale = await engine.get("/old", page("old 2"), policy("/old", 5))
    assert stale.status is CacheStatus.STALE and stale.entry is not None and stale.entry.body == b"old"
    await engine.drain()

    def broken() -> Rendered:
        raise RuntimeError("database down")

    clock.advance(1)
    assert (await engine.get("/old", broken, policy("/old", 5))).entry.body == b"old"  # type: ignore[union-attr]
    await engine.drain()  # its failure record cannot be written: logged, not raised
    assert (await engine.get("/old", page(), policy("/old", 5))).status is CacheStatus.STALE
    await engine.drain()
    assert errors.count("/old FAILED regenerate") == 1
    assert errors.count("STORE FAILED OSError[EROFS]") == 1, errors.lines
    assert engine.health()["store_failures"]["OSError[EROFS]"]["count"] >= 8  # locks and writes
    await engine.close()


async def test_a_miss_the_store_refused_is_answered_but_never_kept_hot(
    tmpfs: Path, tmp_path: Path, clock: FakeClock
) -> None:
    """Over HTTP: 200 each time, ``Cache-Status`` without ``stored``, and never a fast-path HIT."""
    site = tmp_path / "site"
    (site / "app" / "p").mkdir(parents=True)
    (site / "app" / "p" / "page.py").write_text(
        "revalidate = 60\n\ndef page(params):\n    return '<p>p</p>'\n"
    )
    engine = Engine(FileSystemCache(tmpfs / "cache"), clock=clock)
    app = App(site, config=Config(), engine=engine)
    fill(tmpfs)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for _ in range(3):
            response = await client.get("/p")
            assert response.status_code == 200 and response.text == "<p>p</p>"
            assert response.headers["x-pyisr-cache"] == "MISS"
            assert response.headers["cache-status"] == "pyisr; fwd=uri-miss"
        assert not app.fast.by_raw_path
    await engine.close()
    set_engine(None)


async def test_a_store_without_write_permission_answers_every_miss(
    tmp_path: Path, clock: FakeClock, errors: Errors, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EACCES, where no tmpfs can be mounted too: chmod, and as root (whom chmod cannot stop)
    the refusal injected at the system calls, as tests/test_filesystem_cache.py does."""
    cache = FileSystemCache(tmp_path / "cache")
    engine = Engine(cache, clock=clock)
    (cache.root / "entries").chmod(0o500)
    if os.geteuid() == 0:
        deny_under(monkeypatch, cache.root / "entries")
    try:
        for _ in range(3):
            served = await engine.get("/denied", page("denied"), policy("/denied"))
            assert served.status is CacheStatus.MISS and served.entry is not None and not served.stored
    finally:
        (cache.root / "entries").chmod(0o700)
    assert errors.count("STORE FAILED PermissionError[EACCES]") == 1
    assert engine.health()["store_failures"]["PermissionError[EACCES]"]["count"] == 3
    await engine.close()


def test_failure_reasons_group_the_same_failure() -> None:
    assert failure_reason(OSError(errno.ENOSPC, "No space left on device")) == "OSError[ENOSPC]"
    assert failure_reason(PermissionError(errno.EACCES, "Permission denied")) == "PermissionError[EACCES]"
    a = failure_reason(ConnectionError("Error 111 connecting to 'redis-1':6379"))
    b = failure_reason(ConnectionError("Error 111 connecting to 'redis-2':6380"))
    assert a == b == "ConnectionError: Error # connecting to …:#"


# -- renders that hang ------------------------------------------------------------------------


class Hung:
    """Sync page functions that block until released (at the end of the test, whatever happens)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.threads: list[str] = []

    def page(self) -> Rendered:
        self.threads.append(threading.current_thread().name)
        self.release.wait(10)
        return Rendered("late")

    async def site_style(self) -> Rendered:
        """An async render calling a sync page function, as site routes do."""
        result: Rendered = await call_maybe_async(self.page)
        return result


@pytest.fixture
def hung() -> Iterator[Hung]:
    h = Hung()
    try:
        yield h
    finally:
        h.release.set()


async def wait_until_free(engine: Engine) -> None:
    """Released threads end at once; their slots are freed as they do (at most 5 s here)."""
    for _ in range(500):
        if not engine.slots.busy():
            return
        await asyncio.sleep(0.01)
    assert engine.slots.busy() == 0


async def test_stuck_renders_refuse_new_misses_at_once_and_cached_pages_stay_served(
    clock: FakeClock, hung: Hung, errors: Errors
) -> None:
    engine = Engine(MemoryCache(), clock=clock, max_concurrent_renders=2, render_timeout=0.2)
    await engine.get("/cached", page("cached"), policy("/cached"))
    await engine.get("/stale", page("stale"), policy("/stale", 1))
    renders = (engine.get("/hung/1", hung.page, policy("/hung/1")), engine.get("/hung/2", hung.site_style))
    results = await asyncio.gather(*renders, return_exceptions=True)
    assert all(isinstance(r, RenderTimeout) for r in results), results
    assert hung.threads and all(name.startswith("pyisr-render") for name in hung.threads)

    t0 = time.monotonic()
    with pytest.raises(RenderSlotsExhausted) as refused:
        await engine.get("/new", page("new"), policy("/new"))
    assert time.monotonic() - t0 < 0.1
    assert refused.value.status == 503 and refused.value.retry_after == 1
    assert (await engine.get("/cached", page(), policy("/cached"))).status is CacheStatus.HIT
    clock.advance(2)  # /stale is past its window: still served; its regeneration cannot run
    assert (await engine.get("/stale", page(), policy("/stale", 1))).status is CacheStatus.STALE
    await engine.drain()
    again = await engine.get("/stale", page(), policy("/stale", 1))
    assert again.status is CacheStatus.STALE and again.regeneration_failed

    health = engine.health()
    assert sorted(s["key"] for s in health["stuck_renders"]) == ["/hung/1", "/hung/2"]
    assert all(s["running_for"] >= 0.2 for s in health["stuck_renders"])
    assert health["render_slots"] == {"size": 2, "busy": 2, "stuck": 2, "refused": 2}
    assert any("render slots" in reason for reason in engine.degraded_reasons())
    assert errors.count("RENDER FAILED RenderSlotsExhausted") == 1  # two refusals, one line

    hung.release.set()
    await wait_until_free(engine)
    assert engine.health()["stuck_renders"] == [] and engine.degraded_reasons() == []
    assert (await engine.get("/new", page("new"), policy("/new"))).status is CacheStatus.MISS
    await engine.close()


async def test_a_waiting_render_is_refused_when_the_last_running_one_gets_stuck(
    clock: FakeClock, hung: Hung
) -> None:
    engine = Engine(MemoryCache(), clock=clock, max_concurrent_renders=1, render_timeout=0.2)
    first = asyncio.create_task(engine.get("/hung", hung.page, policy("/hung")))
    await asyncio.sleep(0.05)
    with pytest.raises(RenderSlotsExhausted):  # it waited for the slot, until it was stuck
        await engine.get("/waits", page(), policy("/waits"))
    with pytest.raises(RenderTimeout):
        await first
    await engine.close()


async def test_storage_and_renders_never_wait_for_the_default_executor(
    tmp_path: Path, clock: FakeClock, hung: Hung
) -> None:
    """The loop's default executor full of hung work: pages still render and the cache still writes."""
    loop = asyncio.get_running_loop()
    blocked = [loop.run_in_executor(None, hung.release.wait, 10) for _ in range(64)]
    engine = Engine(FileSystemCache(tmp_path / "cache"), clock=clock, render_timeout=2)
    served = await asyncio.wait_for(engine.get("/sync", page("sync"), policy("/sync")), 1)
    assert served.status is CacheStatus.MISS and served.stored
    assert (await asyncio.wait_for(call_maybe_async(lambda: "outside a render"), 1)) == "outside a render"
    big = CacheEntry(key="/big", body=b"x" * 400_000, created_at=clock.now, revalidate=60)
    assert await asyncio.wait_for(engine.handler.set(big), 1)
    assert (await asyncio.wait_for(engine.handler.get("/big"), 1)) == big
    hung.release.set()
    await asyncio.gather(*blocked)
    await engine.close()


HUNG_SITE = {
    "app/hang/[id]/page.py": """
        import threading

        revalidate = 60
        RELEASE = threading.Event()

        def page(params):
            RELEASE.wait(10)
            return "late"
    """,
    "app/quick/[id]/page.py": """
        revalidate = 60

        def page(params):
            return f"<p>quick {params['id']}</p>"
    """,
}


@pytest.fixture
async def hung_app(tmp_path: Path, clock: FakeClock) -> AsyncIterator[tuple[App, httpx.AsyncClient]]:
    site = write(tmp_path / "site", HUNG_SITE)
    engine = Engine(MemoryCache(), clock=clock, max_concurrent_renders=2, render_timeout=0.2)
    app = App(site, config=Config(), engine=engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        await app.startup()
        found = app.site.match("/hang/1")
        assert found is not None
        release: threading.Event = found[0].module.RELEASE
        try:
            yield app, client
        finally:
            release.set()
    await engine.close()
    set_engine(None)


async def test_stuck_renders_answer_503_with_retry_after_over_http(
    hung_app: tuple[App, httpx.AsyncClient],
) -> None:
    app, client = hung_app
    assert (await client.get("/quick/1")).headers["x-pyisr-cache"] == "MISS"
    hanging = await asyncio.gather(client.get("/hang/1"), client.get("/hang/2"))
    assert [r.status_code for r in hanging] == [500, 500]  # each past its 0.2 s timeout

    t0 = time.monotonic()
    refused = await client.get("/quick/2")
    assert time.monotonic() - t0 < 0.5
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.headers["cache-control"].startswith("private, no-cache, no-store")
    for _ in range(2):  # the full path, then the fast path
        cached = await client.get("/quick/1")
        assert cached.status_code == 200 and cached.headers["x-pyisr-cache"] == "HIT"

    found = app.site.match("/hang/1")
    assert found is not None
    found[0].module.RELEASE.set()
    await wait_until_free(app.engine)
    served = await client.get("/quick/2")
    assert served.status_code == 200 and served.text == "<p>quick 2</p>"


# -- the truth in headers -----------------------------------------------------------------------

FAILING_SITE = {
    "app/p/page.py": """
        revalidate = 60
        FAIL = []
        RENDERS = []

        def page(params):
            RENDERS.append(1)
            if FAIL:
                raise RuntimeError("database down")
            return f"<p>render {len(RENDERS)}</p>"
    """,
}


async def test_a_page_whose_regeneration_fails_is_stale_never_hit(tmp_path: Path, clock: FakeClock) -> None:
    """Past the window, inside the back-off: STALE, detail=regeneration-failed, its real Age;
    the same from the fast path (every second request of a pair); after a success, HIT."""
    site = write(tmp_path / "site", FAILING_SITE)
    config = Config()
    app = App(site, config=config, engine=Engine(open_site_cache(site, config), clock=clock))
    module: Any = app.site.match("/p")[0].module  # type: ignore[index]

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:

        async def pair() -> httpx.Response:
            first, second = await client.get("/p"), await client.get("/p")
            assert {k: v for k, v in first.headers.items()} == {k: v for k, v in second.headers.items()}
            assert first.text == second.text
            return second

        rendered_at = clock.now
        assert (await client.get("/p")).headers["x-pyisr-cache"] == "MISS"
        assert (await pair()).headers["x-pyisr-cache"] == "HIT"
        hot = app.fast.by_raw_path[b"/p"]  # the page is hot: every request asks the fast path first
        module.FAIL.append(True)
        clock.advance(61)
        stale = await client.get("/p")
        assert stale.headers["x-pyisr-cache"] == "STALE" and stale.headers["cache-status"] == REVALIDATING
        await app.engine.drain()  # the regeneration fails
        renders = len(module.RENDERS)
        for age in (61, 66, 90):  # the back-off is clamp(60, 3, 30) = 30 s from the failure
            clock.now = rendered_at + age
            answer = await pair()
            assert answer.headers["x-pyisr-cache"] == "STALE", age
            assert answer.headers["cache-status"] == FAILED_STALE and answer.headers["age"] == str(age)
            assert answer.text == "<p>render 1</p>"
            assert app.fast.answer(hot, "GET", None) is None  # it leaves these to the engine
        assert len(module.RENDERS) == renders  # no attempt inside the back-off
        module.FAIL.clear()
        clock.now = rendered_at + 92  # 31 s after the failure: the next request retries
        retry = await client.get("/p")
        assert retry.headers["x-pyisr-cache"] == "STALE" and retry.headers["cache-status"] == REVALIDATING
        await app.engine.drain()
        fresh = await pair()
        assert fresh.headers["x-pyisr-cache"] == "HIT" and fresh.text == "<p>render 3</p>"
    await app.engine.close()
    set_engine(None)
