"""The public on-demand API: revalidate_tag / revalidate_path (mark) and revalidate (regenerate)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from pyisr import (
    CacheStatus,
    Engine,
    MemoryCache,
    RenderPolicy,
    RevalidationError,
    arevalidate_path,
    arevalidate_tag,
    revalidate,
    revalidate_path,
    revalidate_sync,
    revalidate_tag,
    set_engine,
)
from pyisr.cache.tags import PATH_TAG, implicit_tags
from pyisr.runtime import run_sync


@pytest.fixture
def sync_engine(clock) -> Iterator[Engine]:
    """An engine for tests with no event loop of their own (scripts, workers)."""
    eng = Engine(MemoryCache(), clock=clock)
    set_engine(eng)
    yield eng
    set_engine(None)


def blog_policy(path: str) -> RenderPolicy:
    return RenderPolicy(revalidate=5, tags=("posts", *implicit_tags(path, "/blog/[id]")))


def tag_time(engine: Engine, tag: str) -> float | None:
    return run_sync(engine.handler.tag_times([tag])).get(tag)


# -- marking from sync code -------------------------------------------------------------


def test_revalidate_tag_from_a_script(sync_engine, clock):
    assert threading.current_thread() is threading.main_thread()
    revalidate_tag("posts")
    assert tag_time(sync_engine, "posts") == clock.now


def test_revalidate_path_from_a_script(sync_engine, clock):
    revalidate_path("/blog/%E3%81%82/")
    assert tag_time(sync_engine, PATH_TAG + "/blog/あ") == clock.now
    revalidate_path("/blog/[id]", "page")
    assert tag_time(sync_engine, "_pyisr:page:/blog/[id]") == clock.now


def test_sync_forms_validate_their_arguments(sync_engine):
    with pytest.raises(ValueError, match="300 characters; the limit is 256"):
        revalidate_tag("x" * 300)
    with pytest.raises(ValueError, match="reserved prefix"):
        revalidate_tag(PATH_TAG + "/blog/1")
    with pytest.raises(ValueError, match="'blog/1'"):
        revalidate_path("blog/1")
    with pytest.raises(ValueError, match="type='page'"):
        revalidate_path("/blog/[id]")


async def test_sync_forms_work_inside_a_running_loop(engine, clock, page_factory):
    """A sync view running on the event loop (or a library callback) may call them directly."""
    page = page_factory()
    policy = blog_policy("/blog/1")
    await engine.get("/blog/1", page, policy)
    clock.advance(1)
    revalidate_tag("posts")  # runs on the bridge loop while this loop waits
    clock.advance(0.001)
    served = await engine.get("/blog/1", page, policy)
    assert served.status is CacheStatus.MISS and served.entry.body == b"render 2"
    clock.advance(1)
    revalidate_path("/blog/1")
    clock.advance(0.001)
    served = await engine.get("/blog/1", page, policy)
    assert served.status is CacheStatus.MISS and served.entry.body == b"render 3"
    assert (await engine.get("/blog/1", page, policy)).status is CacheStatus.HIT


async def test_sync_forms_work_from_a_worker_thread(engine, clock, page_factory):
    page = page_factory()
    policy = blog_policy("/blog/1")
    await engine.get("/blog/1", page, policy)
    clock.advance(1)
    await asyncio.to_thread(revalidate_tag, "posts")
    clock.advance(0.001)
    assert (await engine.get("/blog/1", page, policy)).status is CacheStatus.MISS


async def test_async_forms(engine, clock, page_factory):
    page = page_factory()
    policy = blog_policy("/blog/1")
    await engine.get("/blog/1", page, policy)
    clock.advance(1)
    await arevalidate_tag("posts")
    clock.advance(0.001)
    assert (await engine.get("/blog/1", page, policy)).entry.body == b"render 2"
    clock.advance(1)
    await arevalidate_path("/blog", "layout")
    clock.advance(0.001)
    assert (await engine.get("/blog/1", page, policy)).entry.body == b"render 3"
    clock.advance(1)
    await arevalidate_path("/blog/2")  # another post: no effect on /blog/1
    clock.advance(0.001)
    assert (await engine.get("/blog/1", page, policy)).status is CacheStatus.HIT
    with pytest.raises(ValueError, match="must be a string"):
        await arevalidate_tag(5)  # type: ignore[arg-type]


async def test_repeated_invalidations_each_work(engine, clock, page_factory):
    page = page_factory()
    policy = blog_policy("/blog/1")
    await engine.get("/blog/1", page, policy)
    for n in range(2, 5):
        clock.advance(1)
        await arevalidate_tag("posts")
        clock.advance(0.001)
        served = await engine.get("/blog/1", page, policy)
        assert served.status is CacheStatus.MISS and served.entry.body == f"render {n}".encode()


# -- revalidate(path): regenerate now ---------------------------------------------------


@pytest.fixture
def blog_site(engine, page_factory):
    """A path resolver like the site's: every /blog/<id> is a page (fallback 'blocking')."""
    pages: dict[str, object] = {}

    async def resolve(key: str):
        parts = key.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "blog":
            return None
        page = pages.setdefault(key, page_factory())
        return key, page, blog_policy(key)

    engine.add_resolver(resolve)
    return pages


async def test_S30_revalidate_returns_after_the_new_page_is_stored(engine, blog_site):
    served = await engine.get("/blog/1", *(await engine.resolve("/blog/1"))[1:])
    assert served.entry.body == b"render 1"
    await revalidate("/blog/1")
    stored = await engine.inspect("/blog/1")
    assert stored is not None and stored.body == b"render 2"
    served = await engine.get("/blog/1", *(await engine.resolve("/blog/1"))[1:])
    assert served.status is CacheStatus.HIT and served.entry.body == b"render 2"


async def test_S31_revalidate_generates_a_path_never_visited(engine, blog_site):
    await revalidate("/blog/77")
    _, render, policy = await engine.resolve("/blog/77")
    served = await engine.get("/blog/77", render, policy)
    assert served.status is CacheStatus.HIT and served.entry.body == b"render 1"


async def test_revalidate_normalises_the_path(engine, blog_site):
    await revalidate("/blog/%E3%81%82/")
    assert (await engine.inspect("/blog/あ")).body == b"render 1"


async def test_S33_revalidate_of_no_page_raises(engine, blog_site):
    with pytest.raises(RevalidationError, match=r"^Failed to revalidate /does-not-exist: .*404"):
        await revalidate("/does-not-exist")


async def test_S34_revalidate_needs_a_leading_slash(engine, blog_site):
    with pytest.raises(ValueError, match=r"'blog/1'.*e\.g\. '/blog/post-1'"):
        await revalidate("blog/1")


async def test_S36_revalidate_failure_keeps_the_old_page(engine, blog_site):
    _, render, policy = await engine.resolve("/blog/1")
    await engine.get("/blog/1", render, policy)
    render.fail = RuntimeError("db down")
    with pytest.raises(RevalidationError, match=r"^Failed to revalidate /blog/1: db down"):
        await revalidate("/blog/1")
    assert (await engine.get("/blog/1", render, policy)).entry.body == b"render 1"


async def test_revalidate_without_a_site_is_a_clear_error(engine):
    assert not engine.has_resolvers
    with pytest.raises(RevalidationError, match=r"^Failed to revalidate /blog/1: no site is registered"):
        await revalidate("/blog/1")


def test_revalidate_sync_from_a_script(sync_engine, page_factory):
    page = page_factory()

    async def resolve(key: str):
        return (key, page, blog_policy(key)) if key == "/blog/1" else None

    sync_engine.add_resolver(resolve)
    revalidate_sync("/blog/1")
    revalidate_sync("/blog/1")
    assert run_sync(sync_engine.inspect("/blog/1")).body == b"render 2"
    with pytest.raises(RevalidationError, match="^Failed to revalidate /nope:"):
        revalidate_sync("/nope")


def test_revalidate_sync_without_a_site(sync_engine):
    with pytest.raises(RevalidationError, match="no site is registered"):
        revalidate_sync("/blog/1")
