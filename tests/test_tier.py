"""MemoryTier: hot entries without I/O, bounded by bytes, coherent with other processes' invalidations."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import pytest

from pyisr import CacheEntry, CacheStatus, Engine, MemoryCache, MemoryTier, RenderPolicy, set_engine


class CountingCache(MemoryCache):
    """A backing store that counts its I/O, standing in for disk or Redis.

    Like every built-in handler it can list tag changes since a cursor, so a tier in
    front of it mirrors the whole tag manifest.
    """

    def __init__(self, max_bytes: int = 50 * 1024 * 1024) -> None:
        super().__init__(max_bytes)
        self.gets = 0
        self.tag_reads = 0

    async def get(self, key: str) -> CacheEntry | None:
        self.gets += 1
        return await super().get(key)

    async def tag_times(self, tags: Iterable[str]) -> Mapping[str, float]:
        self.tag_reads += 1
        return await super().tag_times(tags)

    async def tag_changes(self, cursor: Any) -> tuple[Any, Mapping[str, float]] | None:
        self.tag_reads += 1
        return await super().tag_changes(cursor)


class TagTimesOnlyCache(CountingCache):
    """A custom handler with no change log: the tier asks it for the tags it needs."""

    async def tag_changes(self, cursor: Any) -> tuple[Any, Mapping[str, float]] | None:
        return None


BACKINGS = pytest.mark.parametrize(
    "backing_cls", [CountingCache, TagTimesOnlyCache], ids=["tag_changes", "tag_times"]
)


def entry(
    key: str,
    created_at: float,
    body: bytes = b"x",
    tags: tuple[str, ...] = ("t",),
    revalidate: int | None = 60,
) -> CacheEntry:
    return CacheEntry(key=key, body=body, created_at=created_at, revalidate=revalidate, tags=tags)


POLICY = RenderPolicy(revalidate=60, tags=("t",))


@pytest.fixture(params=[CountingCache, TagTimesOnlyCache], ids=["tag_changes", "tag_times"])
def backing(request) -> CountingCache:
    return request.param()


@pytest.fixture
async def tier_engine(clock, backing) -> AsyncIterator[Engine]:
    eng = Engine(MemoryTier(backing, tag_refresh=60), clock=clock)
    set_engine(eng)
    yield eng
    await eng.drain()
    set_engine(None)


# -- one process ------------------------------------------------------------------------


async def test_hot_hits_do_no_backing_io(tier_engine, backing, page_factory):
    page = page_factory()
    assert (await tier_engine.get("/p", page, POLICY)).status is CacheStatus.MISS
    # The first HIT reads the tag's time once; then it is mirrored for tag_refresh seconds.
    assert (await tier_engine.get("/p", page, POLICY)).status is CacheStatus.HIT
    gets, tag_reads = backing.gets, backing.tag_reads
    for _ in range(100):
        served = await tier_engine.get("/p", page, POLICY)
        assert served.status is CacheStatus.HIT and served.entry.body == b"render 1"
    assert (backing.gets, backing.tag_reads) == (gets, tag_reads)


async def test_own_invalidation_is_seen_at_once(tier_engine, clock, page_factory):
    page = page_factory()
    await tier_engine.get("/p", page, POLICY)
    clock.advance(1)
    await tier_engine.revalidate_tag("t")  # tag_refresh is 60 s: no waiting on the mirror
    clock.advance(0.001)
    served = await tier_engine.get("/p", page, POLICY)
    assert served.status is CacheStatus.MISS and served.entry.body == b"render 2"


async def test_entries_are_written_through(backing, clock):
    tier = MemoryTier(backing)
    assert await tier.set(entry("/a", clock.now))
    assert (await backing.get("/a")).body == b"x"
    assert [k async for k in tier.keys()] == ["/a"]
    await tier.delete("/a")
    assert await backing.get("/a") is None and await tier.get("/a") is None


async def test_reload_bypasses_memory(backing, clock):
    tier = MemoryTier(backing)
    await tier.set(entry("/a", clock.now, b"old"))
    await backing.set(entry("/a", clock.now + 1, b"new"))  # written by another process
    assert (await tier.get("/a")).body == b"old"  # memory, no tags revalidated
    assert (await tier.reload("/a")).body == b"new"
    assert (await tier.get("/a")).body == b"new"


async def test_lru_evicts_by_byte_budget(backing, clock):
    body = b"b" * 300
    size = entry("/a", 0, body).size()
    tier = MemoryTier(backing, max_bytes=2 * size + size // 2)  # room for two
    for key in ("/a", "/b"):
        await tier.set(entry(key, clock.now, body))
    await tier.get("/a")  # /a is now the most recently used
    await tier.set(entry("/c", clock.now, body))  # evicts /b, the least recently used
    gets = backing.gets
    assert (await tier.get("/a")).body == body and (await tier.get("/c")).body == body
    assert backing.gets == gets  # both served from memory
    assert (await tier.get("/b")).body == body  # still stored in the backing handler
    assert backing.gets == gets + 1
    assert tier.describe()["memory_tier"]["bytes"] <= tier.describe()["memory_tier"]["max_bytes"]


@pytest.mark.parametrize(("body_bytes", "tags", "headers"), [(200, 1, 1), (1500, 4, 1), (20_000, 10, 3)])
def test_an_entry_counts_what_it_really_holds(body_bytes: int, tags: int, headers: int) -> None:
    """The memory budget is the memory used: Python's object overheads are counted too."""
    import tracemalloc

    from pyisr.cache.lru import ByteLRU

    lru: ByteLRU[CacheEntry] = ByteLRU(10**12, CacheEntry.size)
    count = 2000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            key = f"/items/{i}"
            lru.put(
                key,
                CacheEntry(
                    key=key,
                    body=b"x" * body_bytes + str(i).encode(),
                    created_at=1000.0,
                    revalidate=60,
                    headers={f"x-header-{h}": f"value {h} {i}" for h in range(headers)},
                    tags=tuple(f"tag-{t}-{i}" for t in range(tags)),
                    etag=f'"{i:024x}-{body_bytes:x}"',
                ),
            )
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert lru.bytes == pytest.approx(used, rel=0.15)


async def test_entry_larger_than_the_budget_is_only_in_the_backing(backing, clock):
    tier = MemoryTier(backing, max_bytes=1000)
    big = entry("/big", clock.now, b"B" * 5000)
    assert await tier.set(big)
    assert tier.describe()["memory_tier"]["entries"] == 0
    gets = backing.gets
    assert (await tier.get("/big")).body == big.body
    assert (await tier.get("/big")).body == big.body
    assert backing.gets == gets + 2  # each read goes to the backing store


async def test_big_entry_replacing_a_small_one_drops_the_small_copy(backing, clock):
    tier = MemoryTier(backing, max_bytes=1000)
    await tier.set(entry("/p", clock.now, b"small"))
    await tier.set(entry("/p", clock.now + 1, b"B" * 5000))
    assert (await tier.get("/p")).body == b"B" * 5000


# -- two processes over one backing store -----------------------------------------------


async def test_fenced_set_drops_the_memory_copy(backing, clock):
    a, b = MemoryTier(backing), MemoryTier(backing)
    assert await a.set(entry("/p", 1.0, b"v1"))
    assert await b.set(entry("/p", 3.0, b"v3"))  # the other process stored a newer render
    assert not await a.set(entry("/p", 2.0, b"v2"))  # fenced: older than what is stored
    assert (await a.get("/p")).body == b"v3"
    assert (await backing.get("/p")).body == b"v3"


@BACKINGS
@pytest.mark.parametrize("tag_refresh", [0.1, 0.5])
async def test_invalidation_in_one_process_is_seen_by_another_within_1s(
    clock, page_factory, backing_cls, tag_refresh
):
    shared = backing_cls()
    one = Engine(MemoryTier(shared, tag_refresh=tag_refresh), clock=clock)
    two = Engine(MemoryTier(shared, tag_refresh=tag_refresh), clock=clock)
    page_one, page_two = page_factory(), page_factory()
    await one.get("/p", page_one, POLICY)
    served = await two.get("/p", page_two, POLICY)
    assert served.status is CacheStatus.HIT and page_two.calls == 0  # read from the shared store
    assert (await two.get("/p", page_two, POLICY)).status is CacheStatus.HIT  # now in memory
    clock.advance(1)
    await one.revalidate_tag("t")
    clock.advance(0.001)
    t0 = time.monotonic()
    while True:
        # Timed before the read, so a slow machine cannot turn a timely HIT into a failure.
        asked_at = time.monotonic()
        served = await two.get("/p", page_two, POLICY)
        if served.status is not CacheStatus.HIT:
            break
        assert asked_at - t0 < 1.0, "process two still serves the invalidated page after 1 s"
        await asyncio.sleep(0.05)
    assert served.status is CacheStatus.MISS and served.entry.body == b"render 1" and page_two.calls == 1
    # Process one now finds the page process two stored, instead of rendering again.
    served = await one.get("/p", page_one, POLICY)
    assert served.status is CacheStatus.HIT and page_one.calls == 1


@BACKINGS
async def test_other_process_adopts_a_newer_entry_without_rendering(clock, page_factory, backing_cls):
    shared = backing_cls()
    one = Engine(MemoryTier(shared, tag_refresh=0.1), clock=clock)
    two = Engine(MemoryTier(shared, tag_refresh=0.1), clock=clock)
    page_one, page_two = page_factory(), page_factory()
    await one.get("/p", page_one, POLICY)
    await two.get("/p", page_two, POLICY)  # two holds render 1 in memory
    clock.advance(1)
    await one.revalidate_tag("t")
    clock.advance(0.001)
    assert (await one.get("/p", page_one, POLICY)).entry.body == b"render 2"  # one re-renders
    await asyncio.sleep(0.15)
    served = await two.get("/p", page_two, POLICY)
    assert served.status is CacheStatus.HIT and served.entry.body == b"render 2"
    assert page_two.calls == 0


@BACKINGS
async def test_the_tag_mirror_is_reread_once_tag_refresh_has_passed(clock, backing_cls, monkeypatch):
    now = [100.0]
    monkeypatch.setattr("pyisr.cache.tier.time.monotonic", lambda: now[0])
    shared = backing_cls()
    one, two = MemoryTier(shared, tag_refresh=60), MemoryTier(shared, tag_refresh=60)
    await one.set(entry("/p", clock.now))
    assert await two.get("/p") is not None
    assert await two.tag_times(["t"]) == {}
    await one.revalidate_tags(["t"], clock.now + 1)
    now[0] += 59.9
    assert await two.tag_times(["t"]) == {}  # two's mirror is fresh for 60 s
    now[0] += 0.1
    assert await two.tag_times(["t"]) == {"t": clock.now + 1}


async def test_tags_version_is_only_given_while_the_mirror_is_current(clock, monkeypatch):
    """The server's fast path reuses a HIT while ``tags_version()`` is unchanged.

    So the tier must answer ``None`` ("unknown") whenever its mirror may be behind other
    processes: before the first refresh and once ``tag_refresh`` has passed.
    """
    now = [100.0]
    monkeypatch.setattr("pyisr.cache.tier.time.monotonic", lambda: now[0])
    shared = CountingCache()
    one, two = MemoryTier(shared, tag_refresh=0.5), MemoryTier(shared, tag_refresh=0.5)
    assert two.tags_version() is None
    await two.tag_times(["t"])
    first = two.tags_version()
    assert first is not None
    await two.revalidate_tags(["t"], clock.now)  # its own invalidation: a new version at once
    assert two.tags_version() not in (None, first)
    mine = two.tags_version()
    await one.revalidate_tags(["u"], clock.now)  # another process's invalidation
    assert two.tags_version() == mine  # not seen yet, but still within tag_refresh
    now[0] += 0.5
    assert two.tags_version() is None  # the mirror may be behind: no fast path
    assert await two.tag_times(["u"]) == {"u": clock.now}
    assert two.tags_version() not in (None, mine)


async def test_tags_version_is_unknown_without_a_change_log(clock):
    tier = MemoryTier(TagTimesOnlyCache(), tag_refresh=60)
    await tier.tag_times(["t"])
    await tier.revalidate_tags(["t"], clock.now)
    assert tier.tags_version() is None
