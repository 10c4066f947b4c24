"""What the engine counts and records as it works (pyisr.events, pyisr.provenance).

Operators read these numbers and records to answer "why is this page stale?" and to
alert: an answer, a regeneration or an invalidation that is not counted, or counted
under a raw path instead of its route, makes them lie. On the fake clock of conftest.py.
"""

from __future__ import annotations

import asyncio
import textwrap
import threading
from pathlib import Path

import httpx
import pytest
from conftest import FakeClock, Page

from pyisr import Engine, MemoryCache, Rendered, RenderPolicy, invalidated_by, revalidate_tag
from pyisr.cache.entry import EntryKind
from pyisr.config import Config
from pyisr.events import Delta
from pyisr.integrations import FailedResponse, serve_page
from pyisr.server.app import App
from pyisr.site_store import open_site_cache

POST = RenderPolicy(revalidate=10, route="/blog/[id]", tags=("posts",))


async def test_regenerations_are_counted_by_route_and_result(engine: Engine, clock: FakeClock) -> None:
    page = Page()
    for key in ("/blog/1", "/blog/2"):
        await engine.get(key, page, POST)  # MISS each
    await engine.get("/blog/1", page, POST)  # HIT
    clock.advance(11)
    await engine.get("/blog/1", page, POST)  # STALE
    await engine.drain()
    delta = engine.events.take()
    minutes = [counts for counts in delta.activity.minutes.values()]
    assert sum(m.get("regenerations", 0) for m in minutes) == 3  # two MISS renders, one background
    results = [(r.route, r.result) for r in delta.regenerations]
    assert results == [("/blog/[id]", "ok")] * 3
    assert all(r.seconds >= 0 for r in delta.regenerations)
    assert engine.events.take().regenerations == []  # taken once


async def test_data_renders_are_labelled_data(engine: Engine) -> None:
    data = RenderPolicy(kind=EntryKind.DATA, revalidate=10)
    await engine.get("data:x", lambda: Rendered("1"), data)
    delta = engine.events.take()
    assert delta.requests == {}  # a data read answers nobody
    assert [(r.route, r.result) for r in delta.regenerations] == [("data", "ok")]


async def test_a_failed_regeneration_is_counted_as_a_failure(engine: Engine, clock: FakeClock) -> None:
    page = Page()
    await engine.get("/blog/1", page, POST)
    page.fail = RuntimeError("database down")
    clock.advance(11)
    await engine.get("/blog/1", page, POST)
    await engine.drain()
    delta = engine.events.take()
    assert [r.result for r in delta.regenerations] == ["ok", "failed"]
    assert sum(m.get("failures", 0) for m in delta.activity.minutes.values()) == 1


async def test_an_unlabelled_invalidation_names_the_calling_code(engine: Engine, clock: FakeClock) -> None:
    await engine.revalidate_tag("posts")
    line = test_an_unlabelled_invalidation_names_the_calling_code.__code__.co_firstlineno + 1
    [record] = (await engine.handler.activity(clock())).invalidations
    assert (record.kind, record.target, record.tags, record.at) == ("tag", "posts", ("posts",), clock())
    assert record.by == f"code at tests/test_events.py:{line}"
    assert engine.events.take().invalidations == {"tag": 1}


async def test_a_label_says_who_asked(engine: Engine, clock: FakeClock) -> None:
    with invalidated_by("nightly import"):
        await engine.revalidate_path("/blog/[id]", "page")
        await engine.revalidate_path("/blog", "layout")
        await engine.revalidate_path("/blog/1")
        await engine.revalidate_tag("posts", stale=True)
    records = (await engine.handler.activity(clock())).invalidations
    assert [(r.kind, r.target, r.stale, r.by) for r in records] == [
        ("tag", "posts", True, "nightly import"),  # newest first
        ("path", "/blog/1", False, "nightly import"),
        ("layout", "/blog", False, "nightly import"),
        ("page", "/blog/[id]", False, "nightly import"),
    ]


def test_the_sync_form_names_its_caller_though_the_engine_runs_elsewhere(sync_engine: Engine) -> None:
    """``revalidate_tag`` from a worker thread runs the engine on another loop: the record
    must still name the code that called it, not pyisr's or asyncio's frames."""
    seen: list[int] = []

    def worker() -> None:
        seen.append(threading.current_thread().ident or 0)
        revalidate_tag("posts")

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    from pyisr.runtime import run_sync

    [record] = run_sync(sync_engine.handler.activity(sync_engine.clock())).invalidations
    assert record.by.startswith("code at tests/test_events.py:")


async def test_regenerating_now_is_recorded(engine: Engine, clock: FakeClock) -> None:
    await engine.revalidate_now("/blog/1", Page(), POST, by="pyisr revalidate")
    [record] = (await engine.handler.activity(clock())).invalidations
    assert (record.kind, record.target, record.by) == ("regenerate", "/blog/1", "pyisr revalidate")


async def test_store_failures_are_counted_by_operation(clock: FakeClock) -> None:
    class ReadOnly(MemoryCache):
        async def set(self, entry: object) -> bool:  # type: ignore[override]
            raise OSError(30, "Read-only file system")

    engine = Engine(ReadOnly(), clock=clock)
    served = await engine.get("/blog/1", Page(), POST)
    assert served.entry is not None  # answered all the same
    delta = engine.events.take()
    assert delta.store_errors == {"set": 1}
    assert [r.result for r in delta.regenerations] == ["unstored"]


async def test_a_failing_sink_does_not_stop_the_report(engine: Engine, clock: FakeClock) -> None:
    class Broken:
        def report(self, delta: Delta) -> None:
            raise RuntimeError("metrics are down")

    seen: list[Delta] = []

    class Recording:
        def report(self, delta: Delta) -> None:
            seen.append(delta)

    engine.events.sinks += [Broken(), Recording()]
    engine.events.served("/blog/1", "/blog/[id]", "MISS")
    engine.events.served("/blog/1", "/blog/[id]", "HIT")
    await engine.events.report()
    assert seen[0].requests == {("MISS", "/blog/[id]"): 1, ("HIT", "/blog/[id]"): 1}
    assert (await engine.handler.activity(clock())).hits == {"/blog/1": 1}


PAGE = """
revalidate = 60

def page(params):
    return "<p>post " + params["id"] + "</p>"
"""


@pytest.fixture
async def app(tmp_path: Path, clock: FakeClock) -> App:
    site = tmp_path / "site"
    (site / "app" / "blog" / "[id]").mkdir(parents=True)
    (site / "app" / "blog" / "[id]" / "page.py").write_text(textwrap.dedent(PAGE))
    config = Config()
    return App(site, config=config, engine=Engine(open_site_cache(site, config), clock=clock))


async def test_the_fast_path_hits_are_counted_under_their_route(app: App, clock: FakeClock) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for _ in range(5):
            assert (await client.get("/blog/1")).status_code == 200
        for _ in range(3):
            assert (await client.get("/blog/2")).status_code == 200
    assert len(app.fast.by_raw_path) == 2  # the later answers came from the fast path
    delta = app.engine.events.take()
    assert delta.requests == {("MISS", "/blog/[id]"): 2, ("HIT", "/blog/[id]"): 6}
    assert delta.activity.hits == {"/blog/1": 4, "/blog/2": 2}
    [minute] = delta.activity.minutes.values()
    assert (minute["hits"], minute["misses"]) == (6, 2)
    # Counted once: a second take finds nothing new.
    assert app.engine.events.take().requests == {}
    await app.engine.close()


async def test_counts_survive_the_fast_path_starting_over(app: App) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for _ in range(3):
            await client.get("/blog/1")
        app.fast.forget_all()  # what a full index or a retiring worker does
        await client.get("/blog/1")  # the full path: a HIT from the engine
    delta = app.engine.events.take()
    assert delta.requests == {("MISS", "/blog/[id]"): 1, ("HIT", "/blog/[id]"): 3}
    await app.engine.close()


async def test_the_server_reports_to_the_store_on_a_timer(tmp_path: Path, clock: FakeClock) -> None:
    site = tmp_path / "site"
    (site / "app" / "blog" / "[id]").mkdir(parents=True)
    (site / "app" / "blog" / "[id]" / "page.py").write_text(textwrap.dedent(PAGE))
    config = Config()
    engine = Engine(open_site_cache(site, config), clock=clock)
    engine.events.report_every = 0.05
    app = App(site, config=config, engine=engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        await app.startup()
        for _ in range(4):
            await client.get("/blog/1")
        deadline = asyncio.get_running_loop().time() + 5
        while (await engine.handler.activity(clock())).hits.get("/blog/1") != 3:
            assert asyncio.get_running_loop().time() < deadline, "the hits never reached the store"
            await asyncio.sleep(0.02)
    await app.shutdown()


async def test_the_integrations_count_their_answers(engine: Engine) -> None:
    """Every integration answers through ``serve_page``: its answers are counted there."""
    policy = RenderPolicy(revalidate=60, route="post_detail")
    for _ in range(3):
        await serve_page(engine, "/posts/1", Page(), policy, FailedResponse(), if_none_match=None, head=False)
    assert engine.events.take().requests == {("MISS", "post_detail"): 1, ("HIT", "post_detail"): 2}
