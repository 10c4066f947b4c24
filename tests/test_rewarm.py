"""Hottest-first re-warm (pyisr.rewarm): after a wide invalidation the most requested
pages are rendered again in the background, in order of hits, at a bounded rate, one
render per key across processes, while cold pages stay lazy and visitors never wait."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FakeClock
from e2e_support import run_cli, running
from redis_support import redis_py, redis_url, unique_prefix  # noqa: F401

from pyisr import MemoryCache, Rendered
from pyisr.cache.activity import ActivityReport
from pyisr.cache.entry import CacheEntry, EntryKind
from pyisr.cache.filesystem import FileSystemCache
from pyisr.cache.tags import implicit_tags
from pyisr.cache.tier import MemoryTier
from pyisr.engine import CacheStatus, Engine, RenderPolicy, Served
from pyisr.rewarm import Rewarmer, is_wide_tag

ROUTE = "/p/[id]"


class Pages:
    """Pages ``/p/<i>`` tagged ``posts`` (even ones ``even`` too); renders are noted with
    the time they started, and may be held (``hold``) or made to fail (``fail``)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.version = 1
        self.renders: list[tuple[str, float]] = []
        self.fail: set[str] = set()
        self.hold: set[str] = set()
        self.gate = asyncio.Event()

    def rendered(self) -> list[str]:
        return [key for key, _ in self.renders]

    def policy(self, key: str) -> RenderPolicy:
        tags = (*implicit_tags(key, ROUTE), "posts")
        if int(key.rsplit("/", 1)[1]) % 2 == 0:
            tags += ("even",)
        return RenderPolicy(tags=tags, route=ROUTE)

    def render(self, key: str) -> Callable[[], Awaitable[Rendered]]:
        async def render() -> Rendered:
            self.renders.append((key, self.clock()))
            if key in self.hold:
                await self.gate.wait()
            if key in self.fail:
                raise RuntimeError(f"{key} is broken")
            return Rendered(f"{key} v{self.version}")

        return render

    async def resolve(self, key: str) -> tuple[str, Any, RenderPolicy] | None:
        if not key.startswith("/p/"):
            return None
        return key, self.render(key), self.policy(key)

    async def visit(self, engine: Engine, key: str) -> Served:
        served = await engine.get(key, self.render(key), self.policy(key))
        engine.events.served(key, ROUTE, served.status.value)
        return served


#: Hits per page: skewed, and most pages are never asked for (cold).
HITS = {"/p/4": 100, "/p/3": 90, "/p/7": 80, "/p/1": 60, "/p/10": 40, "/p/5": 20, "/p/8": 10}
HOTTEST = list(HITS)  # in hit order
KEYS = [f"/p/{i}" for i in range(16)]
COLD = [k for k in KEYS if k not in HITS]


class TickingClock(FakeClock):
    """A fake clock on which each reading takes a microsecond: no two events share an
    instant (a render started "at" its invalidation would be invalidated by it)."""

    def __call__(self) -> float:
        self.now += 1e-6
        return self.now


@pytest.fixture
def clock() -> TickingClock:
    return TickingClock()


class Steps:
    """A sleep the test lets go of one call at a time (the fake clock moves by it then)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waiting: list[tuple[float, asyncio.Future[None]]] = []

    async def __call__(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((seconds, future))
        try:
            await future
        finally:
            if (seconds, future) in self.waiting:
                self.waiting.remove((seconds, future))

    async def next(self) -> None:
        """Wait for a sleeping caller, then let it go after moving the clock."""
        await self.until_sleeping()
        seconds, future = self.waiting.pop(0)
        self.clock.advance(seconds)
        future.set_result(None)
        await settle()  # what it starts begins before time moves again

    async def run_out(self, rewarmer: Rewarmer) -> None:
        """Let every sleep go until no run is in progress."""
        while rewarmer._run_task is not None and not rewarmer._run_task.done():
            if any(not f.done() for _, f in self.waiting):
                await self.next()
            await asyncio.sleep(0.001)

    async def until_sleeping(self) -> None:
        """Wait for a sleeping caller; what started before it sleeps begins meanwhile."""
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            self.waiting = [(s, f) for s, f in self.waiting if not f.done()]  # cancelled sleepers
            if self.waiting:
                await settle()
                return
            await asyncio.sleep(0.001)
        raise AssertionError("nobody is sleeping")


async def settle() -> None:
    """Let what is ready run (renders begin, files are read) before the fake clock moves."""
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)


def fake_sleep(clock: FakeClock) -> Callable[[float], Awaitable[None]]:
    """Sleeps on the fake clock: what else is ready runs first (renders begin), then time moves."""

    async def sleep(seconds: float) -> None:
        for _ in range(20):
            await asyncio.sleep(0)
        clock.advance(seconds)

    return sleep


async def eventually(check: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.001)


async def site(engine: Engine, pages: Pages, *, hits: dict[str, int] = HITS) -> None:
    """Every page rendered once, and the store's record of hits."""
    engine.add_resolver(pages.resolve)
    for key in KEYS:
        assert (await pages.visit(engine, key)).status is CacheStatus.MISS
    engine.events.take()  # those visits are not the hits this test means
    await engine.handler.add_activity(ActivityReport(hits=dict(hits)), engine.clock())
    pages.renders.clear()


@pytest.fixture
async def setup(clock: FakeClock) -> AsyncIterator[tuple[Engine, Pages]]:
    engine = Engine(MemoryCache(), clock=clock, render_timeout=2.0, max_concurrent_renders=8)
    pages = Pages(clock)
    await site(engine, pages)
    yield engine, pages
    pages.gate.set()
    await engine.drain()


async def invalidated(engine: Engine, pages: Pages, key: str) -> bool:
    entry = await engine.handler.get(key)
    assert entry is not None
    times = await engine._tag_times_for(entry, pages.policy(key))
    return entry.is_invalidated(times) or entry.is_marked_stale(times)


# -- in process, on a fake clock -----------------------------------------------------------


async def test_the_hottest_pages_render_first_in_hit_order_at_the_rate(
    setup: tuple[Engine, Pages], clock: FakeClock
) -> None:
    engine, pages = setup
    rewarmer = Rewarmer(engine, 4, poll_every=None, clock=clock, sleep=fake_sleep(clock))
    rewarmer.start()
    at = clock()
    await engine.revalidate_tag("posts")
    await rewarmer.idle()
    await engine.drain()

    assert pages.rendered() == HOTTEST
    starts = [t for _, t in pages.renders]
    assert starts[0] == pytest.approx(at, abs=1e-4), "the hottest starts at once"
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(0.25 <= gap < 0.2501 for gap in gaps), f"4 per second, no faster: {gaps}"
    report = rewarmer.last
    assert report is not None and report.done and not report.superseded
    assert (report.rendered, report.skipped, report.failed) == (len(HOTTEST), 0, 0)

    for key in HOTTEST:  # fresh before anyone asked
        served = await pages.visit(engine, key)
        assert served.status is CacheStatus.HIT and served.entry is not None
        assert served.entry.created_at >= at
    for key in COLD:  # lazy: untouched, rendered at their next visit
        assert await invalidated(engine, pages, key), key
    assert pages.rendered() == HOTTEST
    assert (await pages.visit(engine, COLD[0])).status is CacheStatus.MISS
    # Counted like any regeneration; recorded as no invalidation.
    results = [r.result for r in engine.events.take().regenerations]
    assert results.count("ok") == len(HOTTEST) + 1
    kinds = [inv.kind for inv in (await engine.handler.activity(clock())).invalidations]
    assert kinds == ["tag"]


async def test_unreported_hits_count_too(setup: tuple[Engine, Pages], clock: FakeClock) -> None:
    engine, pages = setup
    for _ in range(500):  # /p/12 was cold in the store's record; now the hottest of all
        assert (await pages.visit(engine, "/p/12")).status is CacheStatus.HIT
    rewarmer = Rewarmer(engine, 100, poll_every=None, clock=clock, sleep=fake_sleep(clock))
    rewarmer.start()
    await engine.revalidate_tag("posts")
    await rewarmer.idle()
    assert pages.rendered() == ["/p/12", *HOTTEST]


async def test_recent_hits_outrank_old_ones(setup: tuple[Engine, Pages], clock: FakeClock) -> None:
    """Yesterday's front page (/p/13, 1,000 hits then) comes after today's (/p/14, 10 hits)."""
    engine, pages = setup
    for _ in range(1000):
        await pages.visit(engine, "/p/13")
    engine.events.take()  # reported, as every few seconds
    clock.advance(24 * 3600)
    for _ in range(10):
        await pages.visit(engine, "/p/14")
    rewarmer = Rewarmer(engine, 100, poll_every=None, clock=clock, sleep=fake_sleep(clock))
    rewarmer.start()
    await engine.revalidate_tag("posts")
    await rewarmer.idle()
    assert pages.rendered()[:2] == ["/p/14", "/p/13"], "recent first, then what was hot once"
    assert pages.rendered()[2:] == HOTTEST, "then the store's record, for keys not served here lately"


def test_recent_hits_halve_every_half_life_and_stay_bounded() -> None:
    from pyisr.recent_hits import RecentHits

    recent = RecentHits(half_life=600, limit=3)
    assert recent.counts(0) == {}
    recent.add({"/a": 8}, now=1000)
    recent.add({"/b": 2}, now=1600)
    counts = recent.counts(1600)
    assert counts["/a"] == pytest.approx(4) and counts["/b"] == pytest.approx(2)
    assert recent.counts(2200)["/a"] == pytest.approx(2)
    # Past 64 half-lives the weights are scaled back: the counts are unchanged by it, and
    # what no longer counts at all (/a, 8 hits 65 half-lives ago) is let go.
    recent.add({"/d": 4}, now=1000 + 600 * 63)
    later = 1000 + 600 * 65
    recent.add({"/c": 1}, now=later)
    assert recent.counts(later)["/c"] == pytest.approx(1)
    assert recent.counts(later)["/d"] == pytest.approx(1)
    assert "/a" not in recent.counts(later)
    for i in range(10):  # past twice the limit, the most requested are kept
        recent.add({f"/k{i}": 100 + i}, now=later)
    assert len(recent) <= 6 and "/k9" in recent.counts(later)
    with pytest.raises(ValueError, match="half_life"):
        RecentHits(half_life=0)


async def test_rate_zero_does_nothing(setup: tuple[Engine, Pages], clock: FakeClock) -> None:
    engine, pages = setup
    rewarmer = Rewarmer(engine, 0, poll_every=0.01, clock=clock, sleep=fake_sleep(clock))
    assert not rewarmer.enabled
    rewarmer.start()
    await engine.revalidate_tag("posts")
    await asyncio.sleep(0.05)
    await rewarmer.idle()
    assert rewarmer.last is None and pages.rendered() == []
    await rewarmer.stop()


async def test_one_render_slot_is_never_taken(clock: FakeClock) -> None:
    engine = Engine(MemoryCache(), clock=clock, max_concurrent_renders=1)
    assert not Rewarmer(engine, 20).enabled, "its only slot is the visitors'"


async def test_narrow_invalidations_start_nothing_wide_ones_do(
    setup: tuple[Engine, Pages], clock: FakeClock
) -> None:
    engine, pages = setup
    rewarmer = Rewarmer(engine, 1000, poll_every=None, clock=clock, sleep=fake_sleep(clock))
    rewarmer.start()
    await engine.revalidate_path("/p/4")  # one page: rendered at its next visit
    await engine.revalidate_now("/p/3", pages.render("/p/3"), pages.policy("/p/3"))  # rendered already
    await rewarmer.idle()
    assert rewarmer.last is None and pages.rendered() == ["/p/3"]

    pages.renders.clear()
    await engine.revalidate_path(ROUTE, "page")  # every page of the route
    await rewarmer.idle()
    assert pages.rendered() == HOTTEST
    pages.renders.clear()
    await engine.revalidate_path("/p", "layout")  # a subtree
    await rewarmer.idle()
    assert pages.rendered() == HOTTEST


async def test_a_tag_marked_stale_rewarms_too(setup: tuple[Engine, Pages], clock: FakeClock) -> None:
    engine, pages = setup
    rewarmer = Rewarmer(engine, 1000, poll_every=None, clock=clock, sleep=fake_sleep(clock))
    rewarmer.start()
    await engine.revalidate_tag("even", stale=True)
    await rewarmer.idle()
    await engine.drain()
    assert pages.rendered() == ["/p/4", "/p/10", "/p/8"]
    assert (await pages.visit(engine, "/p/4")).status is CacheStatus.HIT
    assert (await pages.visit(engine, "/p/2")).status is CacheStatus.STALE  # cold: as before


async def test_at_most_limit_renders_per_run(setup: tuple[Engine, Pages], clock: FakeClock) -> None:
    engine, pages = setup
    rewarmer = Rewarmer(engine, 1000, limit=3, poll_every=None, clock=clock, sleep=fake_sleep(clock))
    rewarmer.start()
    await engine.revalidate_tag("posts")
    await rewarmer.idle()
    assert pages.rendered() == HOTTEST[:3]
    assert await invalidated(engine, pages, HOTTEST[3])


async def test_data_entries_and_unknown_keys_are_not_rendered(
    setup: tuple[Engine, Pages], clock: FakeClock
) -> None:
    engine, pages = setup
    data = CacheEntry("fetch:posts", b"[]", clock() - 1, None, kind=EntryKind.DATA, tags=("posts",))
    await engine.handler.set(data)
    await engine.handler.add_activity(ActivityReport(hits={"fetch:posts": 10_000}), clock())
    rewarmer = Rewarmer(engine, 1000, poll_every=None, clock=clock, sleep=fake_sleep(clock))
    rewarmer.start()
    await engine.revalidate_tag("posts")
    await rewarmer.idle()
    assert pages.rendered() == HOTTEST  # the pages that read the data are rendered instead
    assert rewarmer.last is not None and rewarmer.last.unknown == 0


async def test_a_newer_invalidation_supersedes_the_run(setup: tuple[Engine, Pages], clock: FakeClock) -> None:
    engine, pages = setup
    steps = Steps(clock)
    rewarmer = Rewarmer(engine, 1, poll_every=None, clock=clock, sleep=steps)
    rewarmer.start()
    await engine.revalidate_tag("posts")
    await steps.until_sleeping()  # /p/4 started; /p/3 waits for its turn
    await steps.next()
    await steps.until_sleeping()  # /p/3 started; /p/7 waits
    await engine.drain()
    first = rewarmer.last
    assert first is not None and first.started == ["/p/4", "/p/3"]

    clock.advance(0.01)
    await engine.revalidate_tag("even")  # /p/4, rendered a moment ago, is invalidated again
    assert first.superseded
    await steps.run_out(rewarmer)
    await engine.drain()
    second = rewarmer.last
    assert second is not None and second is not first and second.done
    assert set(second.tags) == {"posts", "even"}
    # From the hottest again; /p/3 is fresh (only "posts" touched it): skipped.
    assert second.started == ["/p/4", "/p/7", "/p/1", "/p/10", "/p/5", "/p/8"]
    assert pages.rendered() == ["/p/4", "/p/3", *second.started]
    starts = [t for _, t in pages.renders]
    gaps = [round(b - a, 4) for a, b in zip(starts, starts[1:], strict=False)]
    assert all(gap >= 1 for gap in gaps), f"one a second, across runs too: {gaps}"


async def test_a_failing_page_keeps_its_last_good_entry_and_the_run_goes_on(
    setup: tuple[Engine, Pages], clock: FakeClock
) -> None:
    engine, pages = setup
    pages.fail.add("/p/3")
    pages.version = 2
    rewarmer = Rewarmer(engine, 1000, poll_every=None, clock=clock, sleep=fake_sleep(clock))
    rewarmer.start()
    await engine.revalidate_tag("posts")
    await rewarmer.idle()
    assert pages.rendered() == HOTTEST
    report = rewarmer.last
    assert report is not None and (report.rendered, report.failed) == (len(HOTTEST) - 1, 1)
    kept = await engine.handler.get("/p/3")
    assert kept is not None and kept.body == b"/p/3 v1" and kept.last_failure is not None
    served = await pages.visit(engine, "/p/3")
    assert served.status is CacheStatus.STALE and served.regeneration_failed
    assert served.entry is not None and served.entry.body == b"/p/3 v1"
    assert (await pages.visit(engine, "/p/7")).entry.body == b"/p/7 v2"  # type: ignore[union-attr]


async def test_visitors_are_never_delayed_by_a_rewarm(clock: FakeClock) -> None:
    engine = Engine(MemoryCache(), clock=clock, render_timeout=5.0, max_concurrent_renders=2)
    pages = Pages(clock)
    await site(engine, pages)
    pages.hold.update(HOTTEST)  # every re-warm render hangs until the test lets it go
    rewarmer = Rewarmer(engine, 1000, poll_every=None, clock=clock, sleep=fake_sleep(clock))
    rewarmer.start()
    await engine.revalidate_tag("even")
    await eventually(lambda: bool(pages.renders))
    await asyncio.sleep(0.05)
    assert pages.rendered() == ["/p/4"], "one slot of two at most, never the last free one"
    assert engine.slots.busy() == 1

    # A page the invalidation did not touch answers at once; a cold one renders in the free slot.
    served = await asyncio.wait_for(pages.visit(engine, "/p/3"), 0.5)
    assert served.status is CacheStatus.HIT
    served = await asyncio.wait_for(pages.visit(engine, "/p/2"), 0.5)
    assert served.status is CacheStatus.MISS
    # A visitor of the page being re-warmed joins that render: one render, not two.
    joined = asyncio.create_task(pages.visit(engine, "/p/4"))
    await asyncio.sleep(0.05)
    assert not joined.done()
    pages.gate.set()
    served = await asyncio.wait_for(joined, 1)
    assert served.status is CacheStatus.MISS and pages.rendered().count("/p/4") == 1
    await rewarmer.idle()
    await engine.drain()
    assert pages.rendered() == ["/p/4", "/p/2", "/p/10", "/p/8"]


class SlowLock(MemoryCache):
    """Once ``slow`` is set, the next lock attempt waits for the test, then finds the key
    locked elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.slow = False

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        if self.slow:
            self.slow = False
            await self.release.wait()
            return None
        return await super().acquire_lock(key, ttl)


async def test_a_visitor_who_joined_a_skipped_rewarm_is_rendered_for(clock: FakeClock) -> None:
    handler = SlowLock()
    engine = Engine(handler, clock=clock)
    pages = Pages(clock)
    engine.add_resolver(pages.resolve)
    await pages.visit(engine, "/p/4")
    clock.advance(1)
    await engine.revalidate_tag("posts")
    pages.version = 2
    handler.slow = True
    rewarm = asyncio.create_task(engine.rewarm("/p/4", pages.render("/p/4"), pages.policy("/p/4")))
    await eventually(lambda: engine.regenerating("/p/4"))
    visitor = asyncio.create_task(pages.visit(engine, "/p/4"))  # joins the re-warm's flight
    await asyncio.sleep(0.01)
    handler.release.set()  # "another process is rendering it": the re-warm skips it
    made = await rewarm
    assert made is not None and made.skipped
    served = await asyncio.wait_for(visitor, 2)
    assert served.status is CacheStatus.MISS, "never the invalidated entry as a fresh answer"
    assert served.entry is not None and served.entry.body == b"/p/4 v2"


# -- across processes: the file-system store -----------------------------------------------


@pytest.fixture
async def shared_fs(tmp_path: Path, clock: FakeClock) -> AsyncIterator[tuple[Engine, Pages, FileSystemCache]]:
    engine = Engine(FileSystemCache(tmp_path / "cache", fsync=False), clock=clock, max_concurrent_renders=8)
    pages = Pages(clock)
    await site(engine, pages)
    other = FileSystemCache(tmp_path / "cache", fsync=False)  # another process's view of it
    yield engine, pages, other
    await engine.drain()
    await other.close()
    await engine.close()


async def test_a_key_another_process_renders_is_not_rendered_twice(
    shared_fs: tuple[Engine, Pages, FileSystemCache], clock: FakeClock
) -> None:
    engine, pages, other = shared_fs
    token = await other.acquire_lock("/p/3", 30)  # the other process is rendering /p/3
    assert token
    steps = Steps(clock)
    rewarmer = Rewarmer(engine, 1, poll_every=None, clock=clock, sleep=steps)
    rewarmer.start()
    await engine.revalidate_tag("posts")
    await steps.until_sleeping()  # /p/4 started, /p/3 waits for its turn
    # Meanwhile the other process renders and stores /p/7 (a visitor of its own).
    clock.advance(0.5)
    other_engine = Engine(other, clock=clock)
    assert (await pages.visit(other_engine, "/p/7")).status is CacheStatus.MISS
    await steps.run_out(rewarmer)
    await engine.drain()
    assert pages.rendered().count("/p/3") == 0, "locked elsewhere: skipped"
    assert pages.rendered().count("/p/7") == 1, "rendered elsewhere: not again"
    report = rewarmer.last
    assert report is not None and report.skipped == 1 and "/p/7" not in report.started  # fresh: passed over
    assert await invalidated(engine, pages, "/p/3")
    await other.release_lock("/p/3", token)
    assert (await pages.visit(engine, "/p/3")).status is CacheStatus.MISS  # at its next visit


async def test_invalidations_from_another_process_rewarm_here_fs(tmp_path: Path) -> None:
    # As a server has it: a memory tier, whose mirror of the tag times lags the store's.
    tier = MemoryTier(FileSystemCache(tmp_path / "cache", fsync=False), tag_refresh=0.5)
    engine = Engine(tier, max_concurrent_renders=8)
    pages = Pages(time.time)
    await site(engine, pages)
    other = Engine(FileSystemCache(tmp_path / "cache", fsync=False))  # a script, another worker
    try:
        await check_cross_process(engine, other, pages)
    finally:
        await other.close()
        await engine.close()


async def test_invalidations_from_another_instance_rewarm_here_redis(redis_url: str) -> None:  # noqa: F811
    redis_cache = redis_py().RedisCache
    prefix = unique_prefix()
    engine = Engine(redis_cache(redis_url, prefix=prefix), max_concurrent_renders=8)
    pages = Pages(time.time)
    await site(engine, pages)
    other = Engine(redis_cache(redis_url, prefix=prefix))
    try:
        await check_cross_process(engine, other, pages)
    finally:
        with contextlib.suppress(Exception):
            await engine.handler.clear()  # type: ignore[attr-defined]
        await other.close()
        await engine.close()


async def check_cross_process(engine: Engine, other: Engine, pages: Pages) -> None:
    rewarmer = Rewarmer(engine, 200, poll_every=0.02)
    rewarmer.start()
    try:
        await eventually(lambda: rewarmer._baseline)
        await other.revalidate_path("/p/4")  # one page: nothing to re-warm
        await engine.handler.tag_times(["posts"])  # a memory tier's mirror is refreshed now...
        await other.revalidate_tag("posts")  # ...so it shows this only after its refresh period
        await eventually(lambda: len(pages.renders) == len(HOTTEST))
        await rewarmer.idle()
        assert pages.rendered() == HOTTEST
        assert rewarmer.last is not None and rewarmer.last.tags == ("posts",)
        for key in HOTTEST:
            assert (await pages.visit(engine, key)).status is CacheStatus.HIT
        for key in COLD:
            assert await invalidated(engine, pages, key)

        # Our own invalidations start one run each: the poll sees them too, and knows them.
        runs = rewarmer.last
        pages.renders.clear()
        await engine.revalidate_tag("even")
        await rewarmer.idle()
        await asyncio.sleep(0.1)  # several polls
        await rewarmer.idle()
        assert rewarmer.last is not runs and rewarmer.last.tags == ("even",)
        assert pages.rendered() == ["/p/4", "/p/10", "/p/8"]
    finally:
        await rewarmer.stop()
        await engine.drain()


def test_which_tags_are_wide() -> None:
    assert is_wide_tag("posts") and is_wide_tag("_pyisr:stale:posts")
    assert is_wide_tag("_pyisr:page:/p/[id]") and is_wide_tag("_pyisr:layout:/p")
    assert not is_wide_tag("_pyisr:path:/p/1") and not is_wide_tag("_pyisr:stale:_pyisr:path:/p/1")


# -- end to end: `pyisr start` -----------------------------------------------------------------

SECRET = "rewarm-test-secret"
N_PAGES = 40
#: Requests per hot page before the invalidation: /p/0 the most, /p/9 the least.
TRAFFIC = {f"/p/{i}": 12 - i for i in range(10)}

PAGE = """
import time

revalidate = False
tags = ["posts"]


def generate_static_params():
    return [{"id": str(i)} for i in range(N)]


def page(params):
    return f"<p>{params['id']} rendered at {time.time()}</p>"
"""


@pytest.fixture
def rewarm_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    (site / "app" / "p" / "[id]").mkdir(parents=True)
    (site / "app" / "p" / "[id]" / "page.py").write_text(PAGE.replace("range(N)", f"range({N_PAGES})"))
    (site / "pyisr.toml").write_text("")
    return site


def test_e2e_hottest_pages_are_fresh_again_before_anyone_asks(rewarm_site: Path) -> None:
    env = {"PYISR_REVALIDATE_SECRET": SECRET, "PYISR_REWARM_RATE": "50"}
    built = run_cli(["build", str(rewarm_site)], env)
    assert built.returncode == 0, built.stdout + built.stderr
    auth = {"authorization": f"Bearer {SECRET}"}
    with running(rewarm_site, env) as server:

        def created() -> dict[str, float]:
            found = {}
            for i in range(N_PAGES):
                answer = server.get(f"/_pyisr/cache?path=/p/{i}", headers=auth)
                assert answer.status_code == 200, answer.text
                found[f"/p/{i}"] = answer.json()["created_at"]
            return found

        for key, n in TRAFFIC.items():
            for _ in range(n):
                assert server.get(key).headers["x-pyisr-cache"] == "HIT"

        def check_rewarm(invalidate: Callable[[], object]) -> None:
            before = created()
            invalidate()
            invalidated_at = time.monotonic()
            hot = list(TRAFFIC)
            while True:
                now = created()
                if all(now[k] > before[k] for k in hot):
                    break
                assert time.monotonic() - invalidated_at < 2.0, f"not re-warmed in time:\n{server.log()}"
                time.sleep(0.05)
            # Hottest first: each started after the one more requested.
            assert sorted(hot, key=now.__getitem__) == hot
            cold = [k for k in now if k not in TRAFFIC]
            assert all(now[k] == before[k] for k in cold), "cold pages stay lazy"
            for key in hot:
                assert server.get(key).headers["x-pyisr-cache"] == "HIT"
            assert server.get(cold[0]).headers["x-pyisr-cache"] == "MISS"

        # Through the server's endpoint (its own invalidation)...
        check_rewarm(
            lambda: server.request("POST", "/_pyisr/revalidate?tag=posts", headers=auth).raise_for_status()
        )

        # ...and from a script: another process, seen by the server's poll.
        script = "import pyisr, sys; pyisr.configure(site=sys.argv[1]); pyisr.revalidate_tag('posts')"

        def from_script() -> None:
            import subprocess
            import sys

            done = subprocess.run(
                [sys.executable, "-c", script, str(rewarm_site)],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr

        check_rewarm(from_script)


def test_dev_servers_do_not_rewarm(rewarm_site: Path) -> None:
    from pyisr.server.app import App

    assert App(rewarm_site, dev=True).rewarmer is None


async def test_an_app_starts_and_stops_its_rewarmer(rewarm_site: Path) -> None:
    built = run_cli(["build", str(rewarm_site)], {})
    assert built.returncode == 0, built.stdout + built.stderr
    from pyisr.server.app import App

    app = App(rewarm_site)
    assert app.rewarmer is not None and app.rewarmer.rate == 20
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await app.startup()
        assert app.rewarmer._loop is not None and app.rewarmer._poller is not None
        assert (await client.get("/p/1")).headers["x-pyisr-cache"] == "HIT"
        await app.shutdown()
    assert app.rewarmer._poller is None


def test_an_instances_workers_share_its_rate(rewarm_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``rewarm_rate`` is per instance: ``pyisr start --workers 4`` gives each worker a quarter."""
    from pyisr.rewarm import WORKERS_ENV, process_share
    from pyisr.server.app import App

    built = run_cli(["build", str(rewarm_site)], {})
    assert built.returncode == 0, built.stdout + built.stderr
    monkeypatch.setenv(WORKERS_ENV, "4")
    app = App(rewarm_site)
    assert app.rewarmer is not None and app.rewarmer.rate == 5
    monkeypatch.setenv(WORKERS_ENV, "not a number")
    assert process_share(20) == 20


# -- the ASGI middleware -------------------------------------------------------------------


async def test_isr_middleware_rewarms_from_lifespan_startup_to_shutdown() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from pyisr.integrations.asgi import ISRMiddleware, isr

    renders: list[str] = []

    @isr(revalidate=False, tags=["posts"])
    async def post(request: Request) -> PlainTextResponse:
        renders.append(request.path_params["id"])
        return PlainTextResponse(f"post {request.path_params['id']}, render {len(renders)}")

    engine = Engine(MemoryCache(), max_concurrent_renders=4)
    app = ISRMiddleware(Starlette(routes=[Route("/posts/{id}", post)]), engine=engine, rewarm_rate=100)
    lifespan: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    said: list[str] = []

    async def send(message: Any) -> None:
        said.append(message["type"])

    running_app = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, lifespan.get, send)
    )
    await lifespan.put({"type": "lifespan.startup"})
    await eventually(lambda: "lifespan.startup.complete" in said)
    assert app.rewarmer is not None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for key, n in (("/posts/1", 5), ("/posts/2", 3), ("/posts/3", 1)):  # the first visit is a MISS
            for _ in range(n):
                assert (await client.get(key)).status_code == 200
        assert renders == ["1", "2", "3"]
        await engine.revalidate_tag("posts")
        await eventually(lambda: len(renders) == 5)
        await app.rewarmer.idle()
        assert renders == ["1", "2", "3", "1", "2"], "the hottest first; the cold one stays lazy"
        assert (await client.get("/posts/1")).headers["x-pyisr-cache"] == "HIT"
        assert (await client.get("/posts/3")).headers["x-pyisr-cache"] == "MISS"
    await lifespan.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(running_app, 2)
    assert app.rewarmer is None and said[-1] == "lifespan.shutdown.complete"
    await engine.close()
