"""RedisCache: what the handler contract does not cover.

Namespacing by build id, cross-instance invalidation (pub/sub into the memory tiers,
with the manifest as the truth when a message is lost), the lock between instances,
degraded mode while Redis is down, and the cluster client. Each test uses its own
key prefix, so tests sharing one Redis never see each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from redis_support import (  # noqa: F401
    RedisServer,
    redis_cluster_url,
    redis_py,
    redis_servers,
    redis_url,
    unique_prefix,
)

from pyisr.cache.entry import CacheEntry
from pyisr.cache.tier import MemoryTier
from pyisr.cache.urls import build_handler, handler_from_url

redis_module = redis_py()
RedisCache = redis_module.RedisCache
T = TypeVar("T")


class Instances:
    """Makes RedisCache objects (one per simulated instance) and closes them all at the end."""

    def __init__(self) -> None:
        self.made: list[Any] = []

    def __call__(self, url: str, **options: Any) -> Any:
        cache = RedisCache.from_url(url, **options)
        self.made.append(cache)
        return cache


@pytest.fixture
async def instances() -> AsyncIterator[Instances]:
    made = Instances()
    yield made
    for cache in made.made:
        # Leave nothing behind on a shared PYISR_TEST_REDIS_URL, even after a failure.
        with contextlib.suppress(Exception):
            if not cache.degraded:
                await cache.clear()
        await cache.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Any]:  # noqa: F811
    """A plain redis-py client, to look at (and tamper with) what the handler stored."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def page(key: str = "/p", body: bytes = b"<p>v1</p>", created_at: float = 1000.0, **kw: Any) -> CacheEntry:
    return CacheEntry(key=key, body=body, created_at=created_at, revalidate=kw.pop("revalidate", 60), **kw)


async def eventually(check: Callable[[], Awaitable[bool]], within: float, step: float = 0.02) -> float:
    """Seconds until ``check()`` is true; fails the test after ``within`` seconds."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(step)
    return time.monotonic() - start


async def subscribed(cache: Any) -> None:
    """Wait until ``cache`` listens for invalidations and has synced its mirror after subscribing."""
    await cache.tag_changes(None)

    async def listening() -> bool:
        return bool(cache.describe()["subscribed"])

    await eventually(listening, within=2.0)
    await cache.tag_changes(None)  # the resync a new subscription asks for


# -- configuration -------------------------------------------------------------------------


def test_from_url_reads_pyisr_options_and_hides_the_password() -> None:
    cache = RedisCache.from_url(
        "redis://:s3cret@127.0.0.1:6390/2?prefix=site&build_id=b7&socket_timeout=0.25&health_check_interval=5"
    )
    assert (cache.prefix, cache.build_id, cache.socket_timeout) == ("site", "b7", 0.25)
    assert cache.namespace == "site:b7"
    info = cache.describe()
    assert "s3cret" not in json.dumps(info)
    assert info["url"].startswith("redis://:***@127.0.0.1:6390/2")
    assert info["degraded"] is False and info["build_id"] == "b7"
    assert RedisCache.from_url("redis+cluster://127.0.0.1:7000").cluster is True
    assert RedisCache.from_url("rediss://h:1/0?prefix=x", prefix="kw").prefix == "kw"  # keywords win


@pytest.mark.parametrize("bad", ["has{brace}", "has space", ""])
def test_names_that_would_break_the_key_layout_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        RedisCache("redis://127.0.0.1:6379/0", prefix=bad)
    with pytest.raises(ValueError, match="build_id"):
        RedisCache("redis://127.0.0.1:6379/0", build_id=bad or "a:b")


def test_cache_urls_select_redis_with_a_memory_tier() -> None:
    handler = handler_from_url("redis://127.0.0.1:6379/0?prefix=site&build_id=abc")
    assert isinstance(handler, RedisCache) and handler.namespace == "site:abc"
    tiered = build_handler("redis://127.0.0.1:6379/0")
    assert isinstance(tiered, MemoryTier) and isinstance(tiered.backing, RedisCache)
    assert tiered.describe()["degraded"] is False


async def test_layout_keeps_entry_and_lock_in_one_slot_with_compact_metadata(
    redis_url: str,  # noqa: F811
    raw: Any,
    instances: Instances,
) -> None:
    from redis.crc import key_slot

    cache = instances(redis_url, prefix=unique_prefix(), build_id="b1")
    body = b"\x00\xffraw bytes"
    await cache.set(page("/blog/1", body))
    ekey, lkey = cache.entry_key("/blog/1"), cache.lock_key("/blog/1")
    assert ekey.startswith("{" + cache.namespace + ":") and ekey.endswith("}:e")
    assert key_slot(ekey.encode()) == key_slot(lkey.encode())
    assert key_slot(cache.tags_key.encode()) == key_slot(f"{{{cache.namespace}}}:tagseq".encode())
    stored = await raw.hgetall(ekey)
    assert stored[b"body"] == body
    assert stored[b"key"] == b"/blog/1"
    assert b" " not in stored[b"meta"] and json.loads(stored[b"meta"])["size"] == len(body)


async def test_one_handler_serves_two_event_loops(redis_url: str, instances: Instances) -> None:  # noqa: F811
    """The engine also runs on a private loop in another thread; redis-py clients are per loop."""
    cache = instances(redis_url, prefix=unique_prefix())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_bridge(coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    try:
        assert await cache.set(page("/p", b"from the main loop"))
        got = await on_bridge(cache.get("/p"))
        assert got is not None and got.body == b"from the main loop"
        assert await on_bridge(cache.set(page("/q", created_at=2000.0)))
        assert await cache.get("/q") is not None
        await on_bridge(cache.revalidate_tags(["t"], 5.0))
        changes = await on_bridge(cache.tag_changes(None))
        assert changes is not None and changes[1]["t"] == 5.0
        assert (await cache.tag_times(["t"]))["t"] == 5.0
        await cache.clear()
        await cache.close()  # closes the other loop's client and subscriber too
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# -- isolation -----------------------------------------------------------------------------


async def test_build_ids_isolate_deployments(redis_url: str, instances: Instances) -> None:  # noqa: F811
    prefix = unique_prefix()
    old, new = (
        instances(redis_url, prefix=prefix, build_id="old"),
        instances(redis_url, prefix=prefix, build_id="new"),
    )
    await old.set(page("/p", b"old build"))
    assert await new.get("/p") is None
    await new.set(page("/p", b"new build", created_at=1.0))  # an older created_at, no fencing across builds
    got_old, got_new = await old.get("/p"), await new.get("/p")
    assert got_old is not None and got_old.body == b"old build"
    assert got_new is not None and got_new.body == b"new build"
    await old.revalidate_tags(["t"], 50.0)
    assert dict(await new.tag_times(["t"])) == {}
    assert [k async for k in new.keys()] == ["/p"]
    assert await new.acquire_lock("/p", 5) is not None and await old.acquire_lock("/p", 5) is not None


# -- cross-instance invalidation -----------------------------------------------------------


async def test_an_invalidation_on_one_instance_reaches_the_others_tier_within_a_second(
    redis_url: str,  # noqa: F811
    instances: Instances,
) -> None:
    prefix = unique_prefix()
    shared = instances(redis_url, prefix=prefix)
    a = MemoryTier(shared, tag_refresh=0.2)
    b = MemoryTier(instances(redis_url, prefix=prefix), tag_refresh=0.2)
    await a.set(page("/p", tags=("posts",)))
    assert await b.get("/p") is not None  # b's tier now holds it in memory
    await subscribed(b.backing)

    at = time.time()
    await a.revalidate_tags(["posts"], at)

    async def b_sees_it() -> bool:
        return (await b.tag_times(["posts"])).get("posts") == at

    assert await eventually(b_sees_it, within=1.0) < 1.0
    cached = await b.get("/p")
    assert cached is not None and cached.is_invalidated(await b.tag_times(cached.tags))


async def test_a_lost_publish_is_caught_by_the_counter(
    redis_url: str,  # noqa: F811
    raw: Any,
    instances: Instances,
) -> None:
    """The manifest and counter changed but the message never arrived (e.g. a dropped link)."""
    prefix = unique_prefix()
    writer = instances(redis_url, prefix=prefix)
    reader = instances(redis_url, prefix=prefix, seq_check_interval=0.3, resync_interval=300)
    tier = MemoryTier(reader, tag_refresh=0.1)
    await writer.revalidate_tags(["warmup"], 1.0)
    await subscribed(reader)
    await raw.hset(reader.tags_key, "lost", repr(42.0))
    await raw.incr(f"{{{reader.namespace}}}:tagseq")

    async def seen() -> bool:
        return (await tier.tag_times(["lost"])).get("lost") == 42.0

    # Noticed at one counter check, resynced at the next (0.3 s apart); with no message,
    # no reconnect and the periodic resync 300 s away, nothing else could have found it.
    await eventually(seen, within=3.0)


async def test_a_write_outside_the_scripts_is_caught_by_the_periodic_resync(
    redis_url: str,  # noqa: F811
    raw: Any,
    instances: Instances,
) -> None:
    """A tag time written by hand (no message, no counter) shows up after ``resync_interval``."""
    reader = instances(redis_url, prefix=unique_prefix(), resync_interval=0.5, seq_check_interval=0.1)
    tier = MemoryTier(reader, tag_refresh=0.1)
    await subscribed(reader)
    await raw.hset(reader.tags_key, "by-hand", repr(7.5))

    async def seen() -> bool:
        return (await tier.tag_times(["by-hand"])).get("by-hand") == 7.5

    # No message, no counter change, no reconnect: only the periodic resync can find it.
    await eventually(seen, within=3.0)


async def test_a_reconnecting_subscriber_resyncs(
    redis_url: str,  # noqa: F811
    raw: Any,
    instances: Instances,
) -> None:
    """Messages published while the subscription is down are recovered from the manifest."""
    prefix = unique_prefix()
    writer = instances(redis_url, prefix=prefix)
    reader = instances(
        redis_url, prefix=prefix, retry_interval=0.2, seq_check_interval=300, resync_interval=300
    )
    tier = MemoryTier(reader, tag_refresh=0.1)
    await subscribed(reader)
    name = f"pyisr-sub:{reader.namespace}"

    async def subscriber_ids() -> list[str]:
        clients = await raw.client_list(_type="pubsub")
        return [c["id"] for c in clients if c.get("name") == name]

    ids = await subscriber_ids()
    assert len(ids) == 1
    await raw.client_kill_filter(_id=ids[0])

    async def unsubscribed() -> bool:
        return not reader.describe()["subscribed"]

    await eventually(unsubscribed, within=2.0)
    # Published while nobody listens: only the resync on reconnect can deliver it.
    await writer.revalidate_tags(["missed"], 99.0)

    async def seen() -> bool:
        return (await tier.tag_times(["missed"])).get("missed") == 99.0

    await eventually(seen, within=2.0)
    assert reader.describe()["subscribed"] and await subscriber_ids() not in ([], ids)


# -- the lock between instances ------------------------------------------------------------


async def test_only_the_holder_releases_the_lock(redis_url: str, instances: Instances) -> None:  # noqa: F811
    prefix = unique_prefix()
    a, b = instances(redis_url, prefix=prefix), instances(redis_url, prefix=prefix)
    token = await a.acquire_lock("/p", 5.0)
    assert token is not None and not token.startswith("local:")
    assert await b.acquire_lock("/p", 5.0) is None
    await b.release_lock("/p", "guess")
    assert await b.acquire_lock("/p", 5.0) is None
    await a.release_lock("/p", token)
    taken = await b.acquire_lock("/p", 5.0)
    assert taken is not None
    await a.release_lock("/p", token)  # a stale release does not free b's lock
    assert await a.acquire_lock("/p", 5.0) is None


async def test_a_crashed_holders_lock_expires_and_another_instance_takes_over(
    redis_url: str,  # noqa: F811
    instances: Instances,
) -> None:
    prefix = unique_prefix()
    crashed, survivor = instances(redis_url, prefix=prefix), instances(redis_url, prefix=prefix)
    assert await crashed.acquire_lock("/p", 0.3) is not None
    await crashed.close()  # dies without releasing
    assert await survivor.acquire_lock("/p", 5.0) is None
    await asyncio.sleep(0.35)
    assert await survivor.acquire_lock("/p", 5.0) is not None


# -- degraded mode -------------------------------------------------------------------------


async def test_degraded_mode_serves_without_redis_and_recovers_by_itself(
    redis_servers: list[RedisServer],  # noqa: F811
    tmp_path: Any,
    instances: Instances,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from redis.asyncio import Redis

    server = RedisServer(tmp_path)
    redis_servers.append(server)
    server.start()
    prefix = unique_prefix()
    cache = instances(server.url, prefix=prefix)
    other = instances(server.url, prefix=prefix)
    other_tier = MemoryTier(other, tag_refresh=0.2)
    await cache.set(page("/p"))
    await subscribed(other)
    caplog.set_level(logging.INFO, logger="pyisr.cache")

    server.pause()  # connections hang: every call would wait for a timeout
    t0 = time.monotonic()
    assert await cache.get("/p") is None  # the first call pays one socket timeout
    assert time.monotonic() - t0 < 2.0
    assert cache.degraded and cache.describe()["degraded"] is True
    outage_at = time.time()
    slowest = 0.0
    for i in range(50):
        t = time.monotonic()
        assert await cache.get("/p") is None
        assert await cache.set(page(f"/n{i}")) is False
        await cache.revalidate_tags([f"t{i % 3}"], outage_at + i)
        assert (await cache.tag_times(["t0"]))["t0"] >= outage_at
        token = await cache.acquire_lock("/p", 5.0)
        assert token is not None and token.startswith("local:")  # this instance renders alone
        assert await cache.acquire_lock("/p", 5.0) is None
        await cache.release_lock("/p", token)
        slowest = max(slowest, time.monotonic() - t)
    assert slowest < 0.1, f"a call took {slowest:.3f}s while degraded: it should fail fast"
    warnings = [r for r in caplog.records if r.name == "pyisr.cache" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Redis unreachable" in warnings[0].getMessage()
    health = cache.health()
    assert health["status"] == "degraded" and health["queued_invalidations"] == 3 and health["last_error"]

    server.kill()
    server.start()  # same port, empty: a restarted Redis

    async def recovered() -> bool:
        return not cache.degraded

    assert await eventually(recovered, within=3.0) < 3.0
    infos = [r for r in caplog.records if r.name == "pyisr.cache" and r.levelno == logging.INFO]
    assert len(infos) == 1 and "reachable again" in infos[0].getMessage()
    raw = Redis.from_url(server.url, decode_responses=True)
    try:
        manifest = {k: float(v) for k, v in (await raw.hgetall(cache.tags_key)).items()}
    finally:
        await raw.aclose()
    assert manifest == {"t0": outage_at + 48, "t1": outage_at + 49, "t2": outage_at + 47}
    assert cache.health()["queued_invalidations"] == 0

    # Working again: writes are stored and invalidations reach the other instance.
    assert await cache.set(page("/p", b"after")) is True
    after = time.time() + 100
    await cache.revalidate_tags(["fresh"], after)

    async def other_sees_it() -> bool:
        return (await other_tier.tag_times(["fresh"])).get("fresh") == after

    await eventually(other_sees_it, within=3.0)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING and r.name == "pyisr.cache"]) == 1
    assert not cache.degraded and cache.health()["outages"] == 1


async def test_an_instance_keeps_serving_from_memory_and_renders_once_while_redis_is_down(
    redis_servers: list[RedisServer],  # noqa: F811
    tmp_path: Any,
    instances: Instances,
) -> None:
    """What the engine sees through a memory tier: HITs, one local render per stale page."""
    from pyisr import CacheStatus, Engine, Rendered, RenderPolicy

    server = RedisServer(tmp_path)
    redis_servers.append(server)
    server.start()
    now = [1_000_000.0]
    engine = Engine(MemoryTier(instances(server.url, prefix=unique_prefix())), clock=lambda: now[0])
    renders: list[str] = []

    async def render() -> Rendered:
        renders.append("r")
        return Rendered(body=f"v{len(renders)}")

    policy = RenderPolicy(revalidate=5)
    assert (await engine.get("/p", render, policy)).status is CacheStatus.MISS
    server.kill()
    assert (await engine.get("/p", render, policy)).status is CacheStatus.HIT
    now[0] += 6
    assert (await engine.get("/p", render, policy)).status is CacheStatus.STALE
    await engine.drain()
    for _ in range(3):
        served = await engine.get("/p", render, policy)
        assert (served.status, served.entry.body) == (CacheStatus.HIT, b"v2")
    assert (await engine.get("/new", render, policy)).status is CacheStatus.MISS
    assert (await engine.get("/new", render, policy)).status is CacheStatus.HIT
    assert len(renders) == 3
    await engine.drain()


async def test_an_unreachable_redis_at_start_never_fails_a_call(instances: Instances) -> None:
    from redis_support import free_port

    cache = instances(f"redis://127.0.0.1:{free_port()}/0", prefix=unique_prefix())
    assert await cache.get("/p") is None
    assert await cache.set(page()) is False
    await cache.revalidate_tags(["t"], 5.0)
    assert dict(await cache.tag_times(["t"])) == {"t": 5.0}
    result = await cache.tag_changes(None)
    assert result is not None and dict(result[1]) == {"t": 5.0}
    assert cache.degraded
    with pytest.raises(redis_module.RedisUnavailableError) as listing:
        [k async for k in cache.keys()]
    assert str(listing.value).count("Redis unreachable") == 1, "said once, with the reason"
    with pytest.raises(redis_module.RedisUnavailableError):
        [s async for s in cache.summaries()]  # the dashboard's listing: never "empty"


# -- Redis Cluster -------------------------------------------------------------------------


async def test_cluster_invalidation_reaches_another_instance(
    redis_cluster_url: str,  # noqa: F811
    instances: Instances,
) -> None:
    prefix = unique_prefix()
    a = instances(redis_cluster_url, prefix=prefix)
    b = MemoryTier(instances(redis_cluster_url, prefix=prefix), tag_refresh=0.2)
    for i in range(20):  # keys spread over every master
        assert await a.set(page(f"/p{i}"))
    assert {k async for k in b.keys()} == {f"/p{i}" for i in range(20)}
    await subscribed(b.backing)
    await a.revalidate_tags(["posts"], 123.0)

    async def seen() -> bool:
        return (await b.tag_times(["posts"])).get("posts") == 123.0

    assert await eventually(seen, within=1.0) < 1.0


async def test_closing_writes_what_an_outage_queued_once_redis_answers_again(
    redis_servers: list[RedisServer],  # noqa: F811
    tmp_path: Any,
    instances: Instances,
) -> None:
    """A server stopping (a deploy, a restart) right after an outage: the invalidations it
    queued are written as it closes, not left for a probe that will never run."""
    from redis.asyncio import Redis

    server = RedisServer(tmp_path)
    redis_servers.append(server)
    server.start()
    cache = instances(server.url, prefix=unique_prefix(), retry_interval=60)  # no probe in time
    server.kill()
    await cache.revalidate_tags(["posts"], 1234.5)
    assert cache.degraded and cache.health()["queued_invalidations"] == 1
    server.start()  # back, but the probe would only try again in a minute
    await cache.close()
    raw = Redis.from_url(server.url, decode_responses=True)
    try:
        assert await raw.hget(cache.tags_key, "posts") == "1234.5"
    finally:
        await raw.aclose()


def test_invalidations_redis_never_got_are_named_as_lost_when_a_script_ends() -> None:
    """A deploy script's ``revalidate_tag`` during an outage returned without error; as the
    script ends, the invalidation is tried once more and, failing, named in an error."""
    import subprocess
    import sys

    from redis_support import free_port

    script = (
        "import pyisr\n"
        f"pyisr.configure('redis://127.0.0.1:{free_port()}/0?prefix=lost')\n"
        "pyisr.revalidate_tag('posts')\n"
        "print('revalidated', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "revalidated"
    assert "are lost with this process (posts" in done.stderr
    assert "manage.py pyisr revalidate --tag" in done.stderr
