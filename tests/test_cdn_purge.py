"""Purging the edge: every invalidation reaches each CDN, batched, retried, never in the way.

The CDNs are :class:`cdn_support.PurgeServer` instances on 127.0.0.1 that check each
request against the provider's published format (Fastly's surrogate-key purge, Cloudflare's
purge by tags, the shipped VCL's xkey purge, pyisr's webhook) and can be told to fail or
hang. Nothing leaves the machine. Timings are the real ones except where a test shortens
the queue's back-off (``first_retry``) to keep the suite quick.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cdn_support import (
    PurgeServer,
    check_cloudflare,
    check_fastly,
    check_varnish,
    check_webhook,
    cloudflare_answer,
    fastly_answer,
    varnish_answer,
)
from click.testing import CliRunner
from conftest import FakeClock, Page

from pyisr import cache_tools
from pyisr.cache.memory import MemoryCache
from pyisr.cdn import attach_cdn
from pyisr.cdn.keys import OVERFLOW_KEY
from pyisr.cdn.queue import PurgeQueue
from pyisr.cdn.urls import purger_from_url
from pyisr.cli import main
from pyisr.config import Config, ConfigError, load_config
from pyisr.engine import CacheStatus, Engine, RenderPolicy
from pyisr.metrics import enable, scrape
from pyisr.revalidation import revalidate
from pyisr.runtime import configure, set_engine
from pyisr.server.app import App

TOKEN = "test-token-0123456789"
SECRET = "varnish-purge-secret"
SERVICE, ZONE = "SVC123", "ZONE456"
#: Every variable an adapter reads, as a process would have them.
ENV = {
    "FASTLY_API_TOKEN": TOKEN,
    "CLOUDFLARE_API_TOKEN": TOKEN,
    "PYISR_CDN_WEBHOOK_TOKEN": TOKEN,
    "PYISR_VARNISH_PURGE_SECRET": SECRET,
}
REVALIDATE_SECRET = "revalidate-secret-for-tests"


def fastly_server() -> PurgeServer:
    return PurgeServer(check_fastly(SERVICE, TOKEN), fastly_answer)


def cloudflare_server() -> PurgeServer:
    return PurgeServer(check_cloudflare(ZONE, TOKEN), cloudflare_answer)


def varnish_server() -> PurgeServer:
    return PurgeServer(check_varnish(SECRET), varnish_answer)


def webhook_server() -> PurgeServer:
    return PurgeServer(check_webhook(TOKEN))


def url_of(kind: str, server: PurgeServer) -> str:
    return {
        "fastly": f"fastly://{SERVICE}?api={server.url}",
        "cloudflare": f"cloudflare://{ZONE}?api={server.url}",
        "varnish": f"varnish://127.0.0.1:{server.port}",
        "webhook": f"{server.url}/purge?site=blog",
    }[kind]


SERVERS = {
    "fastly": fastly_server,
    "cloudflare": cloudflare_server,
    "varnish": varnish_server,
    "webhook": webhook_server,
}


@pytest.fixture
def webhook() -> Iterator[PurgeServer]:
    with webhook_server() as server:
        yield server


@pytest.fixture
async def cdn_engine(clock: FakeClock, webhook: PurgeServer) -> AsyncIterator[Engine]:
    """An engine purging ``webhook``, with quick retries."""
    engine = Engine(MemoryCache(), clock=clock, render_timeout=2.0)
    attach_cdn(engine, [url_of("webhook", webhook)], environ=ENV, first_retry=0.05)
    yield engine
    await engine.close()


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# -- each provider's format ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SERVERS))
@pytest.mark.parametrize("soft", [False, True])
def test_each_adapter_sends_its_providers_format(kind: str, soft: bool) -> None:
    with SERVERS[kind]() as server:
        queue = PurgeQueue([purger_from_url(url_of(kind, server), ENV)])
        queue.add(["posts", "_p/blog/1", "h:0123456789abcdef0123456789abcdef"], soft=soft)
        assert queue.flush(5)
        queue.close()
        [request] = server.requests
    assert request.problems == []
    assert request.keys == ["posts", "_p/blog/1", "h:0123456789abcdef0123456789abcdef"]
    if kind == "fastly":
        assert request.headers.get("fastly-soft-purge") == ("1" if soft else None)
    elif kind == "varnish":
        assert ("xkey-softpurge" in request.headers) is soft
        assert request.headers["x-pyisr-purge-secret"] == SECRET
    elif kind == "webhook":
        assert request.json()["soft"] is soft
        assert request.path == "/purge" and request.query == {"site": ["blog"]}  # its own query kept


def test_fastly_soft_0_purges_every_key_hard() -> None:
    with fastly_server() as server:
        queue = PurgeQueue([purger_from_url(f"fastly://{SERVICE}?soft=0&api={server.url}", ENV)])
        queue.add(["posts"], soft=True)
        assert queue.flush(5)
        queue.close()
    assert server.requests[0].problems == [] and "fastly-soft-purge" not in server.requests[0].headers


def test_adapter_names_never_carry_tokens() -> None:
    env = {**ENV, "MY_HOOK_TOKEN": "hook-token-xyz"}
    purger = purger_from_url("https://user:pw@hooks.example.com/purge?token_env=MY_HOOK_TOKEN&x=1", env)
    assert purger.name == "https://hooks.example.com/purge"
    for url in (f"fastly://{SERVICE}", f"cloudflare://{ZONE}", "varnish://127.0.0.1:6081"):
        assert TOKEN not in purger_from_url(url, ENV).name and SECRET not in purger_from_url(url, ENV).name


# -- batching -----------------------------------------------------------------------------------


async def test_invalidations_within_the_window_make_one_request_per_cdn(clock: FakeClock) -> None:
    engine = Engine(MemoryCache(), clock=clock)
    with fastly_server() as fastly, cloudflare_server() as cloudflare:
        attach_cdn(engine, [url_of("fastly", fastly), url_of("cloudflare", cloudflare)], environ=ENV)
        for i in range(20):
            await engine.revalidate_tag(f"tag{i}")
        assert engine.cdn is not None and await engine.cdn.aflush(5)
        await engine.close()
        for server in (fastly, cloudflare):
            [request] = server.requests
            assert request.problems == []
            assert sorted(request.keys) == sorted([f"tag{i}" for i in range(20)] + [OVERFLOW_KEY])


def test_batches_are_split_by_max_keys_and_header_bytes() -> None:
    with cloudflare_server() as cloudflare, varnish_server() as varnish:
        queue = PurgeQueue(
            [
                purger_from_url(url_of(k, s), ENV)
                for k, s in [("cloudflare", cloudflare), ("varnish", varnish)]
            ]
        )
        short = [f"k{i}" for i in range(100)]
        long = [f"{i:03d}" + "x" * 125 for i in range(100)]  # 128 characters: sent as written
        queue.add(short + long)
        assert queue.flush(5)
        queue.close()
    assert [len(r.keys) for r in cloudflare.requests] == [30] * 6 + [20]  # Cloudflare: 30 tags a call
    assert cloudflare.problems() == [] and varnish.problems() == []
    assert sorted(cloudflare.keys()) == sorted(short + long) == sorted(varnish.keys())
    headers = [r.headers["xkey-purge"] for r in varnish.requests]
    # 7,000 bytes at most: the 100 short keys and 51 long ones, then the other 49.
    assert [len(h.split()) for h in headers] == [151, 49] and all(len(h) <= 7000 for h in headers)


def test_a_hard_purge_supersedes_a_pending_soft_one(webhook: PurgeServer) -> None:
    queue = PurgeQueue([purger_from_url(url_of("webhook", webhook), ENV)])
    queue.add(["a", "b"], soft=True)
    queue.add(["a"], soft=False)
    assert queue.flush(5)
    queue.close()
    sent = {(tuple(r.json()["keys"]), r.json()["soft"]) for r in webhook.requests}
    assert sent == {(("a",), False), (("b",), True)}


# -- failures -----------------------------------------------------------------------------------


async def test_a_failed_purge_is_retried_with_back_off_then_sent(
    cdn_engine: Engine, webhook: PurgeServer, caplog: pytest.LogCaptureFixture
) -> None:
    webhook.fail(3, 503)
    with caplog.at_level(logging.ERROR, logger="pyisr.cdn"):
        await cdn_engine.revalidate_tag("posts")
        assert cdn_engine.cdn is not None
        await until(lambda: bool(cdn_engine.degraded_reasons()))  # failing now, retried meanwhile
        assert await cdn_engine.cdn.aflush(5)
    requests = webhook.requests
    assert len(requests) == 4 and all(r.keys == ["posts", OVERFLOW_KEY] for r in requests)
    gaps = [b.at - a.at for a, b in zip(requests, requests[1:], strict=False)]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.09 and gaps[2] >= 0.19  # 0.05, 0.1, 0.2 s
    state = cdn_engine.health()["cdn"][webhook.url + "/purge"]
    assert state["sent"] == 2 and state["retried"] == 6 and state["failed"] == state["dropped"] == 0
    assert state["failing_since"] is None and cdn_engine.degraded_reasons() == []
    failed = [r for r in caplog.records if "PURGE FAILED" in r.getMessage()]
    assert len(failed) == 1, "logged at most once a minute per CDN"
    assert "HTTP 503" in failed[0].getMessage()


async def test_a_refused_purge_is_not_retried_and_shows_in_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYISR_VARNISH_PURGE_SECRET", SECRET)
    with varnish_server() as varnish:
        config = Config(cdn=(url_of("varnish", varnish),), revalidate_secret=REVALIDATE_SECRET)
        app = App(blog_site(tmp_path), config=config)
        varnish.fail(1, 403)
        auth = {"authorization": f"Bearer {REVALIDATE_SECRET}"}
        async with client_of(app) as client:
            answer = await client.post("/_pyisr/revalidate?tag=posts", headers=auth)
            assert answer.status_code == 200
            assert app.engine.cdn is not None and await app.engine.cdn.aflush(5)
            await asyncio.sleep(0.3)
            assert len(varnish.requests) == 1  # a 403 is not retried
            public = await client.get("/_pyisr/health")
            private = await client.get("/_pyisr/health", headers=auth)
            # A later purge that succeeds ends it.
            await client.post("/_pyisr/revalidate?tag=posts", headers=auth)
            assert await app.engine.cdn.aflush(5)
            after = await client.get("/_pyisr/health")
        await app.shutdown()
    assert public.status_code == 200  # the edge's trouble: no reason to take this instance out
    body = public.json()
    assert body["status"] == "degraded"
    assert any("varnish" in r and "HTTP 403" in r for r in body["reasons"])
    assert body["cdn"] == [
        {
            "cdn": "varnish",
            "sent": 0,
            "failed": 2,
            "retried": 0,
            "dropped": 0,
            "pending": 0,
            "last_error": "HTTP 403",
        }
    ]
    assert "127.0.0.1" not in public.text and SECRET not in public.text
    state = private.json()["engine"]["cdn"][f"varnish://127.0.0.1:{varnish.port}"]
    assert "403" in state["last_error"] and state["requests"] == 1
    assert SECRET not in private.text
    assert after.json() == {"status": "ok", "cdn": [{**body["cdn"][0], "sent": 2, "last_error": "HTTP 403"}]}


async def test_purges_failing_too_long_are_given_up(
    clock: FakeClock, webhook: PurgeServer, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(MemoryCache(), clock=clock)
    attach_cdn(engine, [url_of("webhook", webhook)], environ=ENV, first_retry=0.05, give_up_after=0.3)
    webhook.fail(1000, 500)
    with caplog.at_level(logging.ERROR, logger="pyisr.cdn"):
        await engine.revalidate_tag("posts")
        assert engine.cdn is not None and await engine.cdn.aflush(3)
    state = engine.health()["cdn"][webhook.url + "/purge"]
    assert state["dropped"] == 2 and state["sent"] == 0 and state["pending"] == 0
    assert any("PURGE GAVE UP on 2 keys" in r.getMessage() for r in caplog.records)
    await engine.close()


async def test_revalidate_never_waits_for_the_cdn(cdn_engine: Engine, webhook: PurgeServer) -> None:
    webhook.hang(1)  # the first purge gets no answer (the adapter gives up after 5 s)
    await cdn_engine.revalidate_tag("t0")
    webhook.wait_for(1)  # a purge is hanging now
    started = time.monotonic()
    for i in range(1, 20):
        await cdn_engine.revalidate_tag(f"t{i}")
    assert time.monotonic() - started < 0.5
    webhook.release()  # the hanging request ends without an answer: retried
    assert cdn_engine.cdn is not None and await cdn_engine.cdn.aflush(5)
    assert set(webhook.keys()) >= {f"t{i}" for i in range(20)}
    assert cdn_engine.health()["cdn"][webhook.url + "/purge"]["retried"] == 2


def test_a_sync_caller_returns_at_once_too(sync_engine: Engine, webhook: PurgeServer) -> None:
    import pyisr

    attach_cdn(sync_engine, [url_of("webhook", webhook)], environ=ENV)
    webhook.hang(1)
    started = time.monotonic()
    pyisr.revalidate_tag("posts")
    pyisr.revalidate_path("/blog", "layout")
    assert time.monotonic() - started < 0.5
    webhook.release()
    assert sync_engine.cdn is not None and sync_engine.cdn.flush(5)
    assert {"posts", "_l/blog"} <= set(webhook.keys())
    sync_engine.cdn.close()


# -- which keys -----------------------------------------------------------------------------------

BLOG = """
from pyisr import cached

revalidate = 60
tags = ["posts"]


def _author(id):
    return {"name": "ann"}


author = cached(_author, ["author"], tags=["authors"], revalidate=3600)


def generate_static_params():
    return [{"id": "1"}, {"id": "2"}]


def page(params):
    return "<p>post " + params["id"] + " by " + author(params["id"])["name"] + "</p>"
"""


def blog_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    (site / "app" / "blog" / "[id]").mkdir(parents=True)
    (site / "app" / "blog" / "[id]" / "page.py").write_text(textwrap.dedent(BLOG))
    return site


def client_of(app: App) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def test_purges_name_the_keys_the_page_carried(
    tmp_path: Path, webhook: PurgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config(cdn=(url_of("webhook", webhook),), revalidate_secret=REVALIDATE_SECRET)
    monkeypatch.setenv("PYISR_CDN_WEBHOOK_TOKEN", TOKEN)
    app = App(blog_site(tmp_path), config=config)
    engine = app.engine
    assert engine.cdn is not None
    async with client_of(app) as client:
        page = await client.get("/blog/1")
        carried = page.headers["surrogate-key"].split(" ")
        assert page.headers["cache-tag"].split(",") == carried
        assert {"posts", "authors", "_p/blog/1", "_r/blog/[id]", "_l/blog"} <= set(carried)

        async def purged_by(action: Any) -> tuple[set[str], bool]:
            before = len(webhook.requests)
            await action
            assert engine.cdn is not None and await engine.cdn.aflush(5)
            new = webhook.requests[before:]
            assert new and webhook.problems() == []
            return {k for r in new for k in r.keys}, all(r.json()["soft"] for r in new)

        cases = [
            (engine.revalidate_tag("authors"), "authors", False),  # inherited from a data call
            (engine.revalidate_tag("posts", stale=True), "posts", True),
            (engine.revalidate_path("/blog/1"), "_p/blog/1", False),
            (engine.revalidate_path("/blog/[id]", "page"), "_r/blog/[id]", False),
            (engine.revalidate_path("/blog", "layout"), "_l/blog", False),
            (revalidate("/blog/1", engine=engine), "_p/blog/1", False),
            (cache_tools.purge(engine, "/blog/1"), "_p/blog/1", False),
        ]
        for action, key, soft in cases:
            keys, was_soft = await purged_by(action)
            assert key in keys and key in carried, (key, keys)
            assert keys <= set(carried) | {OVERFLOW_KEY}
            assert was_soft is soft
        # The endpoint too (the CLI's `pyisr revalidate` and a CMS's webhook come this way).
        auth = {"authorization": f"Bearer {REVALIDATE_SECRET}"}
        keys, _ = await purged_by(client.post("/_pyisr/revalidate?path=/blog/1", headers=auth))
        assert "_p/blog/1" in keys
    await app.shutdown()


async def test_a_stale_mark_purges_softly_and_again_once_the_page_is_regenerated(
    cdn_engine: Engine, webhook: PurgeServer, clock: FakeClock
) -> None:
    """An edge that refetched while the page was marked stale got the STALE answer, with a
    fresh ``s-maxage``: the regenerated page must be purged too, or the edge keeps the old."""
    page = Page(revalidate=60)
    policy = RenderPolicy(revalidate=60, tags=("posts",))
    assert cdn_engine.cdn is not None
    assert (await cdn_engine.get("/news", page, policy)).status is CacheStatus.MISS
    await cdn_engine.revalidate_tag("posts", stale=True)
    assert await cdn_engine.cdn.aflush(5)
    assert [(r.keys, r.json()["soft"]) for r in webhook.requests] == [(["posts", OVERFLOW_KEY], True)]
    clock.advance(1)
    assert (await cdn_engine.get("/news", page, policy)).status is CacheStatus.STALE
    await cdn_engine.drain()  # the background regeneration stored the new page
    assert await cdn_engine.cdn.aflush(5)
    assert [(r.keys, r.json()["soft"]) for r in webhook.requests[1:]] == [(["_p/news", OVERFLOW_KEY], True)]
    # A page stale by time only was never answered fresh to anyone: nothing more to purge.
    clock.advance(120)
    assert (await cdn_engine.get("/news", page, policy)).status is CacheStatus.STALE
    await cdn_engine.drain()
    assert await cdn_engine.cdn.aflush(5)
    assert len(webhook.requests) == 2 and page.calls == 3


# -- processes ------------------------------------------------------------------------------------


def test_a_script_purges_before_it_exits(webhook: PurgeServer, tmp_path: Path) -> None:
    script = "import pyisr\npyisr.revalidate_tag('posts')\npyisr.revalidate_path('/blog/1')\n"
    env = {
        **os.environ,
        **ENV,
        "PYISR_CDN": url_of("webhook", webhook),
        "PYISR_CACHE": f"file://{tmp_path / 'cache'}",
    }
    env.pop("PYISR_SITE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # Both were sent before the process ended (its exit waits for the queue), in one request.
    assert webhook.problems() == []
    assert sorted(webhook.keys()) == sorted(["posts", "_p/blog/1", OVERFLOW_KEY])


def test_pyisr_cache_purge_purges_the_edge(
    tmp_path: Path, webhook: PurgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = blog_site(tmp_path)
    runner = CliRunner()
    built = runner.invoke(main, ["build", str(site)], catch_exceptions=False)
    assert built.exit_code == 0, built.output
    (site / "pyisr.toml").write_text(f'cdn = ["{url_of("webhook", webhook)}"]\n')
    monkeypatch.setenv("PYISR_CDN_WEBHOOK_TOKEN", TOKEN)
    purged = runner.invoke(
        main, ["cache", "purge", "/blog/2", "--site", str(site), "--json"], catch_exceptions=False
    )
    assert purged.exit_code == 0, purged.output
    answer = json.loads(purged.stdout)
    assert answer["edge"][webhook.url + "/purge"]["sent"] == 2
    assert webhook.keys() == ["_p/blog/2", OVERFLOW_KEY] and webhook.problems() == []


# -- settings -------------------------------------------------------------------------------------


def test_bad_cdn_settings_name_the_setting_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"PYISR_CDN.*varnish://HOST:PORT"):
        load_config(tmp_path, environ={"PYISR_CDN": "ftp://cdn.example.com"})
    (tmp_path / "pyisr.toml").write_text('cdn = ["fastly://not-an-id"]\n')
    with pytest.raises(ConfigError, match=r"key 'cdn'.*letters and digits"):
        load_config(tmp_path, environ={})
    bad = {
        "varnish://127.0.0.1": "host and port",
        "varnish://127.0.0.1:6081?token=x": "unknown option 'token'",
        f"fastly://{SERVICE}?api=http://example.com": "https://",
        f"fastly://{SERVICE}?soft=yes": "soft is 0",
        f"cloudflare://{ZONE}?token_env=sk-live-abc": "never the token itself",
    }
    for url, says in bad.items():
        with pytest.raises(ValueError, match=says):
            purger_from_url(url, ENV)


def test_a_missing_token_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"set FASTLY_API_TOKEN .*token_env=NAME"):
        purger_from_url(f"fastly://{SERVICE}", {})
    with pytest.raises(ValueError, match=r"set MY_CF_TOKEN"):
        purger_from_url(f"cloudflare://{ZONE}?token_env=MY_CF_TOKEN", {"CLOUDFLARE_API_TOKEN": "x"})
    with pytest.raises(
        ValueError, match=r"^configure\(cdn=\.\.\.\): cloudflare://ZONE456: .*CLOUDFLARE_API_TOKEN"
    ):
        configure("memory://", cdn=[f"cloudflare://{ZONE}"])
    set_engine(None)
    monkeypatch.setenv("PYISR_CDN", f"fastly://{SERVICE}")
    with pytest.raises(ValueError, match=r"^PYISR_CDN: fastly://SVC123: no API token: set FASTLY_API_TOKEN"):
        configure("memory://")
    set_engine(None)
    # The server refuses to start without it (before it looks for a build).
    (tmp_path / "pyisr.toml").write_text(f'cdn = ["fastly://{SERVICE}"]\n')
    monkeypatch.delenv("PYISR_CDN")
    started = CliRunner().invoke(main, ["start", str(tmp_path)])
    assert (
        started.exit_code == 2
        and "cdn: fastly://SVC123: no API token: set FASTLY_API_TOKEN" in started.output
    )
    # Without a token, Varnish and webhooks purge all the same (their VCL or hook may trust the address).
    assert purger_from_url("varnish://127.0.0.1:6081", {}).name == "varnish://127.0.0.1:6081"


def test_django_checks_the_cdn_setting() -> None:
    from pyisr.integrations.django.conf import parse

    found = parse({"cdn": [f"fastly://{SERVICE}"]}, base_dir="/srv/app", environ={})
    [problem] = [p for p in found.problems if p.id == "pyisr.E011"]
    assert "FASTLY_API_TOKEN" in problem.msg and found.cdn == ()
    ok = parse({}, base_dir="/srv/app", environ={"PYISR_CDN": "varnish://127.0.0.1:6081"})
    assert ok.cdn == ("varnish://127.0.0.1:6081",) and ok.errors == ()


# -- metrics --------------------------------------------------------------------------------------


async def test_purges_are_counted_in_the_metrics(cdn_engine: Engine, webhook: PurgeServer) -> None:
    enable(cdn_engine)
    webhook.fail(1, 503)
    await cdn_engine.revalidate_tag("posts")
    assert cdn_engine.cdn is not None and await cdn_engine.cdn.aflush(5)
    text = (await scrape(cdn_engine)).decode()
    name = webhook.url + "/purge"
    assert f'pyisr_cdn_purges_total{{cdn="{name}",result="sent"}} 2.0' in text
    assert f'pyisr_cdn_purges_total{{cdn="{name}",result="retried"}} 2.0' in text


# -- the integrations and the server -------------------------------------------------------------


def test_flask_pages_carry_their_keys_and_their_invalidations_purge(
    webhook: PurgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        from flask import Flask
    except ImportError:  # a dev dependency: missing under CI is a failure, not a skip
        if os.environ.get("CI") == "true":
            pytest.fail("flask is not installed: pip install -e '.[dev]'")
        pytest.skip("flask is not installed")

    import pyisr
    from pyisr.integrations.flask import isr

    monkeypatch.delenv("PYISR_SITE", raising=False)
    monkeypatch.setenv("PYISR_CDN", url_of("webhook", webhook))  # how a Flask app names its CDN
    monkeypatch.setenv("PYISR_CDN_WEBHOOK_TOKEN", TOKEN)
    engine = pyisr.configure("memory://")
    app = Flask("cdn")

    @app.get("/post/<int:id>")
    @isr(revalidate=60, tags=["posts"])
    def post(id: int) -> str:
        return f"<p>post {id}</p>"

    try:
        carried = app.test_client().get("/post/1").headers["Surrogate-Key"].split(" ")
        pyisr.revalidate_tag("posts")
        pyisr.revalidate_sync("/post/1")
        assert engine.cdn is not None and engine.cdn.flush(5)
        purged = set(webhook.keys())
        assert {"posts", "_p/post/1"} <= purged & set(carried) and webhook.problems() == []
    finally:
        if engine.cdn is not None:
            engine.cdn.close()
        set_engine(None)


@pytest.mark.slow
def test_the_site_server_purges_what_its_endpoint_invalidates(tmp_path: Path, webhook: PurgeServer) -> None:
    from e2e_support import run_cli, running

    site = blog_site(tmp_path)
    built = run_cli(["build", str(site)], {})
    assert built.returncode == 0, built.stderr
    env = {
        "PYISR_CDN": url_of("webhook", webhook),
        "PYISR_CDN_WEBHOOK_TOKEN": TOKEN,
        "PYISR_REVALIDATE_SECRET": REVALIDATE_SECRET,
    }
    with running(site, env) as server:
        carried = server.get("/blog/1").headers["surrogate-key"].split(" ")
        auth = {"authorization": f"Bearer {REVALIDATE_SECRET}"}
        assert server.request("POST", "/_pyisr/revalidate?tag=authors", headers=auth).status_code == 200
        [request] = webhook.wait_for(1)
        assert request.problems == [] and "authors" in set(request.keys) & set(carried)
        deadline = time.monotonic() + 5
        while (health := server.get("/_pyisr/health").json())["cdn"][0]["sent"] != 2:
            assert time.monotonic() < deadline, health  # counted once the webhook answered
            time.sleep(0.02)
        assert health["status"] == "ok"


def test_a_deploy_purges_the_build_it_replaces(tmp_path: Path, webhook: PurgeServer) -> None:
    """The current build's server purges the other kept builds, and those that served
    lately, as it starts; a server whose build was replaced while it ran purges its own as
    it stops; one whose build is still current purges nothing."""
    from e2e_support import run_cli, running

    site = blog_site(tmp_path)
    env = {"PYISR_CDN": url_of("webhook", webhook), "PYISR_CDN_WEBHOOK_TOKEN": TOKEN}

    def build(*flags: str) -> str:
        built = run_cli(["build", str(site), *flags], {})
        assert built.returncode == 0, built.stderr
        return (site / ".pyisr" / "BUILD_ID").read_text().strip()

    build_a = build()
    with running(site, env) as server:  # the only build: nothing else to purge
        assert f"_b/{build_a}" in server.get("/blog/1").headers["surrogate-key"].split(" ")
        build_b = build()  # B is current now; this server still serves A
    [request] = webhook.wait_for(1)
    assert request.problems == [] and request.keys == [f"_b/{build_a}"], "A's server, on its way out"
    with running(site, env) as server:
        assert f"_b/{build_b}" in server.get("/blog/1").headers["surrogate-key"].split(" ")
        [_, request] = webhook.wait_for(2)
        assert request.keys == [f"_b/{build_a}"], "B's server, as it starts"
    time.sleep(1)  # past the queue's window: B's server, stopped while current, sent nothing
    assert len(webhook.requests) == 2
    assert build("--rollback") == build_a
    with running(site, env):
        [*_, request] = webhook.wait_for(3)
        assert request.keys == [f"_b/{build_b}"], "a rollback purges the build rolled back from"
    # Two builds while no server runs: A and B are no longer kept, yet their pages may
    # still be at the edge. The record of builds that served names them.
    build_c, build_d = build(), build()
    assert sorted(p.name for p in (site / ".pyisr" / "builds").iterdir() if p.is_dir()) == sorted(
        [build_c, build_d]
    )
    with running(site, env):
        [*_, request] = webhook.wait_for(4)
        assert sorted(request.keys) == sorted(f"_b/{b}" for b in (build_a, build_b, build_c))
    # A record that cannot be written never stops a server: it purges what it knows.
    record = site / ".pyisr" / "builds" / ".edge-builds"
    record.unlink()
    record.mkdir()
    build_e = build()
    with running(site, env) as server:
        assert server.get("/blog/1").status_code == 200
        [*_, request] = webhook.wait_for(5)
        assert request.keys == [f"_b/{build_d}"], f"the kept build, not {build_e} itself"
        assert "cannot record build" in server.log()
