"""Who invalidated what, kept by every store, and the sentences ``explain`` makes of it.

The record of invalidations, hits and minutes over the memory store, the file system
(two ``FileSystemCache`` objects on one directory: two processes) and Redis (two
clients: two instances), bounded whatever is written, and read back defensively; the
``by`` labels of the endpoint, the CLI, code and SQLAlchemy (Django's are in
test_django_integration.py, with its project); ``pyisr.explain`` per state on the
fake clock.
"""

from __future__ import annotations

import contextlib
import json
import socket
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import FakeClock
from redis_support import redis_py, redis_url, unique_prefix  # noqa: F401
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from pyisr.cache import activity as activity_module
from pyisr.cache import redis_activity
from pyisr.cache.activity import MAX_INVALIDATIONS, ActivityReport, Invalidation, minute_of
from pyisr.cache.filesystem import FileSystemCache
from pyisr.cache.fs_activity import COUNTS_FILE, INVALIDATIONS_FILE
from pyisr.cache.fs_layout import regeneration_lock_path
from pyisr.cache.handler import CacheHandler
from pyisr.cache.memory import MemoryCache
from pyisr.cache.tags import implicit_tags
from pyisr.cli import REVALIDATE_BY, main
from pyisr.config import Config
from pyisr.engine import Engine
from pyisr.explain import EntryState, clock_time, entry_state, explain, list_rows
from pyisr.provenance import invalidated_by
from pyisr.render import Rendered, RenderPolicy
from pyisr.runtime import run_sync
from pyisr.server.app import App
from pyisr.site_store import open_site_cache

RedisCache = redis_py().RedisCache


def inv(at: float, target: str = "posts", by: str = "test", **kw: Any) -> Invalidation:
    return Invalidation(at, kw.pop("kind", "tag"), target, kw.pop("tags", (target,)), by, **kw)


# -- the stores: one record, shared, bounded --------------------------------------------------------


@pytest.fixture
async def fs_pair(tmp_path: Path) -> AsyncIterator[tuple[FileSystemCache, FileSystemCache]]:
    """Two processes' handlers on one directory."""
    a, b = FileSystemCache(tmp_path / "c", fsync=False), FileSystemCache(tmp_path / "c", fsync=False)
    yield a, b
    await a.close()
    await b.close()


@pytest.fixture
async def redis_pair(redis_url: str) -> AsyncIterator[tuple[Any, Any]]:  # noqa: F811
    """Two instances' handlers on one Redis namespace."""
    prefix = unique_prefix()
    a, b = RedisCache(redis_url, prefix=prefix), RedisCache(redis_url, prefix=prefix)
    yield a, b
    with contextlib.suppress(Exception):
        await a.clear()
    await a.close()
    await b.close()


@pytest.fixture(params=["filesystem", "redis"])
def pair(request: pytest.FixtureRequest) -> tuple[CacheHandler, CacheHandler]:
    return request.getfixturevalue("fs_pair" if request.param == "filesystem" else "redis_pair")


async def test_an_invalidation_recorded_by_one_process_is_read_by_another(
    pair: tuple[CacheHandler, CacheHandler],
) -> None:
    a, b = pair
    now = time.time()
    await a.record_invalidation(inv(now - 2, "posts", "POST /_pyisr/revalidate from 10.0.0.7"))
    await b.record_invalidation(inv(now - 1, "/blog/1", "pyisr cache purge (CLI)", kind="path", tags=("x",)))
    for handler in (a, b):
        found = (await handler.activity(now)).invalidations
        assert [(i.target, i.by) for i in found] == [
            ("/blog/1", "pyisr cache purge (CLI)"),
            ("posts", "POST /_pyisr/revalidate from 10.0.0.7"),
        ], "newest first, with who asked"
        assert found[1] == inv(now - 2, "posts", "POST /_pyisr/revalidate from 10.0.0.7")


async def test_the_ring_keeps_the_newest_invalidations_only(pair: tuple[CacheHandler, CacheHandler]) -> None:
    a, b = pair
    now = time.time()
    for i in range(2 * MAX_INVALIDATIONS + 7):
        await (a if i % 2 else b).record_invalidation(inv(now - 10_000 + i, f"t{i}"))
    found = (await b.activity(now)).invalidations
    assert len(found) == MAX_INVALIDATIONS
    assert (
        found[0].target == f"t{2 * MAX_INVALIDATIONS + 6}" and found[-1].target == f"t{MAX_INVALIDATIONS + 7}"
    )
    if isinstance(a, FileSystemCache):  # what stays on disk: at most two rings
        lines = (a.root / INVALIDATIONS_FILE).read_bytes().splitlines()
        assert MAX_INVALIDATIONS <= len(lines) <= 2 * MAX_INVALIDATIONS


async def test_hits_and_minutes_from_two_reporters_add_up(pair: tuple[CacheHandler, CacheHandler]) -> None:
    a, b = pair
    now = time.time()
    first, second = ActivityReport(), ActivityReport()
    first.hits.update({"/blog/1": 3, "/blog/2": 1})
    first.count(now, "hits", 4)
    second.hits.update({"/blog/1": 2})
    second.count(now, "hits", 2)
    second.count(now, "misses")
    await a.add_activity(first, now)
    await b.add_activity(second, now)
    seen = await a.activity(now)
    assert seen.hits == {"/blog/1": 5, "/blog/2": 1}
    assert seen.minutes[minute_of(now)] == {"hits": 6, "misses": 1}
    old = ActivityReport()
    old.count(now - 3 * 3600, "hits")  # hours ago: outside the record's hour
    await b.add_activity(old, now)
    assert list((await b.activity(now)).minutes) == [minute_of(now)]


async def test_hits_are_bounded(
    pair: tuple[CacheHandler, CacheHandler], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    monkeypatch.setattr(activity_module, "MAX_HIT_KEYS", 10)
    monkeypatch.setattr(redis_activity, "MAX_HIT_KEYS", 10)
    monkeypatch.setattr(activity_module.trim_hits, "__defaults__", (10,))
    now = time.time()
    for round_ in range(3):
        report = ActivityReport()
        report.hits.update({f"/p/{round_}-{i}": i + 1 for i in range(15)})
        await (a if round_ % 2 else b).add_activity(report, now)
    hits = (await a.activity(now)).hits
    assert len(hits) <= 2 * 10
    assert "/p/2-14" in hits, "the most requested stay"


async def test_a_regeneration_lock_is_seen_by_another_process(
    pair: tuple[CacheHandler, CacheHandler],
) -> None:
    a, b = pair
    assert await b.is_locked("/blog/1") is False
    if isinstance(b, FileSystemCache):
        assert not regeneration_lock_path(b.root, "/blog/1").exists(), "looking never makes a lock file"
    token = await a.acquire_lock("/blog/1", 30)
    assert token is not None
    assert await b.is_locked("/blog/1") is True
    assert await a.acquire_lock("/blog/1", 30) is None, "looking did not take it"
    await a.release_lock("/blog/1", token)
    assert await b.is_locked("/blog/1") is False


async def test_the_memory_store_keeps_its_own_record(clock: FakeClock) -> None:
    engine = Engine(MemoryCache(), clock=clock)
    await engine.revalidate_tag("posts", by="someone")
    [found] = (await engine.handler.activity(clock())).invalidations
    assert (found.kind, found.target, found.tags, found.by) == ("tag", "posts", ("posts",), "someone")
    await engine.close()


# -- the file system: what is on disk is data --------------------------------------------------------


async def test_corrupt_activity_files_are_skipped_never_raised(
    fs_pair: tuple[FileSystemCache, FileSystemCache],
) -> None:
    a, b = fs_pair
    now = time.time()
    await a.record_invalidation(inv(now - 1, "good-1"))
    log = a.root / INVALIDATIONS_FILE
    with log.open("ab") as f:  # noqa: ASYNC230 - a test writing a small file
        f.write(b"not json\n[1, 2]\n{}\n")
        f.write(b'{"at": "NaN", "kind": "tag", "target": "x", "tags": [], "by": ""}\n')
        f.write(b'{"at": 1, "kind": "tag", "target": "x", "tags": "abc", "by": ""}\n')
        f.write(b'{"at": 1e999, "kind": "tag", "target": "x", "tags": [], "by": ""}\n')
        f.write(b'{"__class__": "os.system", "at": 2, "kind": "tag", "target": "y", "tags": [1], "by": ""}\n')
        f.write(b'{"at": 1, "kind": "tag", "target": "half-writ')  # a killed writer's line
    await b.record_invalidation(inv(now, "good-2"))
    assert [i.target for i in (await a.activity(now)).invalidations] == ["good-2", "good-1"]

    (a.root / COUNTS_FILE).write_bytes(b"\x00garbage{")
    assert (await b.activity(now)).hits == {}
    report = ActivityReport(hits={"/x": 2})
    await a.add_activity(report, now)  # starts over from a corrupt file
    assert (await b.activity(now)).hits == {"/x": 2}
    (a.root / COUNTS_FILE).write_text(
        json.dumps({"hits": {"/x": "7", "/y": -1, "/z": True, "/ok": 4}, "minutes": {"x": {}, "5": []}})
    )
    seen = await b.activity(now)
    assert seen.hits == {"/ok": 4} and seen.minutes == {}


async def test_activity_files_are_counted_by_the_cap_and_never_evicted(tmp_path: Path) -> None:
    cache = FileSystemCache(tmp_path / "c", fsync=False, max_bytes=10_000_000)
    try:
        assert not (cache.root / INVALIDATIONS_FILE).exists(), "made at the first record, not before"
        cache.budget.scan()
        before = cache.budget.total
        for i in range(50):
            await cache.record_invalidation(inv(time.time(), f"tag-{i}" * 20))
        await cache.add_activity(ActivityReport(hits={f"/p/{i}": i for i in range(500)}), time.time())
        on_disk = sum((cache.root / n).stat().st_blocks * 512 for n in (INVALIDATIONS_FILE, COUNTS_FILE))
        assert cache.budget.total - before == on_disk, "counted as they grow"
        cache.budget.scan()
        assert cache.budget.total - before == on_disk, "and by a scan"
        assert cache.budget.describe()["entries"] == 0, "not entries"
        assert [k async for k in cache.keys()] == []
        await cache.evict()
        assert (cache.root / INVALIDATIONS_FILE).exists() and (cache.root / COUNTS_FILE).exists()
    finally:
        await cache.close()


# -- Redis: shared, bounded, and never failing a request -------------------------------------------


async def test_redis_keys_of_the_record_expire_and_are_cleared(redis_pair: tuple[Any, Any]) -> None:
    a, _ = redis_pair
    now = time.time()
    await a.record_invalidation(inv(now))
    report = ActivityReport(hits={"/x": 1})
    report.count(now, "hits")
    await a.add_activity(report, now)
    keys = a._activity_keys
    client = a._state().client
    for name in (keys.invalidations_key, keys.hits_key, keys.minute_key(minute_of(now))):
        assert await client.pttl(name) > 0, name
    assert await client.pttl(keys.minute_key(minute_of(now))) <= redis_activity.MINUTE_TTL * 1000
    await a.clear()
    assert not await client.exists(keys.invalidations_key, keys.hits_key, keys.minute_key(minute_of(now)))


async def test_redis_down_records_locally_and_never_raises() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cache = RedisCache(f"redis://127.0.0.1:{port}/0", prefix=unique_prefix(), socket_timeout=0.2)
    try:
        now = time.time()
        await cache.record_invalidation(inv(now, "while-down"))
        await cache.add_activity(ActivityReport(hits={"/x": 1}), now)
        seen = await cache.activity(now)
        assert [i.target for i in seen.invalidations] == ["while-down"] and seen.hits == {"/x": 1}
        assert await cache.is_locked("/x") is None, "cannot tell"
        assert cache.degraded
    finally:
        await cache.close()


async def test_a_corrupt_redis_record_is_skipped(redis_pair: tuple[Any, Any]) -> None:
    a, b = redis_pair
    now = time.time()
    await a.record_invalidation(inv(now - 1, "good"))
    client = a._state().client
    await client.lpush(a._activity_keys.invalidations_key, b"{broken", b'{"at":"x"}')
    await client.hset(a._activity_keys.hits_key, mapping={"/ok": 3, "/bad": "lots"})
    seen = await b.activity(now)
    assert [i.target for i in seen.invalidations] == ["good"] and seen.hits == {"/ok": 3}


# -- who asked -------------------------------------------------------------------------------------

PAGE = """
revalidate = 60
tags = ["posts"]

def generate_static_params():
    return [{"id": "1"}]

def page(params):
    return "<p>post " + params["id"] + "</p>"
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    (root / "app" / "blog" / "[id]").mkdir(parents=True)
    (root / "app" / "blog" / "[id]" / "page.py").write_text(textwrap.dedent(PAGE))
    return root


async def test_the_endpoint_names_itself_the_client_and_the_cli(
    site: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config(revalidate_secret="s3cret")
    engine = Engine(open_site_cache(site, config), clock=clock)
    app = App(site, config=config, engine=engine)
    auth = {"authorization": "Bearer s3cret"}
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        await app.startup()
        assert (await client.get("/blog/1")).status_code == 200
        clock.advance(1)
        answer = await client.post("/_pyisr/revalidate", params={"tag": "posts"}, headers=auth)
        assert answer.status_code == 200, answer.text
        clock.advance(1)
        # What `pyisr revalidate` sends (below): its name, next to the address.
        headers = {**auth, "x-pyisr-by": REVALIDATE_BY + "\x1b[31m"}
        answer = await client.post(
            "/_pyisr/revalidate", params={"path": "/blog/[id]", "type": "page"}, headers=headers
        )
        assert answer.status_code == 200, answer.text
        found = (await engine.handler.activity(clock())).invalidations
        assert [(i.kind, i.target, i.by) for i in found] == [
            ("page", "/blog/[id]", "pyisr revalidate (CLI)[31m via POST /_pyisr/revalidate from 10.1.2.3"),
            ("tag", "posts", "POST /_pyisr/revalidate from 10.1.2.3"),
        ]
        why = await explain(engine.handler, "/blog/1", clock())
        assert why.state is EntryState.INVALIDATED
        assert (
            "tag `posts` was revalidated at" in why.text
            and "by POST /_pyisr/revalidate from 10.1.2.3" in why.text
        )
    await app.shutdown()


def test_pyisr_revalidate_names_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, str]] = []

    def post(url: str, **kwargs: Any) -> httpx.Response:
        sent.append(kwargs["headers"])
        return httpx.Response(200, text='{"revalidated": true}')

    monkeypatch.setattr(httpx, "post", post)
    result = CliRunner().invoke(main, ["revalidate", "--tag", "posts", "--secret", "s"])
    assert result.exit_code == 0, result.output
    assert sent[0]["x-pyisr-by"] == "pyisr revalidate (CLI)"


async def test_plain_code_is_named_by_file_and_line(engine: Engine, clock: FakeClock) -> None:
    line = _line() + 1
    await engine.revalidate_tag("posts")
    with invalidated_by("nightly job"):
        await engine.revalidate_path("/blog/1")
    found = (await engine.handler.activity(clock())).invalidations
    assert [i.by for i in found] == ["nightly job", f"code at tests/test_provenance.py:{line}"]


def _line() -> int:
    import sys

    return sys._getframe(1).f_lineno


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(default="")


def test_a_sqlalchemy_commit_names_its_tables(tmp_path: Path, sync_engine: Engine, clock: FakeClock) -> None:
    from pyisr.integrations.sqlalchemy import revalidate_table, track

    db = sa.create_engine(f"sqlite:///{tmp_path / 'notes.db'}")
    Base.metadata.create_all(db)
    sessions = track(sessionmaker(db))
    with sessions() as session:
        session.add(Note(id=1, text="a"))
        session.commit()
    line = _line() + 1
    revalidate_table("notes")
    found = run_sync(sync_engine.handler.activity(clock())).invalidations
    assert [(i.tags, i.by) for i in found] == [
        (("notes", "notes:*"), f"code at tests/test_provenance.py:{line}"),
        (("notes", "notes:1"), "SQLAlchemy commit notes"),
    ]
    db.dispose()


# -- explain, state by state, on the fake clock ------------------------------------------------------


class Page:
    def __init__(self) -> None:
        self.fail: BaseException | None = None

    async def __call__(self) -> Rendered:
        if self.fail is not None:
            raise self.fail
        return Rendered("<p>post</p>")


POLICY = RenderPolicy(
    revalidate=60, expire=3600, tags=("posts", *implicit_tags("/blog/1", "/blog/[id]")), route="/blog/[id]"
)


@pytest.fixture
async def served(clock: FakeClock) -> AsyncIterator[tuple[Engine, Page]]:
    engine = Engine(MemoryCache(), clock=clock, render_timeout=2.0)
    page = Page()
    await engine.get("/blog/1", page, POLICY)
    yield engine, page
    await engine.drain()
    await engine.close()


async def sentences(engine: Engine, clock: FakeClock) -> tuple[EntryState | None, str]:
    why = await explain(engine.handler, "/blog/1", clock())
    return why.state, why.text


async def test_explain_fresh(served: tuple[Engine, Page], clock: FakeClock) -> None:
    engine, _ = served
    rendered = clock()
    clock.advance(20)
    state, text = await sentences(engine, clock)
    assert state is EntryState.FRESH
    assert text.startswith(f"Fresh until {clock_time(rendered + 60, clock())} (in 40 s): rendered at")
    assert f"It expires at {clock_time(rendered + 3600, clock())}" in text


async def test_explain_stale_by_time_and_failing(served: tuple[Engine, Page], clock: FakeClock) -> None:
    engine, page = served
    rendered = clock()
    clock.advance(120)
    state, text = await sentences(engine, clock)
    assert state is EntryState.STALE
    assert text.startswith(
        f"Stale since {clock_time(rendered + 60, clock())} (60 s ago): its revalidate window of 60 s ended."
    )
    assert f"Served meanwhile: the page rendered at {clock_time(rendered, clock())} (2 min ago)." in text
    page.fail = ConnectionError("the database went away")
    for _ in range(3):
        await engine.get("/blog/1", page, POLICY)  # STALE, and a background regeneration that fails
        await engine.drain()
        clock.advance(31)
    clock.advance(-25)
    state, text = await sentences(engine, clock)
    assert state is EntryState.FAILING
    assert "(ConnectionError: the database went away, 3rd in a row); next try at" in text
    assert "(in 24 s)" in text and "Served meanwhile: the page rendered at" in text


async def test_explain_marked_stale_invalidated_and_forgotten(
    served: tuple[Engine, Page], clock: FakeClock
) -> None:
    engine, _ = served
    clock.advance(5)
    await engine.revalidate_tag("posts", stale=True, by="POST /_pyisr/revalidate from 127.0.0.1")
    state, text = await sentences(engine, clock)
    assert state is EntryState.STALE
    assert text.startswith(
        f"Stale since {clock_time(clock(), clock())} (just now): tag `posts` was marked stale at "
        f"{clock_time(clock(), clock())} by POST /_pyisr/revalidate from 127.0.0.1."
    )
    clock.advance(5)
    await engine.revalidate_path("/blog/[id]", "page", by="pyisr revalidate (CLI)")
    clock.advance(5)
    await engine.revalidate_tag("posts", by="Django post_save blog.Post")
    clock.advance(60)
    state, text = await sentences(engine, clock)
    assert state is EntryState.INVALIDATED
    assert text.startswith(
        f"Invalidated since {clock_time(clock() - 65, clock())} (65 s ago): "
        "every page of /blog/[id] was revalidated"
    )
    assert (
        "by pyisr revalidate (CLI), and 1 more time since" in text
        and "by Django post_save blog.Post)" in text
    )
    assert "The next request waits for a fresh render" in text
    # The ring no longer holds them (another store's record, or 500 newer ones): said so.
    engine.handler.__dict__.pop("_pyisr_activity")
    state, text = await sentences(engine, clock)
    assert state is EntryState.INVALIDATED
    assert "was revalidated at" in text and "who asked is no longer in the store's record" in text


async def test_explain_expired_regenerating_and_not_cached(
    served: tuple[Engine, Page], clock: FakeClock
) -> None:
    engine, _ = served
    clock.advance(4000)
    state, text = await sentences(engine, clock)
    assert state is EntryState.EXPIRED
    assert text.startswith("Expired at") and "it is never served again" in text
    token = await engine.handler.acquire_lock("/blog/1", 30)
    assert "A regeneration is running now." in (await explain(engine.handler, "/blog/1", clock())).text
    assert token is not None
    await engine.handler.release_lock("/blog/1", token)
    nothing = await explain(engine.handler, "/blog/2", clock())
    assert nothing.state is None and nothing.row is None
    assert (
        nothing.text.startswith("Nothing is cached for /blog/2.")
        and "If a route matches this path" in nothing.text
    )
    data = await explain(engine.handler, "data:" + "ab" * 32, clock())
    assert "It is a data key" in data.text
    assert json.loads(json.dumps(data.to_json()))["cached"] is False


async def test_entry_state_follows_the_engine_rules(served: tuple[Engine, Page], clock: FakeClock) -> None:
    engine, _ = served
    entry = await engine.handler.get("/blog/1")
    assert entry is not None
    t = clock()
    assert entry_state(entry, {}, t) is EntryState.FRESH
    assert entry_state(entry, {}, t + 60) is EntryState.STALE
    assert entry_state(entry, {"posts": t}, t + 1) is EntryState.INVALIDATED
    assert entry_state(entry, {"posts": t - 1}, t + 1) is EntryState.FRESH, "revalidated before the render"
    assert entry_state(entry, {"_pyisr:stale:posts": t}, t + 1) is EntryState.STALE
    assert entry_state(entry, {"posts": t}, t + 3600) is EntryState.EXPIRED, "expired wins"


async def test_list_rows_filters_sorts_and_counts_hits(clock: FakeClock) -> None:
    engine = Engine(MemoryCache(), clock=clock)
    for i in (1, 2, 3):
        policy = RenderPolicy(
            revalidate=60, tags=(f"post-{i}", *implicit_tags(f"/blog/{i}", "/blog/[id]")), route="/blog/[id]"
        )
        await engine.get(f"/blog/{i}", Page(), policy)
        clock.advance(10)
    await engine.get("/about", Page(), RenderPolicy(revalidate=None, tags=implicit_tags("/about", "/about")))
    await engine.handler.add_activity(ActivityReport(hits={"/blog/2": 9, "/about": 4}), clock())
    await engine.revalidate_tag("post-3")
    rows = await list_rows(engine.handler, clock(), sort="hits")
    assert [(r.key, r.hits) for r in rows] == [("/blog/2", 9), ("/about", 4), ("/blog/1", 0), ("/blog/3", 0)]
    assert [r.key for r in await list_rows(engine.handler, clock(), route="/blog/[id]", sort="key")] == [
        "/blog/1",
        "/blog/2",
        "/blog/3",
    ]
    assert [r.key for r in await list_rows(engine.handler, clock(), state="invalidated")] == ["/blog/3"]
    assert [r.key for r in await list_rows(engine.handler, clock(), tag="post-1")] == ["/blog/1"]
    assert [r.key for r in await list_rows(engine.handler, clock(), sort="age", limit=1)] == ["/blog/1"]
    assert [r.key for r in await list_rows(engine.handler, clock(), search="OUT")] == ["/about"]
    about = next(r for r in rows if r.key == "/about")
    assert (about.route, about.tags, about.revalidate) == ("/about", (), None)
    with pytest.raises(ValueError):
        await list_rows(engine.handler, clock(), sort="colour")
    await engine.close()
