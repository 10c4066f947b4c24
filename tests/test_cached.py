"""``cached``: the data cache for functions (Next.js' ``unstable_cache``), alone and inside pages."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pyisr import (
    CacheStatus,
    Engine,
    EntryKind,
    MemoryCache,
    Rendered,
    RenderPolicy,
    arevalidate_path,
    arevalidate_tag,
    cached,
    get_engine,
    revalidate_tag,
    set_engine,
)
from pyisr.cache.tags import implicit_tags
from pyisr.runtime import run_sync


@pytest.fixture
async def engine(clock) -> AsyncIterator[Engine]:
    """conftest's ``engine``, with the default render timeout.

    The 2 s of conftest's engine is too tight here: a loaded machine must not turn a
    slow compute into a failure.
    """
    eng = Engine(MemoryCache(), clock=clock, debug=True)
    set_engine(eng)
    yield eng
    await eng.drain()
    set_engine(None)


def page_policy(path: str, revalidate: int | None = 100) -> RenderPolicy:
    return RenderPolicy(revalidate=revalidate, tags=implicit_tags(path, path))


async def data_entries(engine: Engine) -> list[str]:
    return [k async for k in engine.handler.keys("data:")]


# -- keys -------------------------------------------------------------------------------


async def test_async_function_same_args_compute_once(engine, counter):
    async def load(post_id: int) -> dict:
        return {"id": post_id, "n": counter.next()}

    get_post = cached(load, ["posts"], revalidate=60)
    assert await get_post(1) == {"id": 1, "n": 1}
    assert await get_post(1) == {"id": 1, "n": 1}
    assert await get_post(post_id=1) == {"id": 1, "n": 2}  # a keyword call is another key
    assert await get_post(2) == {"id": 2, "n": 3}
    assert await get_post(2) == {"id": 2, "n": 3}
    assert counter.calls == 3
    assert len(await data_entries(engine)) == 3


async def test_keyword_argument_order_does_not_matter(engine, counter):
    async def load(a: int, b: int) -> int:
        return counter.next()

    fn = cached(load)
    assert await fn(a=1, b=2) == await fn(b=2, a=1) == 1


async def test_key_parts_separate_entries(engine, counter):
    def make(source: str):
        async def load() -> str:
            return f"{source} {counter.next()}"

        return load

    # The same code closed over different values: only key_parts tell them apart.
    users, posts = cached(make("users"), ["users"]), cached(make("posts"), ["posts"])
    assert await users() == "users 1"
    assert await posts() == "posts 2"
    assert await users() == "users 1"


async def test_different_functions_never_share_entries(engine, counter):
    async def one() -> str:
        return f"one {counter.next()}"

    async def two() -> str:
        return f"two {counter.next()}"

    assert await cached(one, ["k"])() == "one 1"
    assert await cached(two, ["k"])() == "two 2"


def _load_from_source(source: str):
    namespace: dict = {"__name__": "site.data"}
    exec(textwrap.dedent(source), namespace)
    return namespace["load"]


async def test_an_edited_function_does_not_serve_the_old_results(engine):
    class DB:
        def posts(self) -> str:
            return "posts"

        def users(self) -> str:
            return "users"

    before = cached(_load_from_source("def load(db):\n    return db.posts()\n"), ["k"])
    after = cached(_load_from_source("def load(db):\n    return db.users()\n"), ["k"])
    db = DB()
    assert before(db) == "posts"
    assert after(db) == "users"


def test_function_identity_is_stable_across_processes(tmp_path: Path):
    """A persistent cache only helps if the next process computes the same key.

    Comprehensions (nested code objects) and set literals (frozensets, ordered by the
    per-process string hash) must not leak memory addresses or hash order into the key.
    """
    module = tmp_path / "datamod.py"
    module.write_text(
        textwrap.dedent(
            """
            def load(items):
                wanted = {"alpha", "beta", "gamma", "delta", "epsilon"}
                return sorted(i for i in items if i in wanted) + [x * 2 for x in range(3)]
            """
        )
    )
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from datamod import load; from pyisr.data.cached import _function_identity;"
        "print(_function_identity(load))"
    )
    keys = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, check=True
        )
        keys.add(out.stdout.strip())
    assert len(keys) == 1, keys


# -- time-based revalidation ------------------------------------------------------------


async def test_stale_value_is_served_while_one_recompute_runs(engine, clock, counter):
    async def load() -> int:
        await asyncio.sleep(0.01)
        return counter.next()

    fn = cached(load, ["swr"], revalidate=5)
    assert await fn() == 1
    clock.advance(4.9)
    assert await fn() == 1  # fresh
    clock.advance(0.1)
    assert [await fn() for _ in range(5)] == [1] * 5  # stale: served at once
    await get_engine().drain()
    assert counter.calls == 2  # one background recompute for the five stale reads
    assert await fn() == 2
    clock.advance(4)
    assert await fn() == 2


async def test_a_failing_recompute_keeps_the_stale_value(engine, clock, counter):
    broken = False

    async def load() -> int:
        if broken:
            raise ConnectionError("db down")
        return counter.next()

    fn = cached(load, revalidate=5)
    assert await fn() == 1
    broken = True
    clock.advance(6)
    assert await fn() == 1
    await engine.drain()
    assert await fn() == 1
    broken = False
    clock.advance(10)  # past the back-off
    assert await fn() == 1
    await engine.drain()
    assert await fn() == 2


async def test_an_error_with_nothing_cached_propagates_and_is_not_cached(engine, counter):
    async def load() -> int:
        counter.next()
        raise LookupError("no such post")

    fn = cached(load)
    for _ in range(2):
        with pytest.raises(LookupError, match="no such post"):
            await fn()
    assert counter.calls == 2


async def test_no_revalidate_keeps_the_value_until_a_tag(engine, clock, counter):
    async def load() -> int:
        return counter.next()

    for revalidate in (None, False):
        fn = cached(load, [repr(revalidate)], revalidate=revalidate, tags=["forever"])
        first = await fn()
        clock.advance(10**8)
        assert await fn() == first


# -- tags -------------------------------------------------------------------------------


async def test_revalidate_tag_makes_the_next_call_recompute(engine, clock, counter):
    async def load() -> int:
        return counter.next()

    fn = cached(load, ["k"], tags=["posts", "feed"], revalidate=3600)
    other = cached(load, ["other"], tags=["users"])
    assert await fn() == 1 and await other() == 2
    clock.advance(1)
    await arevalidate_tag("posts")
    clock.advance(0.001)
    assert await fn() == 3  # blocking: the fresh value, not the old one
    assert await fn() == 3
    assert await other() == 2  # a different tag is untouched
    clock.advance(1)
    revalidate_tag("feed")  # the sync form, from inside a running loop
    clock.advance(0.001)
    assert await fn() == 4


def test_revalidate_tag_from_a_script(sync_engine, clock, counter):
    fn = cached(lambda: counter.next(), ["script"], tags=["t"])
    assert fn() == 1 and fn() == 1
    clock.advance(1)
    revalidate_tag("t")
    clock.advance(0.001)
    assert fn() == 2


# -- validation -------------------------------------------------------------------------


async def _noop() -> None:
    return None


def test_revalidate_zero_is_refused():
    with pytest.raises(ValueError, match=r"'_noop'.*revalidate=0"):
        cached(_noop, revalidate=0)


@pytest.mark.parametrize("value", [-1, 1.5, "5", [5], float("nan"), float("inf")])
def test_bad_revalidate_values_name_the_value(value):
    with pytest.raises(
        ValueError, match=f"Invalid revalidate value {value!r}".replace("[", r"\[").replace("]", r"\]")
    ):
        cached(_noop, revalidate=value)


def test_good_revalidate_values():
    assert cached(_noop, revalidate=60).cache_revalidate == 60
    assert cached(_noop, revalidate=60.0).cache_revalidate == 60
    assert cached(_noop, revalidate=None).cache_revalidate is None
    assert cached(_noop, revalidate=False).cache_revalidate is None


@pytest.mark.parametrize(
    "tags,message",
    [
        ("posts", r"single string 'posts': write tags=\['posts'\]"),
        (["x" * 257], "257 characters; the limit is 256"),
        ([f"t{i}" for i in range(129)], "129 tags given; an entry may carry at most 128"),
        ([1], "tag 1 must be a string, not int"),
        ([None], "tag None must be a string"),
        ([""], "empty"),
    ],
)
def test_bad_tags_are_refused_with_a_clear_message(tags, message):
    with pytest.raises(ValueError, match=message):
        cached(_noop, tags=tags)


def test_not_a_function():
    with pytest.raises(TypeError, match="needs a function, not int"):
        cached(5)  # type: ignore[call-overload]


async def test_decorator_form(engine, counter):
    @cached(key_parts=["deco"], tags=["d"], revalidate=30)
    async def load(x: int) -> int:
        return x * 100 + counter.next()

    assert await load(1) == 101 and await load(1) == 101
    assert load.cache_tags == ("d",) and load.cache_revalidate == 30
    assert load.__name__ == "load"


def test_results_are_copies(sync_engine):
    fn = cached(lambda: [1, 2], ["copies"])
    got = fn()
    got.append(3)
    assert fn() == [1, 2]


# -- sync functions ---------------------------------------------------------------------


def test_sync_function_from_a_script(sync_engine, counter):
    assert threading.current_thread() is threading.main_thread()

    def load(x: int) -> str:
        return f"{x}:{counter.next()}"

    fn = cached(load, ["sync"], revalidate=10)
    assert fn(1) == "1:1" and fn(1) == "1:1" and fn(2) == "2:2"


def test_sync_function_stale_while_revalidate_from_a_script(sync_engine, clock, counter):
    fn = cached(lambda: counter.next(), ["sync-swr"], revalidate=5)
    assert fn() == 1
    clock.advance(5)
    assert fn() == 1
    run_sync(sync_engine.drain())  # the recompute ran on the bridge loop
    assert fn() == 2


async def test_aio_twin_of_a_sync_function(engine, counter):
    def load(x: int) -> str:
        return f"{x}:{counter.next()}"

    fn = cached(load, ["aio"])
    assert await fn.aio(1) == "1:1"
    assert fn(1) == "1:1"  # the sync form reads the same entry
    assert await fn.aio(1) == "1:1"
    assert counter.calls == 1


def test_sync_calls_from_many_threads_compute_once(sync_engine, counter):
    def load() -> int:
        time.sleep(0.05)
        return counter.next()

    fn = cached(load, ["threads"])
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda _: fn(), range(200)))
    assert results == [1] * 200 and counter.calls == 1


async def test_500_concurrent_calls_of_a_missing_key_compute_once(engine, counter):
    async def load(x: int) -> int:
        await asyncio.sleep(0.05)
        return x + counter.next()

    fn = cached(load, ["burst"])
    results = await asyncio.gather(*(fn(10) for _ in range(500)))
    assert results == [11] * 500 and counter.calls == 1


# -- inside page renders ----------------------------------------------------------------


async def test_S49_revalidate_tag_recomputes_the_data_of_a_page(engine, clock, counter):
    async def load() -> int:
        return counter.next()

    data = cached(load, ["k"], tags=["t1"], revalidate=100)

    async def render() -> Rendered:
        return Rendered(f"data {await data()}")

    policy = page_policy("/at", revalidate=100)
    first = await engine.get("/at", render, policy)
    assert first.status is CacheStatus.MISS and first.entry.body == b"data 1"
    assert "t1" in first.entry.tags and first.entry.revalidate == 100
    assert (await engine.get("/at", render, policy)).status is CacheStatus.HIT
    clock.advance(1)
    await arevalidate_tag("t1")
    clock.advance(0.001)
    served = await engine.get("/at", render, policy)
    assert served.status is CacheStatus.MISS and served.entry.body == b"data 2" and counter.calls == 2
    served = await engine.get("/at", render, policy)
    assert served.status is CacheStatus.HIT and served.entry.body == b"data 2"


@pytest.mark.parametrize(
    "page_revalidate,data_revalidate,expected",
    [(None, 8, 8), (100, 8, 8), (5, 100, 5), (100, None, 100), (None, None, None)],
)
async def test_page_takes_the_smallest_revalidate(
    engine, counter, page_revalidate, data_revalidate, expected
):
    data = cached(
        lambda: counter.next(),
        [f"min-{page_revalidate}-{data_revalidate}"],
        revalidate=data_revalidate,
        tags=["d"],
    )

    async def render() -> Rendered:
        return Rendered(f"data {await data.aio()}")

    served = await engine.get("/min", render, page_policy("/min", revalidate=page_revalidate))
    assert served.entry.revalidate == expected
    assert "d" in served.entry.tags


async def test_page_inherits_the_tags_of_every_data_call(engine):
    a = cached(lambda: 1, ["a"], tags=["a1", "a2"])
    b = cached(lambda: 2, ["b"], tags=["b1"])

    async def render() -> Rendered:
        return Rendered(f"{await a.aio()} {await b.aio()}")

    served = await engine.get("/tags", render, page_policy("/tags"))
    assert {"a1", "a2", "b1"} <= set(served.entry.tags)
    assert set(implicit_tags("/tags", "/tags")) <= set(served.entry.tags)
    data = await engine.handler.get((await data_entries(engine))[0])
    assert data.kind is EntryKind.DATA
    assert not set(data.tags) & set(implicit_tags("/tags", "/tags"))  # page tags are only soft


async def test_revalidate_path_of_the_page_recomputes_its_data(engine, clock, counter):
    data = cached(lambda: counter.next(), ["soft"], revalidate=3600)

    async def render() -> Rendered:
        return Rendered(f"data {await data.aio()}")

    policy = page_policy("/posts")
    assert (await engine.get("/posts", render, policy)).entry.body == b"data 1"
    clock.advance(1)
    await arevalidate_path("/posts")
    clock.advance(0.001)
    served = await engine.get("/posts", render, policy)
    assert served.status is CacheStatus.MISS and served.entry.body == b"data 2"
    assert await data.aio() == 2  # outside the page the new value is simply fresh


async def test_background_regeneration_recomputes_stale_data_first(engine, clock, counter):
    data = cached(lambda: counter.next(), ["bg"], revalidate=5)

    async def render() -> Rendered:
        return Rendered(f"data {await data.aio()}")

    policy = page_policy("/bg", revalidate=None)
    first = await engine.get("/bg", render, policy)
    assert first.entry.body == b"data 1" and first.entry.revalidate == 5
    clock.advance(6)
    stale = await engine.get("/bg", render, policy)
    assert stale.status is CacheStatus.STALE and stale.entry.body == b"data 1"
    await engine.drain()
    fresh = await engine.get("/bg", render, policy)
    # The regenerated page has the fresh data, not the stale value it would get outside.
    assert fresh.status is CacheStatus.HIT and fresh.entry.body == b"data 2"
    assert counter.calls == 2


async def test_regeneration_whose_data_fails_keeps_the_last_good_page(engine, clock, counter):
    """The seed's rule: an error while regenerating keeps the last successfully generated page.

    The stale data must not hide the failure: the page is not rebuilt from old data
    (which would reset its timer as if it were fresh), it stays as it was and is retried.
    """
    broken = False

    def load() -> int:
        if broken:
            raise ConnectionError("db down")
        return counter.next()

    data = cached(load, ["fails"], revalidate=5)

    async def render() -> Rendered:
        return Rendered(f"data {await data.aio()}")

    policy = page_policy("/fails", revalidate=None)
    first = await engine.get("/fails", render, policy)
    assert first.entry.body == b"data 1"
    broken = True
    clock.advance(6)
    assert (await engine.get("/fails", render, policy)).status is CacheStatus.STALE
    await engine.drain()
    kept = await engine.inspect("/fails")
    assert kept.body == b"data 1" and kept.created_at == first.entry.created_at
    assert kept.last_failure is not None and "db down" in kept.last_failure.message
    broken = False
    clock.advance(6)  # past both back-offs
    assert (await engine.get("/fails", render, policy)).status is CacheStatus.STALE
    await engine.drain()
    served = await engine.get("/fails", render, policy)
    assert served.status is CacheStatus.HIT and served.entry.body == b"data 2"


async def test_first_render_of_a_page_gets_stale_data_and_refreshes_it(engine, clock, counter):
    """Outside a regeneration, stale data is served at once and recomputed in the background."""
    data = cached(lambda: counter.next(), ["shared"], revalidate=5)

    async def render() -> Rendered:
        return Rendered(f"data {await data.aio()}")

    await engine.get("/one", render, page_policy("/one", revalidate=None))
    clock.advance(6)
    two = await engine.get("/two", render, page_policy("/two", revalidate=None))
    assert two.status is CacheStatus.MISS and two.entry.body == b"data 1"
    await engine.drain()
    assert counter.calls == 2 and await data.aio() == 2


async def test_sync_data_in_a_sync_page(engine, clock, counter):
    main = threading.get_ident()
    threads: list[int] = []

    def load(slug: str) -> str:
        return f"{slug} {counter.next()}"

    data = cached(load, ["sync-page"], tags=["sp"], revalidate=50)

    def render() -> Rendered:  # a sync page function: the engine runs it in a thread
        threads.append(threading.get_ident())
        return Rendered(f"page with {data('hello')}")

    policy = page_policy("/sync", revalidate=None)
    served = await engine.get("/sync", render, policy)
    assert served.entry.body == b"page with hello 1" and threads[0] != main
    assert "sp" in served.entry.tags and served.entry.revalidate == 50
    clock.advance(1)
    await arevalidate_tag("sp")
    clock.advance(0.001)
    served = await engine.get("/sync", render, policy)
    assert served.status is CacheStatus.MISS and served.entry.body == b"page with hello 2"


async def test_nested_cached_calls_pass_their_tags_up(engine, counter):
    inner = cached(lambda: counter.next(), ["inner"], tags=["inner"], revalidate=7)

    @cached(key_parts=["outer"], tags=["outer"], revalidate=60)
    async def outer() -> int:
        return await inner.aio() * 10

    async def render() -> Rendered:
        return Rendered(str(await outer()))

    served = await engine.get("/nested", render, page_policy("/nested", revalidate=None))
    assert served.entry.body == b"10"
    assert {"inner", "outer"} <= set(served.entry.tags) and served.entry.revalidate == 7


# -- concurrency limits -----------------------------------------------------------------


def _pages_with_data(data, n: int, *, sync: bool):
    if sync:

        def make(i):
            def render() -> Rendered:
                return Rendered(f"page {data(i)}")

            return render
    else:

        def make(i):
            async def render() -> Rendered:
                return Rendered(f"page {await data(i)}")

            return render

    return [make(i) for i in range(n)]


async def test_sync_pages_calling_sync_data_do_not_exhaust_the_render_threads(clock, counter):
    """More concurrent sync pages than render threads, each computing sync data on a miss.

    The pages hold every render thread while they wait for their data; the data must not
    need one of those threads to be computed.
    """
    # A deadlock shows as RenderTimeout after render_timeout; generous for slow machines.
    eng = Engine(MemoryCache(), clock=clock, max_concurrent_renders=2, render_timeout=5.0)
    set_engine(eng)
    try:
        data = cached(lambda i: i * 2, ["limits-sync"])
        renders = _pages_with_data(data, 4, sync=True)
        results = await asyncio.gather(
            *(eng.get(f"/p/{i}", r, RenderPolicy(revalidate=60)) for i, r in enumerate(renders))
        )
        assert [r.entry.body for r in results] == [f"page {i * 2}".encode() for i in range(4)]
    finally:
        await eng.drain()
        set_engine(None)


async def test_async_pages_calling_data_do_not_exhaust_the_render_limit(clock, counter):
    eng = Engine(MemoryCache(), clock=clock, max_concurrent_renders=2, render_timeout=5.0)
    set_engine(eng)
    try:

        @cached(key_parts=["limits-async"])
        async def data(i: int) -> int:
            return i * 2

        renders = _pages_with_data(data, 4, sync=False)
        results = await asyncio.gather(
            *(eng.get(f"/p/{i}", r, RenderPolicy(revalidate=60)) for i, r in enumerate(renders))
        )
        assert [r.entry.body for r in results] == [f"page {i * 2}".encode() for i in range(4)]
    finally:
        await eng.drain()
        set_engine(None)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sync_calls_work_in_a_forked_worker(sync_engine, counter):
    """A pre-forking server (gunicorn --preload) forks after the app made sync calls.

    The bridge loop's thread and the data threads exist only in the parent; a child
    that reused them would wait for ever.
    """
    fn = cached(lambda: os.getpid(), ["fork"])
    assert fn() == os.getpid()  # starts the bridge loop and a data thread here
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        import signal

        signal.alarm(10)  # a hang ends the child instead of the test run
        code = 1
        try:
            set_engine(Engine(MemoryCache()))
            revalidate_tag("after-fork")
            code = 0 if fn() == os.getpid() else 3
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
