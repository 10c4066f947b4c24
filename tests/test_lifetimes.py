"""Lifetimes: ``expire`` (never served after), named profiles, ``revalidate_tag(stale=True)``.

SPEC S-67, S-68, S-69 at the engine level on the fake clock, over every handler's tag
storage (memory, the file-system tag log, Redis with its pub/sub mirror), and over HTTP
in-process (the App on the fake clock, through httpx's ASGI transport).
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Counter, FakeClock
from redis_support import redis_py, redis_url, unique_prefix  # noqa: F401

from pyisr import lifetimes
from pyisr.cache.filesystem import FileSystemCache
from pyisr.cache.memory import MemoryCache
from pyisr.cache.tier import MemoryTier
from pyisr.config import ConfigError, load_config
from pyisr.data.cached import cached
from pyisr.engine import CacheStatus, Engine, Rendered, RenderPolicy
from pyisr.http import cache_control
from pyisr.lifetimes import Lifetime
from pyisr.runtime import set_engine
from pyisr.server.app import App
from pyisr.site.loader import SiteLoadError
from pyisr.site.site import Site

ONE_YEAR = 31_536_000


@pytest.fixture(autouse=True)
def builtin_profiles() -> Iterator[None]:
    """Each test starts, and leaves the process, with only the built-in profiles."""
    lifetimes.use()
    yield
    lifetimes.use()


class Renders:
    """A render callable that says how many times it ran."""

    def __init__(self, **rendered: Any) -> None:
        self.calls = 0
        self.rendered = rendered

    async def __call__(self) -> Rendered:
        self.calls += 1
        return Rendered(f"v{self.calls}", **self.rendered)


# -- expire (SPEC S-67) -----------------------------------------------------------------------


async def test_S67_an_entry_past_expire_is_never_served(engine: Engine, clock: FakeClock) -> None:
    render = Renders()
    policy = RenderPolicy(revalidate=2, expire=5)
    first = await engine.get("/life", render, policy)
    assert first.status is CacheStatus.MISS and first.entry is not None
    assert first.entry.expire == 5
    assert cache_control(first.entry.revalidate, first.entry.expire) == "s-maxage=2, stale-while-revalidate=3"

    clock.advance(3)  # stale: the old page at once, one background render makes a new entry
    stale = await engine.get("/life", render, policy)
    assert stale.status is CacheStatus.STALE and stale.entry is not None and stale.entry.body == b"v1"
    await engine.drain()
    clock.advance(0.5)
    fresh = await engine.get("/life", render, policy)
    assert fresh.status is CacheStatus.HIT and fresh.entry is not None and fresh.entry.body == b"v2"

    clock.advance(5.5)  # t=9: the entry made at t=3 is 6 s old, past its expire of 5
    expired = await engine.get("/life", render, policy)
    assert expired.status is CacheStatus.MISS, "an expired page must be rendered, blocking"
    assert expired.entry is not None and expired.entry.body == b"v3" and render.calls == 3


async def test_an_expired_entry_whose_render_fails_is_not_served(engine: Engine, clock: FakeClock) -> None:
    """Expire means never served after: unlike a stale page, it is not kept as last good."""
    policy = RenderPolicy(revalidate=1, expire=2)
    await engine.get("/gone", Renders(), policy)
    clock.advance(3)

    async def broken() -> Rendered:
        raise RuntimeError("backend down")

    with pytest.raises(RuntimeError, match="backend down"):
        await engine.get("/gone", broken, policy)


async def test_an_entry_revalidated_never_does_not_expire_unless_it_names_an_expire(
    engine: Engine, clock: FakeClock
) -> None:
    forever = await engine.get("/static", Renders(), RenderPolicy(revalidate=None))
    assert forever.entry is not None and forever.entry.expire is None
    assert cache_control(None, forever.entry.expire) == f"s-maxage={ONE_YEAR}"
    bounded = await engine.get("/bounded", Renders(), RenderPolicy(revalidate=None, expire=60))
    assert bounded.entry is not None and cache_control(None, bounded.entry.expire) == "s-maxage=60"
    clock.advance(61)
    assert (await engine.get("/static", Renders(), RenderPolicy(revalidate=None))).status is CacheStatus.HIT
    again = await engine.get("/bounded", Renders(), RenderPolicy(revalidate=None, expire=60))
    assert again.status is CacheStatus.MISS


async def test_the_site_default_expire_keeps_todays_header(engine: Engine) -> None:
    served = await engine.get("/isr", Renders(), RenderPolicy(revalidate=60))
    assert served.entry is not None and served.entry.expire == ONE_YEAR
    assert cache_control(60, served.entry.expire) == f"s-maxage=60, stale-while-revalidate={ONE_YEAR - 60}"
    lifetimes.use(default_expire=3600)
    shorter = await engine.get("/isr2", Renders(), RenderPolicy(revalidate=60))
    assert shorter.entry is not None and shorter.entry.expire == 3600


async def test_a_render_can_set_its_own_expire_and_profile(engine: Engine) -> None:
    """What a ``get_static_props`` result does: its revalidate (a number or a profile) and expire."""
    own = await engine.get("/own", Renders(revalidate=10, expire=100), RenderPolicy(revalidate=60))
    assert own.entry is not None and (own.entry.revalidate, own.entry.expire) == (10, 100)
    named = await engine.get("/named", Renders(revalidate="hours"), RenderPolicy(revalidate=60))
    assert named.entry is not None and (named.entry.revalidate, named.entry.expire) == (3600, 86400)


async def test_data_with_a_shorter_expire_shortens_the_page(
    engine: Engine, clock: FakeClock, counter: Counter
) -> None:
    def load() -> int:
        return counter.next()

    short = cached(load, ["short-lived"], revalidate=5, expire=30)

    async def page() -> Rendered:
        return Rendered(f"<p>{await short.aio()}</p>")

    served = await engine.get("/with-data", page, RenderPolicy(revalidate=60, expire=ONE_YEAR))
    assert served.entry is not None
    assert (served.entry.revalidate, served.entry.expire) == (5, 30)


async def test_the_fast_path_never_serves_an_expired_hot_page(tmp_path: Path, clock: FakeClock) -> None:
    site = make_site(tmp_path, {"app/forever/page.py": "revalidate = False\nexpire = 10\n" + PAGE})
    async with served(site, clock) as client:
        first = await client.get("/forever")
        assert first.headers["x-pyisr-cache"] == "MISS" and first.headers["cache-control"] == "s-maxage=10"
        assert (await client.get("/forever")).headers["x-pyisr-cache"] == "HIT"  # from the fast path
        clock.advance(11)
        assert (await client.get("/forever")).headers["x-pyisr-cache"] == "MISS"


# -- revalidate_tag(tag, stale=True) (SPEC S-68) -----------------------------------------------


@contextlib.asynccontextmanager
async def handler_named(name: str, tmp_path: Path, redis: str) -> AsyncIterator[Any]:
    if name == "memory":
        yield MemoryCache()
    elif name == "filesystem":
        yield MemoryTier(FileSystemCache(tmp_path / "cache"), 1 << 20)
    else:
        cache = redis_py().RedisCache.from_url(redis, prefix=unique_prefix())
        try:
            yield MemoryTier(cache, 1 << 20)
        finally:
            with contextlib.suppress(Exception):
                await cache.clear()
            await cache.close()


@pytest.mark.parametrize("store", ["memory", "filesystem", "redis"])
async def test_S68_a_tag_marked_stale_is_served_at_once_while_one_render_refreshes_it(
    store: str,
    tmp_path: Path,
    clock: FakeClock,
    redis_url: str,  # noqa: F811
) -> None:
    async with handler_named(store, tmp_path, redis_url) as handler:
        engine = Engine(handler, clock=clock, render_timeout=5.0)
        render = Renders(tags=["t1"])
        policy = RenderPolicy(revalidate=100)
        await engine.get("/at", render, policy)
        clock.advance(1)
        await engine.revalidate_tag("t1", stale=True)
        clock.advance(1)
        answers = [await engine.get("/at", render, policy) for _ in range(3)]
        assert [a.status for a in answers] == [CacheStatus.STALE] * 3
        assert all(a.entry is not None and a.entry.body == b"v1" for a in answers)
        await engine.drain()
        assert render.calls == 2, "one background render for every stale answer"
        clock.advance(1)
        new = await engine.get("/at", render, policy)
        assert new.status is CacheStatus.HIT and new.entry is not None and new.entry.body == b"v2"

        # The default is unchanged: the next request waits for a fresh render.
        await engine.revalidate_tag("t1")
        clock.advance(1)
        blocking = await engine.get("/at", render, policy)
        assert blocking.status is CacheStatus.MISS and blocking.entry is not None
        assert blocking.entry.body == b"v3"
        await engine.close()


async def test_a_stale_mark_reaches_data_read_by_a_page(
    engine: Engine, clock: FakeClock, counter: Counter
) -> None:
    """A data entry marked stale is refetched in the foreground while its page regenerates."""

    def load() -> int:
        return counter.next()

    data = cached(load, ["marked"], tags=["products"], revalidate=False)

    async def page() -> Rendered:
        return Rendered(f"<p>{await data.aio()}</p>")

    policy = RenderPolicy(revalidate=100)
    await engine.get("/products", page, policy)
    clock.advance(1)
    await engine.revalidate_tag("products", stale=True)
    clock.advance(1)
    stale = await engine.get("/products", page, policy)
    assert stale.status is CacheStatus.STALE and stale.entry is not None and stale.entry.body == b"<p>1</p>"
    await engine.drain()
    fresh = await engine.get("/products", page, policy)
    assert fresh.status is CacheStatus.HIT and fresh.entry is not None and fresh.entry.body == b"<p>2</p>"


async def test_revalidate_endpoint_and_functions_take_stale(tmp_path: Path, clock: FakeClock) -> None:
    site = make_site(
        tmp_path,
        {
            "app/tagged/page.py": "revalidate = 100\ntags = ['t1']\n" + PAGE,
            "pyisr.toml": 'revalidate_secret = "s3cret"\n',
        },
    )
    async with served(site, clock) as client:
        first = await client.get("/tagged")
        auth = {"authorization": "Bearer s3cret"}
        bad = await client.post("/_pyisr/revalidate", params={"tag": "t1", "stale": "maybe"}, headers=auth)
        assert bad.status_code == 400
        clock.advance(1)
        marked = await client.post("/_pyisr/revalidate", json={"tag": "t1", "stale": True}, headers=auth)
        assert marked.status_code == 200
        clock.advance(1)
        stale = await client.get("/tagged")
        assert stale.headers["x-pyisr-cache"] == "STALE" and stale.text == first.text
        assert stale.headers["cache-status"] == "pyisr; hit; fwd=stale; detail=revalidating"
        await app_of(client).engine.drain()
        fresh = await client.get("/tagged")
        assert fresh.headers["x-pyisr-cache"] == "HIT" and fresh.text != first.text

        # revalidate_path(type="page", stale) marks a whole route the same way.
        clock.advance(1)
        await client.post("/_pyisr/revalidate?path=/tagged&type=page&stale=max", headers=auth)
        clock.advance(1)
        assert (await client.get("/tagged")).headers["x-pyisr-cache"] == "STALE"


# -- profiles (SPEC S-69) ------------------------------------------------------------------------


def test_profiles_from_pyisr_toml(tmp_path: Path) -> None:
    (tmp_path / "pyisr.toml").write_text(
        "expire = 7200\n[profiles.hourly]\nrevalidate = 3600\nexpire = 86400\n"
    )
    config = load_config(tmp_path)
    assert config.profiles == {"hourly": Lifetime(3600, 86400)} and config.expire == 7200
    lifetimes.use_config(config)
    assert lifetimes.parse("hourly") == Lifetime(3600, 86400)
    assert lifetimes.parse("hourly", 90000) == Lifetime(3600, 90000)  # an explicit expire wins
    assert lifetimes.parse("days") == Lifetime(86400, 604800)  # the built-in ones stay


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[profiles.hourly]\nrevalidate = 3600\nexpire = 60\n", "shorter than revalidate"),
        ("[profiles.hourly]\nexpire = 60\n", "needs revalidate"),
        ("[profiles.hourly]\nrevalidate = 60\nstale = 1\n", "unknown keys"),
        ("expire = 0\n", "expire"),
    ],
)
def test_bad_profiles_name_the_file_and_key(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "pyisr.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(tmp_path)
    assert str(tmp_path / "pyisr.toml") in str(caught.value)


async def test_S69_a_page_names_a_profile(tmp_path: Path, clock: FakeClock) -> None:
    site = make_site(
        tmp_path,
        {
            "pyisr.toml": "[profiles.hourly]\nrevalidate = 3600\nexpire = 86400\n",
            "app/news/page.py": 'revalidate = "hourly"\n' + PAGE,
        },
    )
    async with served(site, clock) as client:
        response = await client.get("/news")
    assert response.headers["cache-control"] == "s-maxage=3600, stale-while-revalidate=82800"


def test_S69_an_unknown_profile_fails_the_load_naming_file_name_and_known_profiles(tmp_path: Path) -> None:
    site = make_site(
        tmp_path,
        {
            "pyisr.toml": "[profiles.hourly]\nrevalidate = 3600\nexpire = 86400\n",
            "app/news/page.py": 'revalidate = "hourlly"\n' + PAGE,
        },
    )
    with pytest.raises(SiteLoadError) as caught:
        Site.load(site)
    text = str(caught.value)
    assert "app/news/page.py" in text and "'hourlly'" in text and "hourly" in text and "minutes" in text


def test_a_number_in_quotes_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="without quotes"):
        cached(lambda: 1, ["q"], revalidate="60")  # type: ignore[arg-type]


async def test_get_static_props_returns_a_profile_and_an_expire(tmp_path: Path, clock: FakeClock) -> None:
    site = make_site(
        tmp_path,
        {
            "pages/named.py": textwrap.dedent(
                """
                def get_static_props(params):
                    return {"props": {}, "revalidate": "minutes"}

                def page(props):
                    return "<p>named</p>"
                """
            ),
            "pages/own.py": textwrap.dedent(
                """
                def get_static_props(params):
                    return {"props": {}, "revalidate": 30, "expire": 90}

                def page(props):
                    return "<p>own</p>"
                """
            ),
            "pages/wrong.py": textwrap.dedent(
                """
                def get_static_props(params):
                    return {"props": {}, "revalidate": 30, "expire": 10}

                def page(props):
                    return "<p>wrong</p>"
                """
            ),
        },
    )
    async with served(site, clock) as client:
        named = await client.get("/named")
        own = await client.get("/own")
        wrong = await client.get("/wrong")
    assert named.headers["cache-control"] == "s-maxage=60, stale-while-revalidate=3540"
    assert own.headers["cache-control"] == "s-maxage=30, stale-while-revalidate=60"
    assert wrong.status_code == 500


# -- a small site served in-process on the fake clock -----------------------------------------

PAGE = textwrap.dedent(
    """
    import itertools
    _renders = itertools.count(1)

    def page(params):
        return f"<p>render {next(_renders)}</p>"
    """
)


def make_site(root: Path, files: dict[str, str]) -> Path:
    site = root / "site"
    for name, text in files.items():
        path = site / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (site / "app").mkdir(exist_ok=True)
    return site


_apps: dict[int, App] = {}


def app_of(client: httpx.AsyncClient) -> App:
    return _apps[id(client)]


@contextlib.asynccontextmanager
async def served(site: Path, clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    config = load_config(site)
    engine = Engine(MemoryCache(), clock=clock, render_timeout=5.0)
    app = App(site, config=config, engine=engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        _apps[id(client)] = app
        await app.startup()
        try:
            yield client
        finally:
            del _apps[id(client)]
            await app.shutdown()
            await engine.close()
            set_engine(None)
