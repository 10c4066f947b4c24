"""SPEC.md's HTTP contract in-process, on a fake clock: what needs no server process.

The time-based cases (stale after the window, background regeneration, failing
regenerations and their back-off, fallback pages rendered in the background) are the
engine and the App's HTTP answers. Here they run against the same sites as the
subprocess tests (tests/sites/spec and examples/blog, copied and built by ``pyisr
build``'s own code), served by :class:`pyisr.server.app.App` over its real
file-system cache through httpx's ASGI transport, with the engine on the fake clock
of conftest.py: a window passes with ``clock.advance`` and a background regeneration
is waited for with ``engine.drain()``, so no test sleeps.

What only a real ``pyisr start`` proves (both servers, real sockets, restarts, the
CLI, the example as a user runs it) stays in test_e2e_spec.py and test_e2e_blog.py.
The test names keep the SPEC case ids of those files.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import FakeClock
from e2e_support import DataServer, copy_site, counts, heading, rendered_at, run_cli, sql

from pyisr.build import build_site
from pyisr.config import load_config
from pyisr.engine import Engine
from pyisr.runtime import set_engine
from pyisr.server.app import App
from pyisr.site_store import open_site_cache

SPEC_SITE = Path(__file__).parent / "sites" / "spec"
BLOG_SITE = Path(__file__).resolve().parent.parent / "examples" / "blog"
SECRET = "spec-secret-123"
N = 2  # the spec site's revalidate window (SPEC_REVALIDATE)
ISR2 = f"s-maxage={N}, stale-while-revalidate={31536000 - N}"
FOREVER = "s-maxage=31536000"
NOSTORE = "private, no-cache, no-store, max-age=0, must-revalidate"
REVALIDATING = "pyisr; hit; fwd=stale; detail=revalidating"
FAILED_STALE = "pyisr; hit; fwd=stale; detail=regeneration-failed"

BLOG_WINDOW = 2  # BLOG_REVALIDATE: the blog's post pages' window
BLOG_SECRET = "blog-e2e-secret"


# -- serving a built site in-process -----------------------------------------------------


@contextmanager
def site_imports(*top_level: str) -> Iterator[None]:
    """Give a site its own copy of its helper modules (``_spec``, ``lib``), then restore.

    A site's folder goes on ``sys.path`` and its helpers are imported under their plain
    names, which read the environment (windows, paths) once, when first imported.
    """
    saved_path = list(sys.path)
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in top_level}
    for name in saved:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in [k for k in sys.modules if k.split(".")[0] in top_level]:
            del sys.modules[name]
        sys.modules.update(saved)


def build(site: Path, env: dict[str, str], helpers: str) -> float:
    """``pyisr build site`` in this process; returns the wall-clock time it finished."""
    with pytest.MonkeyPatch.context() as mp, site_imports(helpers):
        for name, value in env.items():
            mp.setenv(name, value)
        result = asyncio.run(build_site(site, load_config(site)))
    assert not result.errors, result.errors
    return time.time()


@dataclass
class Served:
    """A site served in-process: its App, a client, the fake clock and the cache log."""

    app: App
    client: httpx.AsyncClient
    clock: FakeClock
    root: Path
    log_stream: io.StringIO

    @property
    def site(self) -> Path:
        return self.root / "site"

    async def get(self, path: str, **kwargs: object) -> httpx.Response:
        return await self.client.get(path, **kwargs)  # type: ignore[arg-type]

    async def request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        return await self.client.request(method, path, **kwargs)  # type: ignore[arg-type]

    async def drain(self) -> None:
        """Wait for the background regenerations (what the subprocess tests slept for)."""
        await self.app.engine.drain()

    def log(self) -> str:
        return self.log_stream.getvalue()


@asynccontextmanager
async def serve(
    built: Path,
    built_at: float,
    tmp_path: Path,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    helpers: str,
) -> AsyncIterator[Served]:
    """A copy of the built folder ``built`` served by an App whose engine runs on ``clock``.

    The clock starts when the build finished, so prerendered pages are fresh at first.
    ``env`` may name paths inside the folder as ``{root}/...``.
    """
    root = tmp_path / "root"
    shutil.copytree(built, root)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(root=root))
    clock.now = built_at
    # The cache decisions and failures, as the server's log has them.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    cache_logger = logging.getLogger("pyisr.cache")
    with site_imports(helpers):
        site = root / "site"
        config = load_config(site)
        engine = Engine(
            open_site_cache(site, config),
            clock=clock,
            render_timeout=config.render_timeout,
            max_concurrent_renders=config.render_concurrency,
            debug=True,
        )
        cache_logger.addHandler(handler)
        app = App(site, config=config, engine=engine)
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://testserver"
            ) as client:
                await app.startup()
                yield Served(app, client, clock, root, stream)
        finally:
            cache_logger.removeHandler(handler)
            await app.engine.close()
            set_engine(None)


def stamp(response: httpx.Response) -> str:
    match = re.search(r"render=(\d+) at=([\d.]+)", response.text)
    assert match, response.text
    return match.group(0)


# -- the SPEC.md site ----------------------------------------------------------------------

SPEC_ENV = {
    "SPEC_COUNTS": "{root}/counts",
    "SPEC_FLAG": "{root}/flag",
    "SPEC_REVALIDATE": str(N),
    "SPEC_FETCH_REVALIDATE": "3",
    "PYISR_REVALIDATE_SECRET": SECRET,
    "PYISR_DEBUG_CACHE": "1",
}


@pytest.fixture(scope="module")
def spec_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """tests/sites/spec built once; each test serves its own copy (cache and render counts)."""
    root = tmp_path_factory.mktemp("spec-built")
    site = copy_site(SPEC_SITE, root / "site")
    env = {name: value.format(root=root) for name, value in SPEC_ENV.items()}
    with DataServer() as data:  # /af fetches it while prerendering
        built_at = build(site, {**env, "SPEC_DATA_URL": data.url}, "_spec")
    return root, built_at


@pytest.fixture
async def spec(
    spec_build: tuple[Path, float], tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Served]:
    built, built_at = spec_build
    async with serve(built, built_at, tmp_path, clock, monkeypatch, SPEC_ENV, "_spec") as served:
        yield served


def render_count(spec: Served, name: str) -> int:
    return counts(spec.root / "counts", name)


def flag(spec: Served) -> Path:
    return spec.root / "flag"


async def test_S01_S07_S09_S10_S28_S02_prerendered_page(spec: Served) -> None:
    first = await spec.get("/blog/1")
    assert first.status_code == 200
    assert first.headers["x-pyisr-cache"] == "HIT"
    assert first.headers["cache-control"] == ISR2
    assert "render=1" in first.text  # S-01: the build's render
    assert first.headers["etag"].startswith('"') and "age" in first.headers
    assert first.headers["cache-status"].startswith("pyisr; hit")
    # S-07: HEAD has the same headers and no body.
    head = await spec.request("HEAD", "/blog/1")
    assert head.status_code == 200 and head.content == b""
    for name in ("etag", "content-length", "cache-control", "x-pyisr-cache"):
        assert head.headers[name] == first.headers[name]
    # S-09: 304 on If-None-Match.
    not_modified = await spec.get("/blog/1", headers={"if-none-match": first.headers["etag"]})
    assert not_modified.status_code == 304 and not_modified.content == b""
    for name in ("etag", "cache-control", "x-pyisr-cache"):
        assert not_modified.headers[name] == first.headers[name]
    # S-10: a query string is the same entry.
    query = await spec.get("/blog/1?foo=bar")
    assert query.text == first.text and query.headers["etag"] == first.headers["etag"]
    # S-28: a client cannot bypass the server cache.
    no_cache = await spec.get("/blog/1", headers={"cache-control": "no-cache"})
    assert no_cache.headers["x-pyisr-cache"] == "HIT"
    # S-02: stale after the window: old body once, then the new one.
    spec.clock.advance(N + 0.3)
    stale = await spec.get("/blog/1")
    assert stale.headers["x-pyisr-cache"] == "STALE" and stamp(stale) == stamp(first)
    assert stale.headers["cache-status"] == "pyisr; hit; fwd=stale; detail=revalidating"
    assert int(stale.headers["age"]) >= N
    await spec.drain()
    fresh = await spec.get("/blog/1")
    assert fresh.headers["x-pyisr-cache"] == "HIT" and stamp(fresh) != stamp(first)
    assert fresh.headers["etag"] != first.headers["etag"] and fresh.headers["age"] == "0"
    assert render_count(spec, "blog/1") == 2  # the build's render and one regeneration


async def test_S02_stale_exactly_when_the_window_has_passed(spec: Served) -> None:
    rendered = spec.clock.now
    first = await spec.get("/blog/21")  # rendered now: its window starts at this clock time
    assert first.headers["x-pyisr-cache"] == "MISS"
    spec.clock.now = rendered + N - 0.01
    almost = await spec.get("/blog/21")
    assert almost.headers["x-pyisr-cache"] == "HIT" and stamp(almost) == stamp(first)
    assert almost.headers["age"] == str(N - 1)
    spec.clock.now = rendered + N
    stale = await spec.get("/blog/21")
    assert stale.headers["x-pyisr-cache"] == "STALE" and stamp(stale) == stamp(first)
    assert stale.headers["age"] == str(N)
    await spec.drain()
    assert render_count(spec, "blog/21") == 2


async def test_S06_concurrent_stale_reads_regenerate_once(spec: Served) -> None:
    old = await spec.get("/blog/slow4")
    spec.clock.advance(N + 0.3)
    responses = await asyncio.gather(*(spec.get("/blog/slow4") for _ in range(50)))
    assert {r.headers["x-pyisr-cache"] for r in responses} == {"STALE"}
    assert {stamp(r) for r in responses} == {stamp(old)}
    await spec.drain()
    new = await spec.get("/blog/slow4")
    assert new.headers["x-pyisr-cache"] == "HIT" and stamp(new) != stamp(old)
    assert render_count(spec, "blog/slow4") == 2


async def test_S08_head_on_a_stale_entry_starts_the_regeneration(spec: Served) -> None:
    old = await spec.get("/blog/8")
    spec.clock.advance(N + 0.3)
    head = await spec.request("HEAD", "/blog/8")
    assert head.headers["x-pyisr-cache"] == "STALE" and head.content == b""
    await spec.drain()
    new = await spec.get("/blog/8")
    assert new.headers["x-pyisr-cache"] == "HIT" and stamp(new) != stamp(old)


async def test_S15_S16_fallback_false(spec: Served) -> None:
    missing = await spec.get("/blogf/2")
    assert missing.status_code == 404 and missing.headers["cache-control"] == NOSTORE
    assert "x-pyisr-cache" not in missing.headers
    # S-16: the prerendered path follows the normal rules.
    assert (await spec.get("/api/reval?path=/blogf/1")).status_code == 200
    old = await spec.get("/blogf/1")
    assert old.headers["x-pyisr-cache"] == "HIT"
    spec.clock.advance(N + 0.3)
    assert (await spec.get("/blogf/1")).headers["x-pyisr-cache"] == "STALE"
    await spec.drain()
    new = await spec.get("/blogf/1")
    assert new.headers["x-pyisr-cache"] == "HIT" and stamp(new) != stamp(old)


async def test_S17_fallback_true_serves_the_shell_then_the_page(spec: Served) -> None:
    shell = await spec.get("/blogt/2")
    assert shell.status_code == 200 and shell.headers["x-pyisr-cache"] == "MISS"
    assert shell.headers["cache-control"] == NOSTORE
    assert "Loading..." in shell.text
    await spec.drain()
    real = await spec.get("/blogt/2")
    assert real.headers["x-pyisr-cache"] == "HIT" and "render=1" in real.text


async def test_S22_S23_failing_regeneration(spec: Served) -> None:
    old = await spec.get("/e/1")
    assert old.headers["x-pyisr-cache"] == "MISS"
    flag(spec).touch()
    spec.clock.advance(3.5)  # the page's window is 3 s
    stale = await spec.get("/e/1")
    assert stale.headers["x-pyisr-cache"] == "STALE" and stamp(stale) == stamp(old)
    await spec.drain()  # the background regeneration fails
    spec.clock.advance(0.7)
    kept = await spec.get("/e/1")  # in back-off: old, and said so; no new attempt
    assert kept.headers["x-pyisr-cache"] == "STALE" and stamp(kept) == stamp(old)
    assert kept.headers["cache-status"] == FAILED_STALE and kept.headers["age"] == "4"
    assert not spec.app.engine.regenerating("/e/1")
    assert render_count(spec, "e-fail/1") == 1
    spec.clock.advance(2.2)  # 2.9 s after the failure: still in its 3 s back-off
    within = await spec.get("/e/1")
    assert within.headers["x-pyisr-cache"] == "STALE" and within.headers["cache-status"] == FAILED_STALE
    assert within.headers["age"] == "6"
    assert render_count(spec, "e-fail/1") == 1
    spec.clock.advance(0.8)  # the back-off is over: the next request retries
    retry = await spec.get("/e/1")
    assert retry.headers["x-pyisr-cache"] == "STALE" and stamp(retry) == stamp(old)
    assert retry.headers["cache-status"] == REVALIDATING
    await spec.drain()
    assert render_count(spec, "e-fail/1") == 2
    assert spec.log().count("/e/1 FAILED") == 2  # each failure logged once, with the exception
    assert "RuntimeError: flag is on for 1" in spec.log()
    # S-63: the failure is visible through the inspection endpoint.
    info = (await spec.get("/_pyisr/cache?path=/e/1", headers={"authorization": f"Bearer {SECRET}"})).json()
    assert info["last_failure"]["count"] == 2 and info["last_failure"]["type"] == "RuntimeError"
    # S-23: the error goes away; after the back-off the page regenerates.
    flag(spec).unlink()
    spec.clock.advance(3.1)
    assert (await spec.get("/e/1")).headers["x-pyisr-cache"] == "STALE"
    await spec.drain()
    spec.clock.advance(0.7)
    new = await spec.get("/e/1")
    assert new.headers["x-pyisr-cache"] == "HIT" and stamp(new) != stamp(old)
    info = (await spec.get("/_pyisr/cache?path=/e/1", headers={"authorization": f"Bearer {SECRET}"})).json()
    assert info["last_failure"] is None and info["retry_at"] is None


async def test_S40_S41_S42_S43_app_pages(spec: Served) -> None:
    assert (await spec.get("/api/reval?path=/a/1")).status_code == 200
    first = await spec.get("/a/1")
    assert first.headers["x-pyisr-cache"] == "HIT" and first.headers["cache-control"] == ISR2
    assert (await spec.get("/a/2")).headers["x-pyisr-cache"] == "MISS"
    assert (await spec.get("/a/2")).headers["x-pyisr-cache"] == "HIT"
    strict = await spec.get("/an/2")
    assert strict.status_code == 404 and strict.headers["cache-control"] == NOSTORE
    home = await spec.get("/")
    assert home.headers["x-pyisr-cache"] == "HIT" and home.headers["cache-control"] == FOREVER
    spec.clock.advance(N + 0.3)
    assert (await spec.get("/a/1")).headers["x-pyisr-cache"] == "STALE"
    await spec.drain()
    new = await spec.get("/a/1")
    assert new.headers["x-pyisr-cache"] == "HIT" and stamp(new) != stamp(first)
    # S-13 / S-43: a page without revalidate is still a HIT, a year of time later.
    spec.clock.advance(365 * 86400)
    assert (await spec.get("/")).headers["x-pyisr-cache"] == "HIT"


async def test_S50_cached_route_handler(spec: Served) -> None:
    first = await spec.get("/rh")
    assert first.headers["content-type"].startswith("application/json")
    assert first.headers["cache-control"] == ISR2 and first.headers["x-pyisr-cache"] in ("HIT", "MISS")
    spec.clock.advance(N + 0.3)
    assert (await spec.get("/rh")).headers["x-pyisr-cache"] == "STALE"
    await spec.drain()
    again = await spec.get("/rh")
    assert again.headers["x-pyisr-cache"] == "HIT"
    assert again.json()["stamp"] != first.json()["stamp"]


# -- examples/blog, SQLite only ----------------------------------------------------------

BLOG_ENV = {
    "BLOG_DB": "{root}/blog.db",
    "BLOG_REVALIDATE": str(BLOG_WINDOW),
    "BLOG_API_URL": "",
    "MY_SECRET_TOKEN": BLOG_SECRET,
    "PYISR_DEBUG_CACHE": "1",
}


@pytest.fixture(scope="module")
def blog_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The example built once (its SQLite file created and seeded by the build)."""
    root = tmp_path_factory.mktemp("blog-built")
    site = copy_site(BLOG_SITE, root / "site")
    env = {name: value.format(root=root) for name, value in BLOG_ENV.items()}
    built_at = build(site, env, "lib")
    assert (root / "blog.db").is_file()
    return root, built_at


@pytest.fixture
async def blog(
    blog_build: tuple[Path, float], tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Served]:
    built, built_at = blog_build
    async with serve(built, built_at, tmp_path, clock, monkeypatch, BLOG_ENV, "lib") as served:
        yield served


async def test_blog_a_failing_regeneration_keeps_the_old_page_and_is_retried(blog: Served) -> None:
    """The database goes away: regenerating /posts/5 raises; readers keep the last good page."""
    db = blog.root / "blog.db"
    old = await blog.get("/posts/5")
    assert old.status_code == 200 and old.headers["x-pyisr-cache"] == "HIT"
    sql(db, "ALTER TABLE posts RENAME TO posts_offline")
    try:
        blog.clock.advance(BLOG_WINDOW + 0.2)
        stale = await blog.get("/posts/5")
        assert stale.headers["x-pyisr-cache"] == "STALE"
        assert stale.text == old.text
        await blog.drain()  # the background regeneration has failed by now
        kept = await blog.get("/posts/5")
        assert kept.status_code == 200 and kept.text == old.text
        assert re.search(r"^/posts/5 FAILED .*OperationalError: no such table: posts", blog.log(), re.M)
        # On-demand revalidation fails the same way: 500, and the old page stays.
        failed = await blog.get(f"/api/revalidate?secret={BLOG_SECRET}&path=/posts/5")
        assert failed.status_code == 500
        assert failed.text == "Error revalidating"
        assert (await blog.get("/posts/5")).text == old.text
        # A post page never generated has no last good version: the site's 500 page.
        assert (await blog.get("/posts/20")).status_code == 200  # prerendered by the build: still served
        never = await blog.get("/posts/40")
        assert never.status_code == 500 and never.headers["cache-control"] == NOSTORE
        assert "500: Something went wrong" in never.text
        # The failure is recorded on the entry, on disk.
        inspect = run_cli(["cache", "inspect", "/posts/5", "--json", "--site", str(blog.site)], {})
        assert inspect.returncode == 0, inspect.stdout + inspect.stderr
        info = json.loads(inspect.stdout)
        assert info["last_failure"] is not None and "no such table" in json.dumps(info["last_failure"])
        sql(db, "UPDATE posts_offline SET title = ? WHERE id = 5", "What Happens When a Render Succeeds")
    finally:
        sql(db, "ALTER TABLE posts_offline RENAME TO posts")
    # Within the back-off (clamp(window, 3, 30) s from the last failure): the old page, no attempt.
    blog.clock.advance(2.9)
    within = await blog.get("/posts/5")
    assert within.status_code == 200 and within.text == old.text
    assert within.headers["x-pyisr-cache"] == "STALE" and within.headers["cache-status"] == FAILED_STALE
    assert not blog.app.engine.regenerating("/posts/5")
    # The next request after the back-off retries (still the old page) and succeeds.
    blog.clock.advance(0.2)
    retry = await blog.get("/posts/5")
    assert retry.status_code == 200 and retry.text == old.text  # never a broken page meanwhile
    assert retry.headers["x-pyisr-cache"] == "STALE"
    await blog.drain()
    new = await blog.get("/posts/5")
    assert new.status_code == 200 and heading(new) == "What Happens When a Render Succeeds"
    assert (await blog.get("/posts/5")).headers["x-pyisr-cache"] == "HIT"


async def test_blog_sqlite_only_mode_and_revalidate_tag(blog: Served) -> None:
    """No BLOG_API_URL: everything reads SQLite through cached(), with the seed's hour."""
    db = blog.root / "blog.db"
    old = await blog.get("/blog/2")
    assert old.status_code == 200 and old.headers["x-pyisr-cache"] == "HIT"
    assert heading(old) == "Why Stale-While-Revalidate Feels Instant"
    sql(db, "UPDATE posts SET title = ? WHERE id = 2", "Why Stale Pages Feel Instant")
    # The page regenerates after its window, but the post comes from cached() data that
    # is good for an hour: the text does not change (as in Next.js).
    blog.clock.advance(BLOG_WINDOW + 0.2)
    assert (await blog.get("/blog/2")).headers["x-pyisr-cache"] == "STALE"
    await blog.drain()
    regenerated = await blog.get("/blog/2")
    assert regenerated.headers["x-pyisr-cache"] == "HIT"
    assert rendered_at(regenerated) > rendered_at(old)
    assert heading(regenerated) == "Why Stale-While-Revalidate Feels Instant"
    # revalidate_tag("posts") from the admin form refreshes the data and the pages.
    created = await blog.request(
        "POST", "/admin/posts", data={"title": "Offline and Fine", "content": "Yes."}
    )
    assert created.status_code == 303
    fresh = await blog.get("/blog/2")
    assert fresh.headers["x-pyisr-cache"] == "MISS"
    assert heading(fresh) == "Why Stale Pages Feel Instant"
    assert "Offline and Fine" in (await blog.get("/blog")).text
    assert (await blog.get("/blog/26")).status_code == 200
