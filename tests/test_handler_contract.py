"""The contract every cache handler keeps, run against each built-in one.

MemoryCache, FileSystemCache, MemoryTier(MemoryCache()), RedisCache and RedisCache
on a Redis Cluster must behave the same here: the engine relies on exactly these
rules (fencing, latest tag time wins, lock tokens), whatever the storage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis_support import redis_cluster_url, redis_py, redis_url, unique_prefix  # noqa: F401

from pyisr.cache.entry import CacheEntry, EntryKind, FailureRecord
from pyisr.cache.handler import CacheHandler
from pyisr.cache.memory import MemoryCache
from pyisr.cache.tier import MemoryTier

HANDLERS = ["memory", "filesystem", "tier", "redis", "redis-cluster"]


@pytest.fixture(params=HANDLERS)
async def handler(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[CacheHandler]:
    kind = request.param
    made: CacheHandler
    if kind == "memory":
        made = MemoryCache()
    elif kind == "tier":
        made = MemoryTier(MemoryCache())
    elif kind == "filesystem":
        try:
            from pyisr.cache.filesystem import FileSystemCache
        except ImportError:
            pytest.skip("filesystem handler not yet available")
        made = FileSystemCache(tmp_path_factory.mktemp("fs-cache"))
    else:
        module = redis_py()
        url = request.getfixturevalue("redis_url" if kind == "redis" else "redis_cluster_url")
        made = module.RedisCache.from_url(url, prefix=unique_prefix())
    yield made
    if kind.startswith("redis"):
        await made.clear()  # type: ignore[attr-defined]
    await made.close()


def entry(
    key: str = "/page", *, created_at: float = 1000.0, body: bytes = b"<p>hi</p>", **kw: Any
) -> CacheEntry:
    kw.setdefault("revalidate", 60)
    return CacheEntry(key=key, body=body, created_at=created_at, **kw)


async def listed(handler: CacheHandler, prefix: str = "") -> set[str]:
    return {key async for key in handler.keys(prefix)}


async def test_get_of_a_missing_key_is_none(handler: CacheHandler) -> None:
    assert await handler.get("/nothing/here") is None


@pytest.mark.parametrize("revalidate", [None, 0, 60])
async def test_every_field_round_trips(handler: CacheHandler, revalidate: int | None) -> None:
    original = CacheEntry(
        key="/blog/café-日本/ü",
        body=bytes(range(256)) + b"\xff\xfe not utf-8 \x80",
        created_at=1_700_000_000.123456,
        revalidate=revalidate,
        kind=EntryKind.ROUTE,
        status=404,
        headers={"content-type": "text/html; charset=utf-8", "x-note": "naïve ✓"},
        tags=("posts", "_pyisr:path:/blog/café-日本/ü"),
        retry_at=1_700_000_030.5,
        last_failure=FailureRecord(at=1_700_000_000.5, exc_type="ValueError", message="boom ✗", count=3),
    )
    assert await handler.set(original) is True
    got = await handler.get(original.key)
    assert got == original
    assert got is not None and got.body == original.body and got.etag == original.etag


async def test_data_entries_round_trip(handler: CacheHandler) -> None:
    original = entry("data:" + "3fa2" * 16, kind=EntryKind.DATA, body=b'{"n": 1}', tags=("api",))
    assert await handler.set(original)
    assert await handler.get(original.key) == original


async def test_fencing_refuses_an_older_entry(handler: CacheHandler) -> None:
    assert await handler.set(entry(created_at=100.0, body=b"v100"))
    assert await handler.set(entry(created_at=99.0, body=b"v99")) is False
    got = await handler.get("/page")
    assert got is not None and got.body == b"v100"
    assert await handler.set(entry(created_at=100.0, body=b"v100-again")) is True
    assert await handler.set(entry(created_at=101.0, body=b"v101")) is True
    got = await handler.get("/page")
    assert got is not None and got.body == b"v101"


async def test_delete(handler: CacheHandler) -> None:
    await handler.set(entry("/a"))
    await handler.set(entry("/b"))
    await handler.delete("/a")
    assert await handler.get("/a") is None
    assert await handler.get("/b") is not None
    await handler.delete("/never-stored")  # no error


async def test_tag_times_latest_wins_and_unknown_tags_are_absent(handler: CacheHandler) -> None:
    await handler.revalidate_tags(["a", "b"], 10.0)
    await handler.revalidate_tags(["a"], 20.0)
    # Reported late (another instance's clock, a slow request): must not lower "a".
    await handler.revalidate_tags(["a"], 15.0)
    assert dict(await handler.tag_times(["a", "b", "never"])) == {"a": 20.0, "b": 10.0}
    assert dict(await handler.tag_times([])) == {}


async def test_tag_changes_since_a_cursor(handler: CacheHandler) -> None:
    first = await handler.tag_changes(None)
    if first is None:
        pytest.skip(f"{handler.name} does not list tag changes (optional)")
    cursor, everything = first
    assert dict(everything) == {}
    await handler.revalidate_tags(["x"], 5.0)
    result = await handler.tag_changes(cursor)
    assert result is not None
    after_x, changes = result
    assert dict(changes) == {"x": 5.0}
    result = await handler.tag_changes(after_x)
    assert result is not None and dict(result[1]) == {}
    await handler.revalidate_tags(["y"], 6.0)
    result = await handler.tag_changes(after_x)
    assert result is not None and dict(result[1]) == {"y": 6.0}
    result = await handler.tag_changes(None)
    assert result is not None and dict(result[1]) == {"x": 5.0, "y": 6.0}


async def test_lock_is_exclusive_and_released_only_by_its_token(handler: CacheHandler) -> None:
    token = await handler.acquire_lock("/k", 5.0)
    assert token is not None
    assert await handler.acquire_lock("/k", 5.0) is None
    await handler.release_lock("/k", "not-the-token")
    assert await handler.acquire_lock("/k", 5.0) is None
    await handler.release_lock("/k", token)
    again = await handler.acquire_lock("/k", 5.0)
    assert again is not None and again != token
    assert await handler.acquire_lock("/other", 5.0) is not None  # locks are per key
    await handler.release_lock("/k", again)


async def test_an_expired_lock_can_be_taken_and_the_old_token_is_void(handler: CacheHandler) -> None:
    old = await handler.acquire_lock("/slow", 0.2)
    assert old is not None
    await asyncio.sleep(0.3)
    new = await handler.acquire_lock("/slow", 5.0)
    assert new is not None and new != old
    await handler.release_lock("/slow", old)  # the crashed/slow holder wakes up late
    assert await handler.acquire_lock("/slow", 5.0) is None
    await handler.release_lock("/slow", new)


async def test_keys_lists_stored_keys_by_prefix(handler: CacheHandler) -> None:
    data_key = "data:" + "ab" * 32
    for key in ("/blog/1", "/blog/2", "/about", data_key):
        await handler.set(entry(key))
    assert await listed(handler, "/blog/") == {"/blog/1", "/blog/2"}
    assert await listed(handler) == {"/blog/1", "/blog/2", "/about", data_key}
    assert await listed(handler, "/nope") == set()


async def test_a_summary_is_the_metadata_and_the_stored_size_without_the_body(handler: CacheHandler) -> None:
    from dataclasses import replace

    original = entry(
        "/big",
        body=b"<p>" + b"x" * 5000 + b"</p>",
        tags=("posts",),
        headers={"content-type": "text/html"},
        encodings={"br": b"B" * 40, "gzip": b"G" * 60},
        last_failure=FailureRecord(at=1001.0, exc_type="ValueError", message="boom", count=1),
        retry_at=1030.0,
    )
    assert await handler.set(original) is True
    summary = await handler.summary("/big")
    assert summary is not None
    assert summary.stored_bytes == len(original.body) + 100
    assert summary.entry.body == b"" and not summary.entry.encodings
    assert summary.entry == replace(original, body=b"", encodings={}), "every other field as stored"
    assert await handler.summary("/nothing/here") is None


async def test_summaries_list_every_entry_by_prefix_as_summary_reads_it(handler: CacheHandler) -> None:
    """Listings read summaries in batches (Redis: one round trip per 200 entries); what
    they list is exactly what :meth:`summary` reads key by key."""
    keys = [f"/blog/{i}" for i in range(450)] + ["/about"]
    for i, key in enumerate(keys):
        assert await handler.set(entry(key, body=b"x" * i, tags=("posts",)))
    listed_all = {s.entry.key: s async for s in handler.summaries()}
    assert set(listed_all) == set(keys)
    for key in ("/blog/0", "/blog/449", "/about"):
        assert listed_all[key] == await handler.summary(key)
    blog = [s.entry.key async for s in handler.summaries("/blog/")]
    assert sorted(blog) == sorted(keys[:-1]) and len(blog) == 450
    assert [s async for s in handler.summaries("/nope")] == []


async def test_listing_a_cache_never_holds_its_pages_in_memory(handler: CacheHandler) -> None:
    """``pyisr cache list`` and the dashboard read every entry: with 24 pages of 512 kB
    (12 MB), the listing allocates a few hundred kB, not the pages."""
    import time
    import tracemalloc

    from pyisr.explain import list_rows

    body = b"x" * (512 * 1024)
    for i in range(24):
        assert await handler.set(entry(f"/p/{i}", body=body, created_at=time.time(), tags=("posts",)))
    tracemalloc.start()
    try:
        rows = await list_rows(handler, time.time(), sort="size")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(rows) == 24 and all(row.size == len(body) for row in rows)
    assert peak < 2 * 1024 * 1024, f"the listing allocated {peak / 1e6:.1f} MB"
