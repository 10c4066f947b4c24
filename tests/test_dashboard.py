"""The dashboard at ``/_pyisr/``: off without a secret, the sign-in and its limit, the
cookie, CSRF and Origin checks, the actions and what they record, escaping, every page
over the memory and file-system stores, and the dashboard served by the site server,
Starlette/FastAPI, Flask and Django.

In-process: httpx's ASGI transport (site server, Starlette), Flask's test client and
Django's, each signing in with the secret through the form.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from pyisr import Engine, MemoryCache, Rendered
from pyisr.cache.activity import ActivityReport
from pyisr.cache.filesystem import FileSystemCache
from pyisr.config import Config, ConfigError, load_config
from pyisr.dashboard import dashboard_app
from pyisr.dashboard.auth import MAX_FAILURES
from pyisr.dashboard.web import SECURITY_HEADERS
from pyisr.engine import RenderPolicy
from pyisr.server.app import App

SECRET = "dashboard-secret-0123456789"
BASE = "http://testserver"


def _policy(key: str, route: str | None = None) -> RenderPolicy:
    from pyisr.cache.tags import implicit_tags

    return RenderPolicy(revalidate=60, tags=implicit_tags(key, route), route=route)


async def fill(
    engine: Engine, key: str, *, tags: tuple[str, ...] = ("posts",), route: str | None = None
) -> None:
    """Store ``key`` through the engine, as a page render would."""

    async def render() -> Rendered:
        return Rendered(f"<p>{key}</p>", headers={"content-type": "text/html"}, tags=tags)

    await engine.get(key, render, _policy(key, route))


def resolver_for(keys: set[str]) -> Any:
    """A resolver that renders the given keys (what ``revalidate(path)`` needs)."""

    async def resolve(key: str) -> Any:
        if key not in keys:
            return None

        async def render() -> Rendered:
            return Rendered(f"<p>{key} again</p>", headers={"content-type": "text/html"}, tags=("posts",))

        return key, render, _policy(key, "/blog/[id]")

    return resolve


@pytest.fixture(params=["memory", "filesystem"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    handler = MemoryCache() if request.param == "memory" else FileSystemCache(tmp_path / "cache")
    eng = Engine(handler, render_timeout=5.0)
    await fill(eng, "/blog/1", route="/blog/[id]")
    await fill(eng, "/blog/2", route="/blog/[id]", tags=("posts", "featured"))
    await fill(eng, "/about", tags=())
    eng.add_resolver(resolver_for({"/blog/1", "/blog/2", "/about"}))
    yield eng
    await eng.drain()
    await eng.close()


def client(app: Any, *, address: str = "127.0.0.1", base_url: str = BASE) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 50000))
    return httpx.AsyncClient(transport=transport, base_url=base_url)


async def sign_in(c: httpx.AsyncClient, mount: str = "/_pyisr") -> str:
    """Sign in through the form; returns the CSRF token of the summary page."""
    answer = await c.post(f"{mount}/login", data={"secret": SECRET})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == f"{mount}/"
    page = await c.get(f"{mount}/")
    assert page.status_code == 200
    return csrf_of(page.text)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, "no CSRF token on the page"
    return found.group(1)


def result_of(html: str) -> str | None:
    found = re.search(r'id="result">([^<]*)<', html)
    return found.group(1) if found else None


def assert_security_headers(answer: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS:
        assert answer.headers.get(name) == value, (name, answer.headers.get(name))


# -- off unless a secret is set -----------------------------------------------------------


async def test_off_without_a_secret() -> None:
    async with client(dashboard_app(Engine(MemoryCache()), secret=None)) as c:
        for path in ("/_pyisr/", "/_pyisr/login", "/_pyisr/static/dashboard.css"):
            assert (await c.get(path)).status_code == 404
        assert (await c.post("/_pyisr/login", data={"secret": SECRET})).status_code == 404


def test_a_short_secret_is_refused_naming_the_key_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "pyisr.toml").write_text('dashboard_secret = "short-one"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path)
    message = str(raised.value)
    assert "dashboard_secret" in message and "16" in message and "token_urlsafe" in message
    assert "short-one" not in message  # a secret is never printed
    with pytest.raises(ConfigError, match="PYISR_DASHBOARD_SECRET"):
        load_config(None, environ={"PYISR_DASHBOARD_SECRET": "x" * 15})
    assert load_config(None, environ={"PYISR_DASHBOARD_SECRET": SECRET}).dashboard_secret == SECRET
    with pytest.raises(ValueError, match="16"):
        dashboard_app(secret="x" * 10)


# -- sign-in ------------------------------------------------------------------------------


async def test_sign_in_sets_a_signed_strict_cookie(engine: Engine) -> None:
    async with client(dashboard_app(engine, secret=SECRET)) as c:
        first = await c.get("/_pyisr/")
        assert first.status_code == 303 and first.headers["location"] == "/_pyisr/login"
        form = await c.get("/_pyisr/login")
        assert form.status_code == 200 and 'type="password"' in form.text
        assert_security_headers(form)
        answer = await c.post("/_pyisr/login", data={"secret": SECRET})
        assert answer.status_code == 303
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith("pyisr_dashboard=v1.")
        for flag in ("HttpOnly", "SameSite=Strict", "Path=/_pyisr", "Max-Age=28800"):
            assert flag in cookie
        assert "Secure" not in cookie  # plain http: a Secure cookie would never come back
        assert SECRET not in cookie
        assert (await c.get("/_pyisr/")).status_code == 200
    async with client(dashboard_app(engine, secret=SECRET), base_url="https://testserver") as c:
        answer = await c.post("/_pyisr/login", data={"secret": SECRET})
        assert "; Secure" in answer.headers["set-cookie"]


async def test_the_secret_in_a_url_signs_nobody_in(engine: Engine) -> None:
    async with client(dashboard_app(engine, secret=SECRET)) as c:
        answer = await c.get("/_pyisr/login", params={"secret": SECRET})
        assert answer.status_code == 200 and "set-cookie" not in answer.headers
        assert (await c.get("/_pyisr/", params={"secret": SECRET})).status_code == 303


async def test_a_forged_or_foreign_cookie_is_no_session(engine: Engine) -> None:
    app = dashboard_app(engine, secret=SECRET)
    async with client(app) as c:
        await sign_in(c)
        value = c.cookies["pyisr_dashboard"]
        expires = value.split(".")[2]
        forged = value.replace(expires, str(int(expires) + 10**6))
        c.cookies.clear()
        c.cookies.set("pyisr_dashboard", forged)
        assert (await c.get("/_pyisr/")).status_code == 303
    other = dashboard_app(engine, secret=SECRET + "-other")
    async with client(other) as c:
        c.cookies.set("pyisr_dashboard", value)
        assert (await c.get("/_pyisr/")).status_code == 303  # another secret, another key


async def test_a_wrong_secret_answers_403_and_the_form(engine: Engine) -> None:
    async with client(dashboard_app(engine, secret=SECRET)) as c:
        answer = await c.post("/_pyisr/login", data={"secret": "not-the-secret"})
        assert answer.status_code == 403
        assert 'type="password"' in answer.text and "not the dashboard" in answer.text
        assert "set-cookie" not in answer.headers
        assert_security_headers(answer)


async def test_wrong_secrets_are_rate_limited_per_address(engine: Engine) -> None:
    app = dashboard_app(engine, secret=SECRET)
    async with client(app, address="10.0.0.7") as c:
        for _ in range(MAX_FAILURES):
            assert (await c.post("/_pyisr/login", data={"secret": "guess"})).status_code == 403
        limited = await c.post("/_pyisr/login", data={"secret": "guess"})
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
        assert "Too many wrong secrets" in limited.text
        # While it waits, even the right secret is refused: guessing must not go on.
        assert (await c.post("/_pyisr/login", data={"secret": SECRET})).status_code == 429
    async with client(app, address="10.0.0.8") as c:  # another address is not held back
        assert (await c.post("/_pyisr/login", data={"secret": SECRET})).status_code == 303


async def test_sign_out_ends_the_session(engine: Engine) -> None:
    async with client(dashboard_app(engine, secret=SECRET)) as c:
        token = await sign_in(c)
        answer = await c.post("/_pyisr/logout", data={"csrf": token})
        assert answer.status_code == 303 and answer.headers["location"] == "/_pyisr/login"
        assert "Max-Age=0" in answer.headers["set-cookie"]
        assert (await c.get("/_pyisr/")).status_code == 303


# -- CSRF and Origin ----------------------------------------------------------------------


async def _invalidations(engine: Engine) -> list[Any]:
    return (await engine.handler.activity(engine.clock())).invalidations


@pytest.mark.parametrize("token", [None, "", "wrong-token", "other-session"])
async def test_an_action_without_its_sessions_token_is_refused(engine: Engine, token: str | None) -> None:
    app = dashboard_app(engine, secret=SECRET)
    async with client(app) as c:
        await sign_in(c)
        if token == "other-session":
            async with client(app) as other:
                token = await sign_in(other)
        data = {"kind": "tag", "target": "posts"}
        if token is not None:
            data["csrf"] = token
        answer = await c.post("/_pyisr/action", data=data)
        assert answer.status_code == 403 and "security token" in answer.text
        assert_security_headers(answer)
    assert await _invalidations(engine) == []


async def test_a_post_from_another_origin_is_refused(engine: Engine) -> None:
    async with client(dashboard_app(engine, secret=SECRET)) as c:
        token = await sign_in(c)
        data = {"kind": "tag", "target": "posts", "csrf": token}
        evil = await c.post("/_pyisr/action", data=data, headers={"origin": "https://evil.example"})
        assert evil.status_code == 403 and "evil.example" in evil.text
        cross = await c.post("/_pyisr/action", data=data, headers={"sec-fetch-site": "cross-site"})
        assert cross.status_code == 403
        login = await c.post("/_pyisr/login", data={"secret": SECRET}, headers={"origin": "null"})
        assert login.status_code == 403
        assert await _invalidations(engine) == []
        same = await c.post("/_pyisr/action", data=data, headers={"origin": BASE})
        assert same.status_code == 303
    assert len(await _invalidations(engine)) == 1


async def test_signed_out_posts_are_refused(engine: Engine) -> None:
    async with client(dashboard_app(engine, secret=SECRET)) as c:
        answer = await c.post("/_pyisr/action", data={"kind": "tag", "target": "posts"})
        assert answer.status_code == 403
    assert await _invalidations(engine) == []


# -- actions ------------------------------------------------------------------------------

ACTIONS = [
    ({"kind": "path", "target": "/blog/1"}, "path", "Path /blog/1 invalidated"),
    ({"kind": "page", "target": "/blog/[id]"}, "page", "Every page of /blog/[id] invalidated"),
    ({"kind": "layout", "target": "/blog"}, "layout", "Everything under /blog invalidated"),
    ({"kind": "tag", "target": "posts", "stale": "on"}, "tag", "Tag posts marked stale"),
    ({"kind": "regenerate", "target": "/blog/2"}, "regenerate", "Regenerated /blog/2"),
]


@pytest.mark.parametrize(("form", "kind", "said"), ACTIONS, ids=[a[1] for a in ACTIONS])
async def test_actions_are_recorded_as_the_dashboards(
    engine: Engine, form: dict[str, str], kind: str, said: str
) -> None:
    async with client(dashboard_app(engine, secret=SECRET), address="192.0.2.9") as c:
        token = await sign_in(c)
        answer = await c.post("/_pyisr/action", data={**form, "csrf": token, "next": "/entries?sort=key"})
        assert answer.status_code == 303
        assert answer.headers["location"] == "/_pyisr/entries?sort=key"  # POST-redirect-GET
        shown = await c.get(answer.headers["location"])
        assert result_of(shown.text) is not None and result_of(shown.text).startswith(said)  # type: ignore[union-attr]
        assert "Max-Age=0" in shown.headers["set-cookie"]  # shown once
        again = await c.get("/_pyisr/entries")
        assert result_of(again.text) is None
    [record] = await _invalidations(engine)
    assert record.kind == kind and record.target == form["target"]
    assert record.by == "dashboard (signed in from 192.0.2.9)"
    assert record.stale == (form.get("stale") == "on")


async def test_a_failed_action_shows_its_error(engine: Engine) -> None:
    async with client(dashboard_app(engine, secret=SECRET)) as c:
        token = await sign_in(c)
        for form, error in (
            ({"kind": "regenerate", "target": "/nowhere"}, "no page at this path"),
            ({"kind": "path", "target": "/blog/[id]"}, "names a route pattern"),
            ({"kind": "path", "target": "blog"}, "must start with '/'"),
            ({"kind": "unknown", "target": "/x"}, "Unknown action"),
        ):
            answer = await c.post("/_pyisr/action", data={**form, "csrf": token, "next": "//evil.example/"})
            assert answer.headers["location"] == "/_pyisr/"  # never a redirect to another site
            shown = await c.get("/_pyisr/")
            assert 'class="result failed"' in shown.text
            assert error in (result_of(shown.text) or "").replace("&#39;", "'"), result_of(shown.text)


async def test_revalidating_a_page_changes_its_state(engine: Engine) -> None:
    async with client(dashboard_app(engine, secret=SECRET)) as c:
        token = await sign_in(c)
        entry = await c.get("/_pyisr/entry", params={"key": "/blog/1"})
        assert 'id="entry-state">fresh<' in entry.text
        await c.post("/_pyisr/action", data={"kind": "path", "target": "/blog/1", "csrf": token})
        entry = await c.get("/_pyisr/entry", params={"key": "/blog/1"})
        assert 'id="entry-state">invalidated<' in entry.text
        assert "dashboard (signed in from 127.0.0.1)" in entry.text  # explain and the invalidations list
        await fill(engine, "/blog/1", route="/blog/[id]")  # the next request renders it
        entry = await c.get("/_pyisr/entry", params={"key": "/blog/1"})
        assert 'id="entry-state">fresh<' in entry.text


# -- what the store holds is never trusted ---------------------------------------------------


async def test_keys_tags_and_messages_are_escaped(engine: Engine) -> None:
    key = "/<script>alert(1)</script>"
    await fill(engine, key, tags=("<b>bold</b>",))
    async with client(dashboard_app(engine, secret=SECRET)) as c:
        token = await sign_in(c)
        await c.post("/_pyisr/action", data={"kind": "tag", "target": "<i>x</i>", "csrf": token})
        for path in ("/_pyisr/", "/_pyisr/entries", "/_pyisr/entry?" + urlencode({"key": key})):
            html = (await c.get(path)).text
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path
            assert "<script>alert" not in html and "<b>bold" not in html and "<i>x" not in html
            assert "<script" not in html.replace(
                '<script src="/_pyisr/static/dashboard.js" defer></script>', ""
            )


# -- the pages ----------------------------------------------------------------------------


async def test_every_page_renders(engine: Engine) -> None:
    now = engine.clock()
    report = ActivityReport()
    report.hits["/blog/1"] = 7
    report.count(now, "hits", 6)
    report.count(now, "stale", 2)
    report.count(now, "misses", 2)
    report.count(now, "regenerations", 3)
    report.count(now - 120, "failures", 1)
    await engine.handler.add_activity(report, now)
    async with client(dashboard_app(engine, secret=SECRET)) as c:
        await sign_in(c)
        summary = await c.get("/_pyisr/")
        assert_security_headers(summary)
        text = summary.text
        assert 'id="entry-count">3<' in text and 'id="count-fresh">3<' in text
        assert 'id="hit-ratio">80.0 %<' in text  # (6 hits + 2 stale) of 10 answers
        assert 'id="health">OK<' in text
        assert text.count('class="ok"') == 1 and text.count('class="fail"') == 1  # the chart's bars
        assert 'name="viewport"' in text
        entries = await c.get("/_pyisr/entries")
        assert 'id="total">3<' in entries.text
        for query, shown, hidden in (
            ({"q": "blog"}, ["/blog/1", "/blog/2"], ["/about"]),
            ({"tag": "featured"}, ["/blog/2"], ["/blog/1"]),
            ({"route": "/blog/[id]"}, ["/blog/1"], ["/about"]),
            ({"state": "invalidated"}, [], ["/blog/1"]),
            ({"sort": "hits"}, ["/blog/1"], []),
        ):
            page = (await c.get("/_pyisr/entries", params=query)).text
            for key in shown:
                assert f">{key}</a>" in page, (query, key)
            for key in hidden:
                assert f">{key}</a>" not in page, (query, key)
        ordered = (await c.get("/_pyisr/entries", params={"sort": "hits"})).text
        assert ordered.index(">/blog/1</a>") < ordered.index(">/blog/2</a>")
        odd = await c.get("/_pyisr/entries", params={"state": "nonsense", "sort": "nonsense"})
        assert odd.status_code == 200 and "There is no state" in odd.text
        entry = await c.get("/_pyisr/entry", params={"key": "/blog/2"})
        assert entry.status_code == 200
        assert "Fresh until" in entry.text and "featured" in entry.text
        assert "x-pyisr-cache" in entry.text and "s-maxage=60" in entry.text  # the HIT headers
        assert 'href="/blog/2"' in entry.text  # the preview link
        missing = await c.get("/_pyisr/entry", params={"key": "/nothing"})
        assert missing.status_code == 404 and "Nothing is cached" in missing.text
        for name, kind in (("dashboard.css", "text/css"), ("dashboard.js", "text/javascript")):
            static = await c.get(f"/_pyisr/static/{name}")
            assert static.status_code == 200 and static.headers["content-type"].startswith(kind)
            assert_security_headers(static)
        assert (await c.get("/_pyisr/static/../views.py")).status_code == 404
        assert (await c.get("/_pyisr/nope")).status_code == 404


# -- where it is served -------------------------------------------------------------------

SITE_PAGE = """
revalidate = 60


def generate_static_params():
    return [{"id": "1"}]


def page(params):
    return f"<p>post {params['id']}</p>"
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    (root / "app" / "blog" / "[id]").mkdir(parents=True)
    (root / "app" / "blog" / "[id]" / "page.py").write_text(SITE_PAGE)
    return root


async def test_the_site_server_serves_it_only_with_a_secret(site: Path) -> None:
    off = App(site, config=Config(), engine=Engine(MemoryCache()))
    async with client(off) as c:
        assert (await c.get("/_pyisr/")).status_code == 404
        assert (await c.get("/_pyisr/login")).status_code == 404
    on = App(
        site, config=Config(dashboard_secret=SECRET, revalidate_secret="r" * 20), engine=Engine(MemoryCache())
    )
    async with client(on) as c:
        assert (await c.get("/_pyisr/health")).json()["status"] == "ok"  # the endpoints come first
        assert (await c.get("/_pyisr/")).headers["location"] == "/_pyisr/login"
        assert (await c.get("/blog/1")).status_code == 200
        token = await sign_in(c)
        assert ">/blog/1</a>" in (await c.get("/_pyisr/entries")).text
        await c.post("/_pyisr/action", data={"kind": "page", "target": "/blog/[id]", "csrf": token})
        entry = await c.get("/_pyisr/entry", params={"key": "/blog/1"})
        assert 'id="entry-state">invalidated<' in entry.text
        assert (await c.get("/blog/1")).headers["x-pyisr-cache"] == "MISS"
        entry = await c.get("/_pyisr/entry", params={"key": "/blog/1"})
        assert 'id="entry-state">fresh<' in entry.text
        await c.post("/_pyisr/action", data={"kind": "regenerate", "target": "/blog/1", "csrf": token})
        assert "Regenerated /blog/1" in (result_of((await c.get("/_pyisr/")).text) or "")
    await on.engine.drain()


async def test_mounted_in_fastapi(engine: Engine) -> None:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/")
    def home() -> dict[str, str]:
        return {"hello": "world"}

    app.mount("/_pyisr", dashboard_app(engine, secret=SECRET))
    async with client(app) as c:
        token = await sign_in(c)
        assert ">/blog/1</a>" in (await c.get("/_pyisr/entries")).text
        answer = await c.post("/_pyisr/action", data={"kind": "tag", "target": "posts", "csrf": token})
        assert answer.headers["location"] == "/_pyisr/"
        assert (await c.get("/")).json() == {"hello": "world"}
    assert [i.by for i in await _invalidations(engine)] == ["dashboard (signed in from 127.0.0.1)"]


def _sync_sign_in(post: Any, get: Any, mount: str) -> str:
    body = urlencode({"secret": SECRET})
    answer = post(f"{mount}/login", body)
    assert answer.status_code == 303, answer
    page = get(f"{mount}/")
    assert page.status_code == 200
    return csrf_of(page.get_data(as_text=True) if hasattr(page, "get_data") else page.content.decode())


@pytest.fixture
def sync_engine_filled(tmp_path: Path) -> Iterator[Engine]:
    from pyisr.runtime import run_sync, set_engine

    eng = Engine(MemoryCache())
    run_sync(fill(eng, "/blog/1", route="/blog/[id]"))
    set_engine(eng)
    yield eng
    set_engine(None)


def test_flask_blueprint(sync_engine_filled: Engine) -> None:
    from flask import Flask

    from pyisr.integrations.flask_dashboard import dashboard_blueprint

    app = Flask("dash")
    app.register_blueprint(dashboard_blueprint(secret=SECRET))
    c = app.test_client()
    form = "application/x-www-form-urlencoded"
    assert c.get("/_pyisr/").status_code == 303
    wrong = c.post("/_pyisr/login", data="secret=nope", content_type=form)
    assert wrong.status_code == 403
    token = _sync_sign_in(lambda url, body: c.post(url, data=body, content_type=form), c.get, "/_pyisr")
    page = c.get("/_pyisr/entries")
    assert ">/blog/1</a>" in page.get_data(as_text=True)
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    answer = c.post(
        "/_pyisr/action", data=urlencode({"kind": "tag", "target": "posts", "csrf": token}), content_type=form
    )
    assert answer.status_code == 303
    assert "Tag posts invalidated" in c.get("/_pyisr/").get_data(as_text=True)
    off = Flask("off")
    off.register_blueprint(dashboard_blueprint(secret=None))
    assert off.test_client().get("/_pyisr/").status_code == 404


def test_django_urls(sync_engine_filled: Engine) -> None:
    pytest.importorskip("django")
    from test_django_integration import configure_django

    configure_django()
    from django.test import Client, override_settings
    from django.urls import include, path

    from pyisr.integrations.django.checks import check_settings
    from pyisr.integrations.django.testing import isolated_cache

    class URLs:
        urlpatterns = [
            path("_pyisr/", include("pyisr.integrations.django.dashboard_urls")),
            path("", include("blog.urls")),  # the example's 404 page links to its views
        ]

    form = "application/x-www-form-urlencoded"
    settings = {"cache": "memory://", "dashboard_secret": SECRET}
    with override_settings(ROOT_URLCONF=URLs, PYISR=settings), isolated_cache(sync_engine_filled):
        assert not [p for p in check_settings(None) if "dashboard" in str(p)]  # a known key
        c = Client()
        assert c.get("/_pyisr/").status_code == 303
        assert c.post("/_pyisr/login", "secret=nope", content_type=form).status_code == 403
        token = _sync_sign_in(lambda url, body: c.post(url, body, content_type=form), c.get, "/_pyisr")
        cookie = c.cookies["pyisr_dashboard"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/_pyisr"
        page = c.get("/_pyisr/entries")
        assert ">/blog/1</a>" in page.content.decode()
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        body = urlencode({"kind": "path", "target": "/blog/1", "csrf": token})
        assert c.post("/_pyisr/action", body, content_type=form).status_code == 303
        assert "Path /blog/1 invalidated" in c.get("/_pyisr/").content.decode()
    with override_settings(ROOT_URLCONF=URLs, PYISR={"cache": "memory://"}):
        assert Client().get("/_pyisr/").status_code == 404
