"""The engine's state machine with a fake clock; SPEC.md cases named by id."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from pyisr import (
    CacheStatus,
    Engine,
    MemoryCache,
    OnMissing,
    Rendered,
    RenderPolicy,
    RevalidationError,
)
from pyisr.cache.tags import implicit_tags, tags_for_revalidate_path

ISR5 = RenderPolicy(revalidate=5, tags=implicit_tags("/blog/1", "/blog/[id]"))


def policy_for(
    path: str, pattern: str = "/blog/[id]", revalidate: int | None = 5, **kw: object
) -> RenderPolicy:
    return RenderPolicy(revalidate=revalidate, tags=implicit_tags(path, pattern), **kw)  # type: ignore[arg-type]


async def test_S04_S41_miss_then_hit(engine, page_factory):
    """A path that was not prerendered (Pages or App style: the same engine path)."""
    page = page_factory()
    first = await engine.get("/blog/1", page, ISR5)
    assert first.status is CacheStatus.MISS
    assert first.entry.body == b"render 1"
    second = await engine.get("/blog/1", page, ISR5)
    assert second.status is CacheStatus.HIT
    assert second.entry.body == b"render 1"
    assert page.calls == 1


async def test_S02_stale_serves_old_and_regenerates_once(engine, clock, page_factory):
    page = page_factory()
    await engine.get("/blog/1", page, ISR5)
    clock.advance(6)
    stale = await engine.get("/blog/1", page, ISR5)
    assert stale.status is CacheStatus.STALE and stale.entry.body == b"render 1"
    await engine.drain()
    clock.advance(1)
    fresh = await engine.get("/blog/1", page, ISR5)
    assert fresh.status is CacheStatus.HIT and fresh.entry.body == b"render 2"
    assert page.calls == 2


async def test_S03_very_old_entry_is_served_without_waiting(engine, clock, page_factory):
    page = page_factory(delay=0.5)
    await engine.get("/blog/1", page, ISR5)
    clock.advance(1000)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    served = await engine.get("/blog/1", page, ISR5)
    assert loop.time() - t0 < 0.1
    assert served.status is CacheStatus.STALE and served.entry.body == b"render 1"


async def test_revalidate_boundary_is_inclusive(engine, clock, page_factory):
    page = page_factory()
    await engine.get("/blog/1", page, ISR5)
    clock.advance(4.999)
    assert (await engine.get("/blog/1", page, ISR5)).status is CacheStatus.HIT
    clock.advance(0.001)
    assert (await engine.get("/blog/1", page, ISR5)).status is CacheStatus.STALE


async def test_S05_concurrent_misses_share_one_render(engine, page_factory):
    page = page_factory(delay=0.05)
    results = await asyncio.gather(*(engine.get("/blog/3", page, ISR5) for _ in range(50)))
    assert {r.status for r in results} == {CacheStatus.MISS}
    assert len({r.entry.body for r in results}) == 1
    assert page.calls == 1


async def test_500_concurrent_reads_of_a_missing_key_render_once(engine, page_factory):
    page = page_factory(delay=0.05)
    results = await asyncio.gather(*(engine.get("/k", page, ISR5) for _ in range(500)))
    assert page.calls == 1
    assert all(r.entry.body == b"render 1" for r in results)


async def test_500_concurrent_reads_of_a_stale_key_start_one_regeneration(engine, clock, page_factory):
    page = page_factory(delay=0.05)
    await engine.get("/k", page, ISR5)
    clock.advance(10)
    results = await asyncio.gather(*(engine.get("/k", page, ISR5) for _ in range(500)))
    assert {r.status for r in results} == {CacheStatus.STALE}
    await engine.drain()
    assert page.calls == 2


async def test_S06_requests_during_regeneration_stay_stale(engine, clock, page_factory):
    page = page_factory(delay=0.1)
    await engine.get("/blog/4", page, ISR5)
    clock.advance(6)
    assert (await engine.get("/blog/4", page, ISR5)).status is CacheStatus.STALE
    assert (await engine.get("/blog/4", page, ISR5)).status is CacheStatus.STALE
    await engine.drain()
    served = await engine.get("/blog/4", page, ISR5)
    assert served.status is CacheStatus.HIT and served.entry.body == b"render 2"
    assert page.calls == 2


async def test_S13_S43_no_revalidate_is_never_stale(engine, clock, page_factory):
    page = page_factory()
    policy = policy_for("/static", "/static", revalidate=None)
    await engine.get("/static", page, policy)
    clock.advance(10**7)
    served = await engine.get("/static", page, policy)
    assert served.status is CacheStatus.HIT and served.entry.revalidate is None


async def test_S14_revalidate_zero_is_never_cached(engine, page_factory):
    page = page_factory()
    policy = policy_for("/dyn", "/dyn", revalidate=0)
    a = await engine.get("/dyn", page, policy)
    b = await engine.get("/dyn", page, policy)
    assert a.status is b.status is CacheStatus.BYPASS
    assert (a.entry.body, b.entry.body) == (b"render 1", b"render 2")
    assert await engine.handler.get("/dyn") is None


async def test_S15_S42_unknown_path_not_allowed(engine, page_factory):
    page = page_factory()
    served = await engine.get("/blogf/2", page, policy_for("/blogf/2", on_missing=OnMissing.NOT_FOUND))
    assert served.status is CacheStatus.NOT_ALLOWED and served.entry is None
    assert page.calls == 0


async def test_S16_S40_not_allowed_path_still_served_when_cached(engine, clock, page_factory):
    """A prerendered path of a fallback-False (or dynamic_params = False) route follows the
    normal rules: HIT, STALE after the window, then HIT new."""
    page = page_factory()
    allowed = policy_for("/blogf/1")
    await engine.get("/blogf/1", page, allowed)
    strict = policy_for("/blogf/1", on_missing=OnMissing.NOT_FOUND)
    assert (await engine.get("/blogf/1", page, strict)).status is CacheStatus.HIT
    clock.advance(6)
    assert (await engine.get("/blogf/1", page, strict)).status is CacheStatus.STALE
    await engine.drain()
    clock.advance(1)
    served = await engine.get("/blogf/1", page, strict)
    assert served.status is CacheStatus.HIT and served.entry.body == b"render 2"


async def test_S17_fallback_renders_in_background(engine, page_factory):
    page = page_factory(delay=0.05)
    policy = policy_for("/blogt/2", on_missing=OnMissing.FALLBACK)
    first = await engine.get("/blogt/2", page, policy)
    assert first.status is CacheStatus.FALLBACK and first.entry is None
    await engine.drain()
    second = await engine.get("/blogt/2", page, policy)
    assert second.status is CacheStatus.HIT and second.entry.body == b"render 1"


async def test_S19_not_found_results_are_cached_with_their_revalidate(engine, clock):
    calls = 0

    async def render() -> Rendered:
        nonlocal calls
        calls += 1
        return Rendered("not found", status=404, revalidate=7)

    policy = policy_for("/nf/nf1", "/nf/[id]", revalidate=None)
    first = await engine.get("/nf/nf1", render, policy)
    assert first.status is CacheStatus.MISS and first.entry.status == 404 and first.entry.revalidate == 7
    second = await engine.get("/nf/nf1", render, policy)
    assert second.status is CacheStatus.HIT and second.entry.status == 404
    clock.advance(8)
    assert (await engine.get("/nf/nf1", render, policy)).status is CacheStatus.STALE
    await engine.drain()
    assert calls == 2


async def test_S21_redirects_are_cached(engine):
    async def render() -> Rendered:
        return Rendered(b"/plain", status=307, headers={"location": "/plain"}, revalidate=9)

    policy = policy_for("/r/temp", "/r/[id]", revalidate=None)
    first = await engine.get("/r/temp", render, policy)
    assert (first.status, first.entry.status, first.entry.headers["location"]) == (
        CacheStatus.MISS,
        307,
        "/plain",
    )
    assert (await engine.get("/r/temp", render, policy)).status is CacheStatus.HIT


async def test_S22_S23_failed_regeneration_keeps_old_with_backoff(engine, clock, page_factory, caplog):
    page = page_factory()
    policy = policy_for("/e/1", "/e/[id]", revalidate=3)
    await engine.get("/e/1", page, policy)  # t=0 MISS
    page.fail = RuntimeError("database down")
    clock.advance(3.5)
    with caplog.at_level(logging.ERROR, logger="pyisr.cache"):
        stale = await engine.get("/e/1", page, policy)
        assert stale.status is CacheStatus.STALE and stale.entry.body == b"render 1"
        await engine.drain()
    failures = [r for r in caplog.records if "FAILED" in r.getMessage()]
    assert len(failures) == 1 and "database down" in failures[0].getMessage()
    # The failed entry is kept and given a back-off of clamp(3, 3, 30) = 3 s: still past
    # its window, so STALE, saying its regeneration failed (and none is started).
    clock.advance(0.7)  # t=4.2
    kept = await engine.get("/e/1", page, policy)
    assert kept.status is CacheStatus.STALE and kept.regeneration_failed and kept.entry.body == b"render 1"
    assert not engine.regenerating("/e/1")
    assert kept.entry.last_failure.count == 1
    assert kept.entry.last_failure.exc_type == "RuntimeError"
    assert kept.entry.last_failure.message == "database down"
    clock.advance(3.5)  # t=7.7: retry
    retry = await engine.get("/e/1", page, policy)
    assert retry.status is CacheStatus.STALE and not retry.regeneration_failed
    await engine.drain()
    assert (await engine.inspect("/e/1")).last_failure.count == 2
    assert page.calls == 3
    # S-23: the error goes away; after the back-off the next regeneration succeeds.
    page.fail = None
    clock.advance(3.1)
    assert (await engine.get("/e/1", page, policy)).status is CacheStatus.STALE
    await engine.drain()
    clock.advance(1)
    served = await engine.get("/e/1", page, policy)
    assert served.status is CacheStatus.HIT and served.entry.body == b"render 4"
    assert served.entry.last_failure is None


@pytest.mark.parametrize("revalidate,backoff", [(1, 3), (10, 10), (60, 30)])
async def test_backoff_is_clamped_between_3_and_30(engine, clock, page_factory, revalidate, backoff):
    page = page_factory()
    policy = policy_for("/b", "/b", revalidate=revalidate)
    await engine.get("/b", page, policy)
    page.fail = ValueError("nope")
    clock.advance(revalidate)
    await engine.get("/b", page, policy)
    await engine.drain()
    entry = await engine.inspect("/b")
    assert entry.retry_at == pytest.approx(clock.now + backoff)


async def test_S24_failure_with_nothing_cached_raises_and_caches_nothing(engine, page_factory):
    page = page_factory()
    page.fail = RuntimeError("boom")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom"):
            await engine.get("/e/2", page, policy_for("/e/2", "/e/[id]"))
    assert page.calls == 2
    assert await engine.handler.get("/e/2") is None


async def test_5xx_result_never_replaces_a_good_entry(engine, clock, page_factory):
    page = page_factory()
    policy = policy_for("/p", "/p")
    await engine.get("/p", page, policy)
    page.status = 503
    clock.advance(6)
    await engine.get("/p", page, policy)
    await engine.drain()
    entry = await engine.inspect("/p")
    assert entry.body == b"render 1" and entry.last_failure.exc_type == "RenderFailed"


async def test_5xx_on_miss_is_an_error_and_not_cached(engine, page_factory):
    page = page_factory()
    page.status = 500
    with pytest.raises(Exception, match="status 500"):
        await engine.get("/p500", page, policy_for("/p500", "/p500"))
    assert await engine.handler.get("/p500") is None


async def test_hanging_render_times_out_and_keeps_old(clock, page_factory, caplog):
    engine = Engine(MemoryCache(), clock=clock, render_timeout=0.2)
    page = page_factory()
    policy = policy_for("/slow", "/slow")
    await engine.get("/slow", page, policy)
    page.delay = 5
    clock.advance(6)
    with caplog.at_level(logging.ERROR, logger="pyisr.cache"):
        assert (await engine.get("/slow", page, policy)).entry.body == b"render 1"
        await engine.drain()
    assert any("RenderTimeout" in r.getMessage() for r in caplog.records)
    entry = await engine.inspect("/slow")
    assert entry.body == b"render 1" and entry.last_failure.exc_type == "RenderTimeout"
    # After the back-off the next request retries.
    page.delay = 0
    clock.advance(5)
    assert (await engine.get("/slow", page, policy)).status is CacheStatus.STALE
    await engine.drain()
    assert (await engine.get("/slow", page, policy)).entry.body == b"render 3"


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_a_timeout_the_page_raises_is_its_failure_not_a_render_timeout(clock, sync):
    """A backend the page calls timing out is the page's error, told as it is: never
    "took longer than 30s", which would send the operator after render_timeout."""
    engine = Engine(MemoryCache(), clock=clock, render_timeout=30)
    calls = []

    def fail() -> Rendered:
        calls.append(1)
        if len(calls) > 1:
            raise TimeoutError("the catalogue API did not answer in 2s")
        return Rendered("render 1")

    async def afail() -> Rendered:
        return fail()

    policy = policy_for("/t", "/t")
    await engine.get("/t", fail if sync else afail, policy)
    clock.advance(40)
    assert (await engine.get("/t", fail if sync else afail, policy)).status is CacheStatus.STALE
    await engine.drain()
    entry = await engine.inspect("/t")
    assert entry.body == b"render 1" and entry.last_failure.exc_type == "TimeoutError"
    assert entry.last_failure.message == "the catalogue API did not answer in 2s"
    assert [r.result for r in engine.events.take().regenerations][-1] == "failed"


async def test_sync_render_runs_in_a_thread(engine):
    import threading

    main = threading.get_ident()
    seen: list[int] = []

    def render() -> Rendered:
        seen.append(threading.get_ident())
        return Rendered("sync")

    served = await engine.get("/sync", render, policy_for("/sync", "/sync"))
    assert served.entry.body == b"sync" and seen and seen[0] != main


async def test_concurrency_limit_bounds_parallel_renders(clock):
    engine = Engine(MemoryCache(), clock=clock, max_concurrent_renders=3)
    running = peak = 0

    async def render() -> Rendered:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return Rendered("x")

    await asyncio.gather(*(engine.get(f"/c/{i}", render, RenderPolicy(revalidate=5)) for i in range(20)))
    assert peak == 3


async def test_S45_revalidate_tag_makes_next_request_blocking_miss(engine, clock, page_factory):
    page = page_factory()
    policy = RenderPolicy(revalidate=None, tags=("ft",) + implicit_tags("/f", "/f"))
    await engine.get("/f", page, policy)
    clock.advance(1)
    await engine.revalidate_tag("ft")
    clock.advance(0.001)
    served = await engine.get("/f", page, policy)
    assert served.status is CacheStatus.MISS and served.entry.body == b"render 2"
    assert (await engine.get("/f", page, policy)).status is CacheStatus.HIT
    clock.advance(1)
    await engine.revalidate_tag("ft")  # a second invalidation works again
    clock.advance(0.001)
    assert (await engine.get("/f", page, policy)).entry.body == b"render 3"


async def test_S46_S64_revalidate_path(engine, clock, page_factory):
    page = page_factory()
    policy = policy_for("/a/1", "/a/[id]")
    await engine.get("/a/1", page, policy)
    clock.advance(1)
    await engine.revalidate_path("/a/1")
    clock.advance(0.001)
    served = await engine.get("/a/1", page, policy)
    assert served.status is CacheStatus.MISS and served.entry.body == b"render 2"


async def test_S47_S48_revalidate_route_pattern_and_layout(engine, clock, page_factory):
    pages = {p: page_factory() for p in ("/a/1", "/a/2", "/about")}
    policies = {
        "/a/1": policy_for("/a/1", "/a/[id]"),
        "/a/2": policy_for("/a/2", "/a/[id]"),
        "/about": policy_for("/about", "/about"),
    }
    for key, page in pages.items():
        await engine.get(key, page, policies[key])
    clock.advance(1)
    await engine.revalidate_path("/a/[id]", "page")
    clock.advance(0.001)
    assert (await engine.get("/a/1", pages["/a/1"], policies["/a/1"])).status is CacheStatus.MISS
    assert (await engine.get("/a/2", pages["/a/2"], policies["/a/2"])).status is CacheStatus.MISS
    assert (await engine.get("/about", pages["/about"], policies["/about"])).status is CacheStatus.HIT
    clock.advance(1)
    await engine.revalidate_path("/", "layout")
    clock.advance(0.001)
    for key, page in pages.items():
        assert (await engine.get(key, page, policies[key])).status is CacheStatus.MISS


async def test_revalidate_path_layout_of_a_subtree(engine, clock, page_factory):
    page = page_factory()
    inside, outside = policy_for("/blog/1", "/blog/[id]"), policy_for("/shop/1", "/shop/[id]")
    await engine.get("/blog/1", page, inside)
    await engine.get("/shop/1", page, outside)
    clock.advance(1)
    await engine.revalidate_path("/blog", "layout")
    clock.advance(0.001)
    assert (await engine.get("/blog/1", page, inside)).status is CacheStatus.MISS
    assert (await engine.get("/shop/1", page, outside)).status is CacheStatus.HIT


async def test_revalidate_path_rejects_a_pattern_without_type():
    with pytest.raises(ValueError, match="type='page'"):
        tags_for_revalidate_path("/blog/[id]", None)


async def test_S34_revalidate_path_needs_a_leading_slash():
    with pytest.raises(ValueError, match="'blog/1'.*e.g. '/blog/1'"):
        tags_for_revalidate_path("blog/1", None)


async def test_S30_on_demand_revalidation_regenerates_and_stores(engine, page_factory):
    page = page_factory()
    await engine.get("/blog/1", page, ISR5)
    entry = await engine.revalidate_now("/blog/1", page, ISR5)
    assert entry.body == b"render 2"
    served = await engine.get("/blog/1", page, ISR5)
    assert served.status is CacheStatus.HIT and served.entry.body == b"render 2"


async def test_S35_on_demand_works_on_pages_that_never_expire(engine, page_factory):
    page = page_factory()
    policy = policy_for("/static", "/static", revalidate=None)
    await engine.get("/static", page, policy)
    await engine.revalidate_now("/static", page, policy)
    assert (await engine.get("/static", page, policy)).entry.body == b"render 2"


async def test_S36_on_demand_failure_raises_and_keeps_old(engine, page_factory):
    page = page_factory()
    policy = policy_for("/e/1", "/e/[id]", revalidate=3)
    await engine.get("/e/1", page, policy)
    page.fail = RuntimeError("flag on")
    with pytest.raises(RevalidationError, match=r"^Failed to revalidate /e/1: flag on"):
        await engine.revalidate_now("/e/1", page, policy)
    served = await engine.get("/e/1", page, policy)
    assert served.entry.body == b"render 1"


async def test_fencing_an_older_render_never_overwrites_a_newer_entry(engine, clock):
    """A slow background render that started before an on-demand revalidation loses."""
    gate = asyncio.Event()
    versions = iter(["slow", "on-demand"])

    async def render() -> Rendered:
        body = next(versions)
        if body == "slow":
            await gate.wait()
        return Rendered(body)

    policy = policy_for("/x", "/x")
    handler = engine.handler
    await handler.set(
        __import__("pyisr").CacheEntry(
            key="/x", body=b"orig", created_at=clock.now, revalidate=5, tags=policy.tags
        )
    )
    clock.advance(6)
    assert (await engine.get("/x", render, policy)).status is CacheStatus.STALE  # slow render starts
    await asyncio.sleep(0)
    clock.advance(1)
    await engine.revalidate_now("/x", render, policy)
    gate.set()
    await engine.drain()
    assert (await engine.inspect("/x")).body == b"on-demand"


async def test_invalidated_entry_whose_rerender_fails_is_served_stale(engine, clock, page_factory):
    page = page_factory()
    policy = RenderPolicy(revalidate=60, tags=("posts",))
    await engine.get("/list", page, policy)
    clock.advance(1)
    await engine.revalidate_tag("posts")
    clock.advance(0.001)
    page.fail = RuntimeError("db down")
    served = await engine.get("/list", page, policy)
    assert served.status is CacheStatus.STALE and served.entry.body == b"render 1"
    # Within the back-off, no new attempt.
    served = await engine.get("/list", page, policy)
    assert served.entry.body == b"render 1" and page.calls == 2


async def test_render_returning_wrong_type_is_a_clear_error(engine):
    async def render():
        return "not a Rendered"

    with pytest.raises(TypeError, match="expected pyisr.Rendered"):
        await engine.get("/t", render, RenderPolicy())


async def test_S62_debug_log_lines_start_with_the_key(engine, page_factory, caplog):
    """S-62 at the engine level: one line per decision, key first, render time on a MISS."""
    page = page_factory()
    with caplog.at_level(logging.DEBUG, logger="pyisr.cache"):
        await engine.get("/blog/9", page, ISR5)
        await engine.get("/blog/9", page, ISR5)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("/blog/9 MISS rendered in ") and "ms" in line for line in lines)
    assert any(line.startswith("/blog/9 HIT") for line in lines)


async def test_custom_duck_typed_handler_works(clock, page_factory):
    """The seeds' custom cache handler: any object with the four async methods."""

    class DictHandler:
        def __init__(self) -> None:
            self.entries: dict = {}
            self.tags: dict = {}

        async def get(self, key):
            return self.entries.get(key)

        async def set(self, entry):
            self.entries[entry.key] = entry

        async def revalidate_tags(self, tags, at):
            for t in tags:
                self.tags[t] = at

        async def tag_times(self, tags):
            return {t: self.tags[t] for t in tags if t in self.tags}

    handler = DictHandler()
    engine = Engine(handler, clock=clock)
    page = page_factory()
    policy = policy_for("/c", "/c")
    await engine.get("/c", page, policy)
    assert "/c" in handler.entries
    assert (await engine.get("/c", page, policy)).status is CacheStatus.HIT
    clock.advance(1)
    await engine.revalidate_path("/c")
    clock.advance(0.001)
    assert (await engine.get("/c", page, policy)).status is CacheStatus.MISS


def test_object_missing_methods_is_refused():
    with pytest.raises(TypeError, match="lacks get, set"):
        Engine(object())


@pytest.mark.parametrize("bad", [-1, float("nan"), "5", 1.5, [], float("inf")])
def test_invalid_revalidate_values_name_the_value(bad):
    from pyisr.cache.entry import validate_revalidate

    with pytest.raises(ValueError, match="Invalid revalidate value"):
        validate_revalidate(bad)


def test_valid_revalidate_values():
    from pyisr.cache.entry import validate_revalidate

    assert validate_revalidate(None) is None
    assert validate_revalidate(False) is None
    assert validate_revalidate(0) == 0
    assert validate_revalidate(60) == 60
    assert validate_revalidate(60.0) == 60


async def test_failing_data_refetch_during_regeneration_fails_the_page_not_the_data(engine, clock):
    """The seed's 'throw so the cache is not updated': stale data that cannot be refetched
    while its page regenerates fails that regeneration, and the last good page stays."""
    from pyisr import cached

    state = {"fail": False, "n": 0}

    def load() -> int:
        state["n"] += 1
        if state["fail"]:
            raise ConnectionError("origin down")
        return state["n"]

    get = cached(load, ["d"], revalidate=5)

    async def render() -> Rendered:
        return Rendered(f"data={await get.aio()}")

    policy = policy_for("/d", "/d", revalidate=5)
    assert (await engine.get("/d", render, policy)).entry.body == b"data=1"
    state["fail"] = True
    clock.advance(6)
    assert (await engine.get("/d", render, policy)).status is CacheStatus.STALE
    await engine.drain()
    page = await engine.inspect("/d")
    assert page.body == b"data=1" and page.last_failure.exc_type == "ConnectionError"


async def test_app_not_found_and_redirect_take_the_route_revalidate(engine):
    from pyisr.engine import UNSET

    async def render() -> Rendered:
        return Rendered("gone", status=404, revalidate=UNSET)

    served = await engine.get("/gone", render, policy_for("/gone", "/gone", revalidate=7))
    assert served.entry.status == 404 and served.entry.revalidate == 7


def _render_in_child(engine: Engine, queue: object) -> None:
    def render() -> Rendered:
        return Rendered("from the child")

    served = asyncio.run(engine.get("/forked", render, RenderPolicy(revalidate=5)))
    queue.put(served.entry.body)  # type: ignore[attr-defined]


def test_sync_renders_work_in_a_forked_worker() -> None:
    """Pre-forking servers fork after the engine ran sync renders: the child needs new threads."""
    import multiprocessing

    engine = Engine(MemoryCache())

    def render() -> Rendered:
        return Rendered("parent")

    asyncio.run(engine.get("/parent", render, RenderPolicy(revalidate=5)))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_render_in_child, args=(engine, queue))
    child.start()
    child.join(20)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    assert queue.get(timeout=1) == b"from the child"


# -- SPEC cases whose engine side is not covered above ----------------------------------------


async def test_S01_a_prerendered_page_is_a_hit_with_the_builds_render(engine, clock, page_factory):
    page = page_factory()
    built = await engine.revalidate_now("/blog/1", page, ISR5, prerender=True)
    clock.advance(1)
    served = await engine.get("/blog/1", page, ISR5)
    assert served.status is CacheStatus.HIT and served.entry is not None
    assert served.entry.body == built.body == b"render 1" and served.entry.revalidate == 5
    assert page.calls == 1


async def test_S20_not_found_without_revalidate_is_cached_forever(engine, clock):
    calls = 0

    async def render() -> Rendered:
        nonlocal calls
        calls += 1
        return Rendered("not found", status=404)

    policy = policy_for("/nf/nonrev1", "/nf/[id]", revalidate=None)
    first = await engine.get("/nf/nonrev1", render, policy)
    assert first.status is CacheStatus.MISS and first.entry.status == 404 and first.entry.revalidate is None
    clock.advance(10 * 365 * 86400)
    later = await engine.get("/nf/nonrev1", render, policy)
    assert later.status is CacheStatus.HIT and calls == 1


@pytest.mark.parametrize("bad", [-1, "5", float("nan")])
async def test_S25_an_invalid_revalidate_from_a_render_fails_naming_the_value(engine, bad):
    async def render() -> Rendered:
        return Rendered("x", revalidate=bad)

    with pytest.raises(ValueError, match=repr(bad) if isinstance(bad, str) else str(bad)):
        await engine.get("/bad/1", render, policy_for("/bad/1", "/bad/[id]"))
    assert await engine.handler.get("/bad/1") is None


async def test_S32_revalidate_of_a_path_that_is_no_page_raises(engine):
    from pyisr import revalidate

    async def no_page(key: str) -> None:
        return None  # the site's resolver: fallback False and not prerendered

    engine.add_resolver(no_page)
    with pytest.raises(RevalidationError, match=r"^Failed to revalidate /blogf/5: "):
        await revalidate("/blogf/5")


async def test_S60_S61_a_restart_keeps_timing_and_invalidations(clock, page_factory, tmp_path):
    from pyisr.cache.filesystem import FileSystemCache

    page = page_factory()
    before = Engine(FileSystemCache(tmp_path), clock=clock)
    await before.get("/blog/2", page, policy_for("/blog/2"))
    tagged_policy = RenderPolicy(revalidate=None, tags=("ft", *implicit_tags("/ft/1", "/ft/[id]")))
    await before.get("/ft/1", page, tagged_policy)
    await before.revalidate_tag("ft")
    await before.close()

    clock.advance(1)
    after = Engine(FileSystemCache(tmp_path), clock=clock)  # a new process on the same cache
    try:
        kept = await after.get("/blog/2", page, policy_for("/blog/2"))
        assert kept.status is CacheStatus.HIT and kept.entry.body == b"render 1"
        assert kept.entry.revalidate == 5 and kept.entry.age(clock()) == 1  # S-60: timing kept
        tagged = await after.get("/ft/1", page, tagged_policy)
        assert tagged.status is CacheStatus.MISS and tagged.entry.body == b"render 3"  # S-61
    finally:
        await after.close()


async def test_S63_a_page_failing_for_long_is_served_and_explained(engine, clock, page_factory):
    page = page_factory()
    await engine.get("/blog/1", page, ISR5)
    page.fail = RuntimeError("database down")
    for _ in range(10):
        clock.advance(60)
        served = await engine.get("/blog/1", page, ISR5)
        assert served.status is CacheStatus.STALE and served.entry.body == b"render 1"
        await engine.drain()
    shown = await engine.inspect("/blog/1")
    assert shown is not None and shown.body == b"render 1"
    failure = shown.last_failure
    assert failure is not None and failure.count == 10
    assert failure.exc_type == "RuntimeError" and "database down" in failure.message


async def test_a_background_regeneration_elsewhere_never_outlives_an_on_demand_render(
    clock, tmp_path
) -> None:
    """Two processes (two file-system handlers and memory tiers over one directory): while
    process A regenerates a page on demand, process B's stale hit must not start a render
    of its own that would store a newer entry A's tier never hears of (the two would then
    serve different pages until the next window)."""
    from pyisr import MemoryTier, RenderPolicy
    from pyisr.cache.filesystem import FileSystemCache
    from pyisr.cache.tags import implicit_tags

    a = Engine(MemoryTier(FileSystemCache(tmp_path), tag_refresh=0), clock=clock)
    b = Engine(MemoryTier(FileSystemCache(tmp_path), tag_refresh=0), clock=clock)
    policy = RenderPolicy(revalidate=2, tags=implicit_tags("/p", None))
    release = asyncio.Event()
    renders: list[str] = []

    def page(who: str, *, slow: bool = False) -> Any:
        async def render() -> Rendered:
            renders.append(who)
            if slow:
                await release.wait()
            return Rendered(f"{who} {len(renders)}", revalidate=2)

        return render

    await a.get("/p", page("a"), policy)
    assert (await b.get("/p", page("b"), policy)).status is CacheStatus.HIT
    clock.advance(3)  # stale everywhere
    on_demand = asyncio.create_task(a.revalidate_now("/p", page("a", slow=True), policy))
    await asyncio.sleep(0.05)  # A renders, holding the page's lock
    clock.advance(0.001)
    stale = await b.get("/p", page("b"), policy)
    assert stale.status is CacheStatus.STALE
    await b.drain()
    release.set()
    await on_demand
    assert renders == ["a", "a"], "B's background regeneration was skipped while A rendered"
    served_a = await a.get("/p", page("a"), policy)
    served_b = await b.get("/p", page("b"), policy)
    assert served_a.entry is not None and served_b.entry is not None
    assert served_a.entry.body == served_b.entry.body == b"a 2"
