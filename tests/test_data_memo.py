"""Data read once: a hit on an unchanged entry reads, hashes and decodes nothing; every
change (a tag, time, another process's write) is still seen; callers cannot change what
others get; identical calls in one render share one computation (pyisr.data.memo)."""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_support import redis_url  # noqa: F401

from pyisr import Engine, MemoryCache, cached, context, set_engine
from pyisr.cache import filesystem, fs_entry
from pyisr.cache.entry import CacheEntry
from pyisr.cache.filesystem import FileSystemCache
from pyisr.cache.tier import MemoryTier
from pyisr.context import RenderContext
from pyisr.data import serializer
from pyisr.data.frozen import FrozenDict, FrozenList


class Reads:
    """Counts what reaching the store costs: reads of entry files, body digests, JSON decodes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files = 0
        self.digests = 0
        self.decodes = 0
        real_read, real_etag, real_loads = filesystem.read_entry, fs_entry.make_etag, serializer.loads_json

        def read_entry(*args: Any, **kwargs: Any) -> Any:
            self.files += 1
            return real_read(*args, **kwargs)

        def make_etag(body: bytes) -> str:
            self.digests += 1
            return real_etag(body)

        def loads_json(data: bytes) -> Any:
            self.decodes += 1
            return real_loads(data)

        monkeypatch.setattr(filesystem, "read_entry", read_entry)
        monkeypatch.setattr(fs_entry, "make_etag", make_etag)
        monkeypatch.setattr(serializer, "loads_json", loads_json)

    def reset(self) -> None:
        self.files = self.digests = self.decodes = 0


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    return Reads(monkeypatch)


def tiered_engine(root: Path, clock: Callable[[], float], **tier: Any) -> Engine:
    return Engine(MemoryTier(FileSystemCache(root, fsync=False), **tier), clock=clock)


@pytest.fixture
async def fs_engine(tmp_path: Path, clock: Any) -> AsyncIterator[Engine]:
    engine = tiered_engine(tmp_path / "cache", clock)
    set_engine(engine)
    yield engine
    await engine.close()
    set_engine(None)


class Source:
    """A data source whose answer the test changes; counts its calls."""

    def __init__(self, size: int = 3) -> None:
        self.version = 1
        self.calls = 0
        self.size = size
        self.lock = threading.Lock()

    def posts(self) -> list[dict[str, Any]]:
        with self.lock:
            self.calls += 1
        return [{"id": i, "title": f"post {i} v{self.version}", "tags": ["a", "b"]} for i in range(self.size)]


# -- an unchanged hit reads nothing ---------------------------------------------------------


async def test_an_unchanged_hit_reads_no_file_hashes_nothing_decodes_nothing(fs_engine, reads) -> None:
    source = Source(size=2000)
    get_posts = cached(source.posts, ["posts"], tags=["posts"], revalidate=3600)
    first = await get_posts.aio()
    assert len(first) == 2000 and source.calls == 1
    reads.reset()
    for _ in range(50):
        assert await get_posts.aio() == first
    assert (reads.files, reads.digests, reads.decodes) == (0, 0, 0)
    assert source.calls == 1


async def test_a_second_process_reads_from_disk_once_without_hashing_the_body(tmp_path, clock, reads) -> None:
    writer = tiered_engine(tmp_path / "cache", clock)
    source = Source(size=500)
    get_posts = cached(source.posts, ["posts"], tags=["posts"], revalidate=3600)
    set_engine(writer)
    try:
        expected = await get_posts.aio()
    finally:
        set_engine(None)
        await writer.close()
    reader = tiered_engine(tmp_path / "cache", clock)  # another process: nothing in memory
    set_engine(reader)
    try:
        reads.reset()
        for _ in range(20):
            assert await get_posts.aio() == expected
    finally:
        set_engine(None)
        await reader.close()
    # Read from disk once, checked by its files' identity (no digest), decoded once.
    assert (reads.files, reads.digests, reads.decodes) == (1, 0, 1)
    assert source.calls == 1


async def test_a_copied_cache_directory_is_still_read_checked_by_digest(tmp_path, clock, reads) -> None:
    engine = tiered_engine(tmp_path / "a", clock)
    source = Source()
    get_posts = cached(source.posts, ["posts"], revalidate=3600)
    set_engine(engine)
    try:
        expected = await get_posts.aio()
    finally:
        set_engine(None)
        await engine.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # new inodes: the stamps no longer match
    copied = tiered_engine(tmp_path / "b", clock)
    set_engine(copied)
    try:
        reads.reset()
        assert await get_posts.aio() == expected
    finally:
        set_engine(None)
        await copied.close()
    assert reads.digests == 1 and source.calls == 1


# -- every change is still seen ----------------------------------------------------------------


async def test_a_tag_revalidation_is_seen_by_the_next_read(fs_engine) -> None:
    source = Source()
    get_posts = cached(source.posts, ["posts"], tags=["posts"], revalidate=3600)
    assert (await get_posts.aio())[0]["title"] == "post 0 v1"
    source.version = 2
    assert (await get_posts.aio())[0]["title"] == "post 0 v1"  # cached
    await fs_engine.revalidate_tag("posts")
    assert (await get_posts.aio())[0]["title"] == "post 0 v2"
    assert source.calls == 2


async def test_time_is_seen_stale_then_expired(fs_engine, clock) -> None:
    source = Source()
    get_posts = cached(source.posts, ["posts"], revalidate=10, expire=100)
    assert (await get_posts.aio())[0]["title"] == "post 0 v1"
    source.version = 2
    clock.advance(11)  # stale: answered at once, refreshed in the background
    assert (await get_posts.aio())[0]["title"] == "post 0 v1"
    await fs_engine.drain()
    assert (await get_posts.aio())[0]["title"] == "post 0 v2"
    source.version = 3
    clock.advance(101)  # expired: never served, computed before answering
    assert (await get_posts.aio())[0]["title"] == "post 0 v3"
    assert source.calls == 3


async def test_another_file_system_cache_writing_is_seen(tmp_path, clock) -> None:
    """Two processes' worth of caches on one directory: the tag log tells the other one."""
    root = tmp_path / "cache"
    mine, theirs = tiered_engine(root, clock, tag_refresh=0), tiered_engine(root, clock, tag_refresh=0)
    source = Source()
    get_posts = cached(source.posts, ["posts"], tags=["posts"], revalidate=3600)
    try:
        set_engine(mine)
        assert (await get_posts.aio())[0]["title"] == "post 0 v1"
        source.version = 2
        set_engine(theirs)
        await theirs.revalidate_tag("posts")
        clock.advance(1)
        assert (await get_posts.aio())[0]["title"] == "post 0 v2"  # they compute and store v2
        source.version = 3  # any further compute would show v3
        set_engine(mine)
        assert (await get_posts.aio())[0]["title"] == "post 0 v2"  # we read their entry
        assert source.calls == 2
    finally:
        set_engine(None)
        await mine.close()
        await theirs.close()


async def test_another_redis_instance_writing_is_seen(redis_url: str, clock) -> None:  # noqa: F811
    from pyisr.cache.redis import RedisCache

    prefix = f"memo-{uuid.uuid4().hex[:8]}"
    mine = Engine(MemoryTier(RedisCache(redis_url, prefix=prefix), tag_refresh=0), clock=clock)
    theirs = Engine(MemoryTier(RedisCache(redis_url, prefix=prefix), tag_refresh=0), clock=clock)
    source = Source()
    get_posts = cached(source.posts, ["posts"], tags=["posts"], revalidate=3600)
    try:
        set_engine(mine)
        assert (await get_posts.aio())[0]["title"] == "post 0 v1"
        assert (await get_posts.aio())[0]["title"] == "post 0 v1"
        source.version = 2
        set_engine(theirs)
        await theirs.revalidate_tag("posts")
        clock.advance(1)
        assert (await get_posts.aio())[0]["title"] == "post 0 v2"
        source.version = 3
        set_engine(mine)
        for _ in range(50):  # the tag reaches this instance's mirror by pub/sub
            value = await get_posts.aio()
            if value[0]["title"] == "post 0 v2":
                break
            await asyncio.sleep(0.05)
        assert value[0]["title"] == "post 0 v2" and source.calls == 2
    finally:
        set_engine(None)
        await mine.close()
        await theirs.close()


# -- what a caller may change --------------------------------------------------------------


async def test_a_caller_changing_its_value_changes_nobody_elses(fs_engine) -> None:
    get_posts = cached(Source().posts, ["posts"], revalidate=3600)
    mine = await get_posts.aio()
    mine.append({"id": 99})  # the top-level list is the caller's own
    mine.sort(key=lambda p: -p["id"])
    with pytest.raises(TypeError, match="copy"):
        mine[1]["title"] = "changed"  # what it holds is shared, and read-only
    with pytest.raises(TypeError, match="copy"):
        mine[1]["tags"].append("c")
    theirs = await get_posts.aio()
    assert [p["id"] for p in theirs] == [0, 1, 2] and theirs[0]["title"] == "post 0 v1"
    assert theirs[0]["tags"] == ["a", "b"]
    assert isinstance(theirs[0], dict) and type(theirs[0]) is FrozenDict
    assert type(theirs[0]["tags"]) is FrozenList
    plain = copy.deepcopy(theirs)
    plain[0]["tags"].append("c")
    assert type(plain[0]) is dict and (await get_posts.aio())[0]["tags"] == ["a", "b"]


class Box:
    def __init__(self) -> None:
        self.items = [1, 2]


async def test_pickled_values_are_a_copy_per_caller(fs_engine, monkeypatch) -> None:
    monkeypatch.setenv("PYISR_SIGNING_KEY", "k" * 64)
    get_box = cached(Box, ["box"], serializer="pickle", revalidate=3600)
    first = await get_box.aio()
    first.items.append(3)
    assert (await get_box.aio()).items == [1, 2]


# -- one render, one result ------------------------------------------------------------------------


@pytest.fixture
def counted_engine(clock: Any) -> Iterator[tuple[Engine, list[str]]]:
    engine = Engine(MemoryCache(), clock=clock)
    asked: list[str] = []
    real_get = engine.get

    async def get(key: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(key)
        return await real_get(key, *args, **kwargs)

    engine.get = get  # type: ignore[method-assign]
    set_engine(engine)
    yield engine, asked
    set_engine(None)


def rendering(engine: Engine, key: str = "/page", *, revalidating: bool = False) -> RenderContext:
    return RenderContext(key=key, engine=engine, is_revalidating=revalidating)


async def test_concurrent_identical_calls_in_one_render_compute_once(counted_engine) -> None:
    engine, asked = counted_engine
    calls = 0

    async def load(n: int) -> list[int]:
        nonlocal calls
        calls += 1
        mine = calls
        await asyncio.sleep(0.05)
        return [n, mine]

    get = cached(load, ["load"], revalidate=60)
    token = context.enter(rendering(engine))
    try:
        results = await asyncio.gather(*(get(1) for _ in range(20)), get(2), get(2))
    finally:
        context.leave(token)
    assert results[:20] == [[1, 1]] * 20
    assert results[20] == results[21] and results[20][0] == 2
    assert calls == 2  # one per distinct argument
    assert len(asked) == 2  # the engine was asked once per distinct call


async def test_sync_calls_from_threads_of_one_render_compute_once(counted_engine) -> None:
    engine, asked = counted_engine
    calls = 0
    lock = threading.Lock()
    started = threading.Event()

    def load() -> str:
        nonlocal calls
        with lock:
            calls += 1
        started.wait(1)
        return "value"

    get = cached(load, ["sync-load"], revalidate=60)
    ctx = rendering(engine)
    results: list[str] = []

    def call() -> None:
        token = context.enter(ctx)
        try:
            results.append(get())
        finally:
            context.leave(token)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    await asyncio.sleep(0.2)
    started.set()
    for t in threads:
        await asyncio.to_thread(t.join, 10)
    assert results == ["value"] * 8 and calls == 1 and len(asked) == 1


async def test_a_new_render_reads_again_and_recomputes_what_went_stale(counted_engine, clock) -> None:
    engine, asked = counted_engine
    calls = 0

    def load() -> int:
        nonlocal calls
        calls += 1
        return calls

    get = cached(load, ["stale-load"], revalidate=10)
    token = context.enter(rendering(engine))
    try:
        assert [await get.aio() for _ in range(5)] == [1] * 5
    finally:
        context.leave(token)
    assert len(asked) == 1
    clock.advance(11)
    # The page regenerating reads its stale data afresh (in the foreground).
    token = context.enter(rendering(engine, revalidating=True))
    try:
        assert [await get.aio() for _ in range(5)] == [2] * 5
    finally:
        context.leave(token)
    assert calls == 2 and len(asked) == 2


async def test_a_failed_read_is_not_kept(counted_engine) -> None:
    engine, _ = counted_engine
    attempts = 0

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("down")
        return "up"

    get = cached(flaky, ["flaky"], revalidate=60)
    token = context.enter(rendering(engine))
    try:
        with pytest.raises(RuntimeError, match="down"):
            await get()
        assert await get() == "up"
    finally:
        context.leave(token)


async def test_identical_fetches_in_one_render_send_one_request(counted_engine) -> None:
    import httpx

    from pyisr import fetch
    from pyisr.data import fetch as fetch_module

    engine, _ = counted_engine
    sent = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal sent
        sent += 1
        return httpx.Response(200, json={"n": sent})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    original = fetch_module._clients.get
    fetch_module._clients.get = lambda: client  # type: ignore[method-assign]
    token = context.enter(rendering(engine))
    try:
        responses = await asyncio.gather(
            *(fetch("http://api.test/posts", revalidate=60) for _ in range(10)),
            *(fetch("http://api.test/live", cache="no-store") for _ in range(5)),
        )
    finally:
        context.leave(token)
        fetch_module._clients.get = original  # type: ignore[method-assign]
        await client.aclose()
    assert sent == 2
    assert {r.json()["n"] for r in responses[:10]} == {responses[0].json()["n"]}
    assert len({id(r) for r in responses}) == 15  # a response object per caller
    responses[0].headers["x-mine"] = "1"
    assert "x-mine" not in responses[1].headers


# -- the memory budget ---------------------------------------------------------------------------


async def test_decoded_values_count_in_the_tier_budget_and_go_with_their_entry(tmp_path, clock) -> None:
    tier = MemoryTier(FileSystemCache(tmp_path / "cache", fsync=False), max_bytes=2_000_000)
    engine = Engine(tier, clock=clock)
    set_engine(engine)
    try:
        big = cached(Source(size=2000).posts, ["big"], revalidate=3600)
        await big.aio()
        held = tier.describe()["memory_tier"]["bytes"]
        entry = await tier.get([k async for k in tier.keys("data:")][0])
        assert entry is not None and held > 2 * len(entry.body)  # the entry and its decoded value
        for i in range(40):  # other entries push it out, decoded value included
            await tier.set(CacheEntry(key=f"/p/{i}", body=os.urandom(60_000), created_at=1.0, revalidate=60))
        assert tier.describe()["memory_tier"]["bytes"] <= 2_000_000
    finally:
        set_engine(None)
        await engine.close()
