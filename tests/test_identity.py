"""Shared pages never carry a visitor's identity: the engine's rule and each integration.

The attacks, each done as the attacker did it, in-process against the real frameworks
(Starlette with its ``SessionMiddleware``, Django with ``CsrfViewMiddleware``, Flask
with its signed-cookie session): one visitor's session, cookie, CSRF secret or Host
must never reach another visitor through a cached response.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import pytest

import pyisr
from pyisr import CacheStatus, Engine, NotShareable, Rendered
from pyisr.cache.shareable import unshareable_reason
from pyisr.engine import PRIVATE_RETRY, RenderPolicy
from pyisr.http import NOSTORE
from pyisr.integrations.asgi import ISRMiddleware
from pyisr.origin import CanonicalOrigin, Origin, host_allowed, parse_site_url
from pyisr.runtime import run_sync

django = pytest.importorskip("django")
flask = pytest.importorskip("flask")


# -- the rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Set-Cookie": "a=1"}, "sets a cookie"),
        ([("content-type", "text/html"), ("set-cookie", "a=1"), ("set-cookie", "b=2")], "sets a cookie"),
        ({"Cache-Control": "private, max-age=60"}, "says Cache-Control: private"),
        ({"cache-control": "public, no-store"}, "says Cache-Control: no-store"),
        ({"cache-control": 'private="set-cookie"'}, "says Cache-Control: private"),
        ({"Vary": "Accept-Encoding, *"}, "says Vary: *"),
        ({"cache-control": "public, max-age=60", "vary": "accept-encoding"}, None),
        ({"cache-control": "no-cache"}, None),
    ],
)
def test_what_makes_a_response_unshareable(headers: Any, reason: str | None) -> None:
    assert unshareable_reason(headers) == reason


class CookiePage:
    """A render that sets a new cookie each time, until told to stop."""

    def __init__(self) -> None:
        self.calls = 0
        self.sets_cookie = True

    async def __call__(self) -> Rendered:
        self.calls += 1
        headers = {"set-cookie": f"session={self.calls}"} if self.sets_cookie else {}
        return Rendered(f"page {self.calls}", headers=headers)


POLICY = RenderPolicy(revalidate=60, route="/account")


async def test_an_unshareable_render_goes_to_its_caller_only_and_is_never_stored(
    engine: Engine, clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    page = CookiePage()
    caplog.set_level(logging.WARNING, logger="pyisr")
    first, *joined = await asyncio.gather(*(engine.get("/account", page, POLICY) for _ in range(4)))
    assert first.status is CacheStatus.PRIVATE and first.entry is not None
    assert first.entry.headers["set-cookie"] == "session=1", "the caller whose request rendered it"
    assert all(s.status is CacheStatus.PRIVATE and s.entry is None for s in joined), (
        "callers that joined the render must render for their own visitor, never get its cookie"
    )
    assert await engine.inspect("/account") is None
    assert page.calls == 1
    # For a while the key is served per visitor without a shared render at all.
    again = await engine.get("/account", page, POLICY)
    assert (again.status, again.entry, page.calls) == (CacheStatus.PRIVATE, None, 1)
    assert engine.is_private("/account")
    # Then a shared render is tried again; once it stops setting a cookie, it is cached.
    clock.advance(PRIVATE_RETRY)
    page.sets_cookie = False
    served = await engine.get("/account", page, POLICY)
    assert served.status is CacheStatus.MISS and served.entry is not None
    assert (await engine.get("/account", page, POLICY)).status is CacheStatus.HIT
    assert not engine.is_private("/account")
    warnings = [r.getMessage() for r in caplog.records if "served uncached" in r.getMessage()]
    assert warnings == ["/account sets a cookie: served uncached"], "one warning per route and reason"


async def test_a_regeneration_that_turns_private_keeps_the_good_page_out_of_harms_way(
    engine: Engine, clock: Any
) -> None:
    page = CookiePage()
    page.sets_cookie = False
    await engine.get("/account", page, POLICY)
    page.sets_cookie = True
    clock.advance(61)
    stale = await engine.get("/account", page, POLICY)
    assert stale.status is CacheStatus.STALE
    await engine.drain()
    assert engine.is_private("/account")
    stored = await engine.inspect("/account")
    assert stored is not None and "set-cookie" not in stored.headers, "the cookie render was not stored"
    assert (await engine.get("/account", page, POLICY)).status is CacheStatus.PRIVATE


async def test_revalidate_now_refuses_to_store_an_unshareable_page(engine: Engine) -> None:
    with pytest.raises(NotShareable, match="/account sets a cookie, so it is served uncached"):
        await engine.revalidate_now("/account", CookiePage(), POLICY)
    assert await engine.inspect("/account") is None


async def test_stored_headers_hold_nothing_pyisr_writes_itself(engine: Engine) -> None:
    async def render() -> Rendered:
        headers = {"Cache-Control": "max-age=5", "ETag": '"x"', "Date": "now", "Vary": "Accept", "X-A": "1"}
        return Rendered("ok", headers=headers)

    served = await engine.get("/p", render, RenderPolicy(revalidate=60))
    assert served.entry is not None and served.entry.headers == {"x-a": "1"}


# -- the canonical origin ---------------------------------------------------------------------


def test_site_url_and_allowed_hosts() -> None:
    assert parse_site_url("https://WWW.Example.com/") == Origin("https", "www.example.com")
    for bad in ("www.example.com", "ftp://x", "https://x/blog", "https://u@x", "https://x?y=1"):
        with pytest.raises(ValueError, match="site_url"):
            parse_site_url(bad)
    assert host_allowed("a.example.com:8000", [".example.com"])
    assert host_allowed("example.com", [".example.com"])
    assert host_allowed("a.example.com", ["*.example.com"])
    assert not host_allowed("example.com", ["*.example.com"])
    assert not host_allowed("evil.example", ["*"]), "'*' vouches for no host"
    assert not host_allowed("evil.example/x", ["evil.example/x"])
    origin = CanonicalOrigin(None, ["www.example.com", "*.example.com"])
    assert origin.for_request("https", "a.example.com") == Origin("https", "a.example.com")
    assert origin.for_request("http", "evil.example") == Origin("http", "www.example.com")
    assert origin.default() == Origin("http", "www.example.com")
    pinned = CanonicalOrigin("https://www.example.com", ["a.example.com"])
    assert pinned.for_request("http", "a.example.com") == Origin("https", "www.example.com")


def test_nothing_configured_means_localhost_and_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("PYISR_SITE_URL", raising=False)
    origin = CanonicalOrigin()
    caplog.set_level(logging.WARNING, logger="pyisr")
    assert origin.for_request("http", "evil.example") == Origin("http", "localhost")
    assert origin.default() == Origin("http", "localhost")
    assert sum("need site_url" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setenv("PYISR_SITE_URL", "https://env.example.com")
    assert CanonicalOrigin().default() == Origin("https", "env.example.com")


# -- Starlette: SessionMiddleware + ISRMiddleware -----------------------------------------------


def _session_app(engine: Engine, *, isr_outside: bool, **options: Any) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.sessions import SessionMiddleware
    from starlette.responses import HTMLResponse, PlainTextResponse
    from starlette.routing import Route

    async def login(request: Any) -> Any:
        request.session["user"] = request.path_params["name"]
        return PlainTextResponse("ok")

    async def hello(request: Any) -> Any:
        return HTMLResponse(f"hello {request.session.get('user', 'anonymous')}")

    async def page(request: Any) -> Any:
        state = getattr(request.state, "who", "nobody")
        client = request.client.host if request.client else None
        return HTMLResponse(f"{request.url_for('page')} state={state} client={client} db={request.state.db}")

    async def mark(request: Any, call_next: Any) -> Any:
        request.state.who = request.headers.get("x-user", "nobody")
        return await call_next(request)

    from starlette.middleware.base import BaseHTTPMiddleware

    isr = Middleware(ISRMiddleware, routes={"/hello": 60, "/page": 60}, engine=engine, **options)
    session = Middleware(SessionMiddleware, secret_key="k")
    visitor_state = Middleware(BaseHTTPMiddleware, dispatch=mark)
    stack = [isr, session, visitor_state] if isr_outside else [session, visitor_state, isr]

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield {"db": "pool"}

    return Starlette(
        routes=[Route("/login/{name}", login), Route("/hello", hello), Route("/page", page, name="page")],
        middleware=stack,
        lifespan=lifespan,
    )


def _client(app: Any, **options: Any) -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's TestClient on httpx is deprecated
        from starlette.testclient import TestClient

        return TestClient(app, **options)


@pytest.mark.parametrize("isr_outside", [False, True])
def test_starlette_sessions_never_reach_another_visitor(sync_engine: Engine, isr_outside: bool) -> None:
    with _client(_session_app(sync_engine, isr_outside=isr_outside)) as client:
        jars = {}
        for name in ("alice", "bob"):
            client.cookies.clear()
            client.get(f"/login/{name}")
            jars[name] = dict(client.cookies)
        client.cookies.clear()
        seen = {}
        for name in ("alice", "anonymous", "bob", "alice"):
            client.cookies.clear()
            client.cookies.update(jars.get(name, {}))
            response = client.get("/hello")
            assert len(response.headers.get_list("cache-control")) == 1
            seen[name] = response
        assert "alice" not in seen["anonymous"].text and "alice" not in seen["bob"].text
        if not isr_outside:
            # The render read the (empty) session: each visitor gets their own page.
            assert seen["alice"].text == "hello alice"
            assert seen["bob"].text == "hello bob"
            assert seen["anonymous"].text == "hello anonymous"
            assert seen["alice"].headers["cache-control"] == NOSTORE
            assert run_sync(sync_engine.inspect("/hello")) is None
        else:
            # Sessions inside the middleware never see the visitor's cookie: one shared page.
            assert seen["alice"].text == seen["bob"].text == "hello anonymous"


def test_starlette_render_scope_has_no_visitor_state_client_or_host(sync_engine: Engine) -> None:
    app = _session_app(sync_engine, isr_outside=False, site_url="https://www.example.com")
    with _client(app, base_url="http://evil.example", client=("203.0.113.9", 4000)) as client:
        first = client.get("/page", headers={"x-user": "alice"})
        assert first.headers["x-pyisr-cache"] == "MISS"
        assert first.text == "https://www.example.com/page state=nobody client=None db=pool"
        # A HIT with a forged Host, then revalidate(): still the canonical origin.
        client.get("/page", headers={"host": "other.example", "x-user": "bob"})
        client.portal.call(pyisr.revalidate, "/page")
        again = client.get("/page")
        assert again.headers["x-pyisr-cache"] == "HIT"
        assert again.text == first.text


def test_asgi_allowed_hosts_lend_their_host_and_others_get_the_default(sync_engine: Engine) -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def where(request: Any) -> Any:
        return PlainTextResponse(str(request.base_url))

    app = Starlette(
        routes=[Route("/where/{n}", where)],
        middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=["good.example", "*.good.example"]),
            Middleware(ISRMiddleware, routes={"/where/{n}": 60}, engine=sync_engine),
        ],
    )
    with _client(app, base_url="http://good.example") as client:
        assert client.get("/where/1").text == "http://good.example/"
        assert client.get("/where/2", headers={"host": "a.good.example"}).text == "http://a.good.example/"
        client.portal.call(pyisr.revalidate, "/where/3")
        assert client.get("/where/3").text == "http://good.example/"


# -- Django: the CSRF secret ----------------------------------------------------------------------


def _django_site() -> Any:
    from test_integrations import _configure_django

    _configure_django()
    from django.http import HttpResponse
    from django.shortcuts import render
    from django.urls import path

    from pyisr.integrations.django import isr

    @isr(revalidate=60)
    def form(request: Any) -> Any:
        return render(request, "form.html")

    @isr(revalidate=60)
    def seen(request: Any) -> Any:
        meta = request.META
        return HttpResponse(
            f"host={request.get_host()} addr={meta.get('REMOTE_ADDR')} csrf={'CSRF_COOKIE' in meta} "
            f"lang={getattr(request, 'LANGUAGE_CODE', None)} cookies={request.COOKIES} "
            f"user={request.user.is_authenticated} url={request.build_absolute_uri()}"
        )

    def post(request: Any) -> Any:
        return HttpResponse("posted")

    class URLs:
        urlpatterns = [path("form", form), path("seen", seen), path("post", post)]

    return URLs


def _mark_visitor(get_response: Any) -> Any:
    """A visitor middleware: what it sets on the request must never reach a shared render."""

    def middleware(request: Any) -> Any:
        request.LANGUAGE_CODE = "fr"
        return get_response(request)

    return middleware


@pytest.fixture
def django_site(sync_engine: Engine) -> Iterator[Any]:
    from django.test import override_settings

    templates = [
        {
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "OPTIONS": {
                "context_processors": ["django.template.context_processors.csrf"],
                "loaders": [
                    (
                        "django.template.loaders.locmem.Loader",
                        {"form.html": "<form method=post>{% csrf_token %}</form>"},
                    )
                ],
            },
        }
    ]
    middleware = [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "test_identity._mark_visitor",
    ]
    with override_settings(
        ROOT_URLCONF=_django_site(), TEMPLATES=templates, MIDDLEWARE=middleware, ALLOWED_HOSTS=["*"]
    ):
        yield


def _page_token(body: bytes) -> str:
    import re

    found = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', body)
    assert found, body
    return found.group(1).decode()


def test_django_csrf_secret_of_one_visitor_never_reaches_another(
    django_site: Any, sync_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    from django.middleware.csrf import _unmask_cipher_token
    from django.test import Client

    caplog.set_level(logging.WARNING, logger="pyisr")
    first, second = Client(enforce_csrf_checks=True), Client(enforce_csrf_checks=True)
    page1 = first.get("/form")
    secret1 = page1.cookies["csrftoken"].value
    assert _unmask_cipher_token(_page_token(page1.content)) == secret1
    assert page1["Cache-Control"] == NOSTORE
    page2 = second.get("/form")
    token2 = _page_token(page2.content)
    assert _unmask_cipher_token(token2) != secret1, "the first visitor's secret was published"
    assert _unmask_cipher_token(token2) == second.cookies["csrftoken"].value
    assert second.post("/post", {"csrfmiddlewaretoken": token2}).status_code == 200, "forms work"
    assert run_sync(sync_engine.inspect("/form")) is None, "never stored"
    assert any("/form uses the CSRF token" in r.getMessage() for r in caplog.records)


def test_django_shared_render_is_a_fresh_request(django_site: Any, sync_engine: Engine) -> None:
    from django.test import Client

    client = Client(REMOTE_ADDR="203.0.113.9", HTTP_HOST="evil.example")
    client.cookies["sessionid"] = "abc"
    client.cookies["csrftoken"] = "v" * 32  # the visitor's CSRF secret: META["CSRF_COOKIE"]
    first = client.get("/seen?q=1")
    assert first["x-pyisr-cache"] == "MISS"
    body = first.content.decode()
    assert body == (
        "host=localhost addr=None csrf=False lang=None cookies={} user=False url=http://localhost/seen"
    )
    # A forged Host on a HIT, then revalidate(): the canonical host, no "last request's host".
    client.get("/seen", HTTP_HOST="other.example")
    pyisr.revalidate_sync("/seen")
    assert client.get("/seen").content.decode() == body


def test_django_site_url_and_allowed_hosts(django_site: Any, sync_engine: Engine) -> None:
    from django.test import Client, override_settings

    with override_settings(ALLOWED_HOSTS=["www.example.com", ".example.com"]):
        client = Client()
        lent = client.get("/seen", HTTP_HOST="a.example.com").content.decode()
        assert "host=a.example.com" in lent
        pyisr.revalidate_sync("/seen")
        assert "host=www.example.com" in client.get("/seen", HTTP_HOST="a.example.com").content.decode()


# -- Flask: the session ------------------------------------------------------------------------


def _flask_app() -> Any:
    from flask import Flask, request, session

    from pyisr.integrations.flask import isr

    app = Flask("pyisr_identity")
    app.secret_key = "k"

    @app.get("/login/<name>")
    def login(name: str) -> Any:
        session["user"] = name
        return "ok"

    @app.get("/hello")
    @isr(revalidate=60)
    def hello() -> Any:
        return f"hello {session.get('user', 'anonymous')}"

    @app.get("/visit")
    @isr(revalidate=60)
    def visit() -> Any:
        session["visits"] = session.get("visits", 0) + 1
        return f"visits {session['visits']}"

    @app.get("/where")
    @isr(revalidate=60)
    def where() -> Any:
        return f"{request.host_url} addr={request.remote_addr}"

    return app


def test_flask_session_of_one_visitor_never_reaches_another(sync_engine: Engine) -> None:
    app = _flask_app()
    alice, bob, anonymous = app.test_client(), app.test_client(), app.test_client()
    alice.get("/login/alice")
    bob.get("/login/bob")
    assert alice.get("/hello").get_data(as_text=True) == "hello alice"
    assert anonymous.get("/hello").get_data(as_text=True) == "hello anonymous"
    assert bob.get("/hello").get_data(as_text=True) == "hello bob"
    assert alice.get("/hello").headers["Cache-Control"] == NOSTORE
    assert run_sync(sync_engine.inspect("/hello")) is None


def test_flask_session_writes_in_a_cached_view_are_kept(sync_engine: Engine) -> None:
    app = _flask_app()
    client = app.test_client()
    assert client.get("/visit").get_data(as_text=True) == "visits 1"
    assert client.get("/visit").get_data(as_text=True) == "visits 2", "the write reached the visitor"


def test_flask_forged_host_never_reaches_a_shared_render(sync_engine: Engine) -> None:
    app = _flask_app()
    client = app.test_client()
    first = client.get(
        "/where", headers={"host": "evil.example"}, environ_base={"REMOTE_ADDR": "203.0.113.9"}
    )
    assert first.get_data(as_text=True) == "http://localhost/ addr=None"
    client.get("/where", headers={"host": "other.example"})
    with app.app_context():
        pyisr.revalidate_sync("/where")
    assert client.get("/where").get_data(as_text=True) == "http://localhost/ addr=None"
    app.config["SERVER_NAME"] = "good.example"
    pyisr.revalidate_path("/where")
    sync_engine.clock.advance(1)  # type: ignore[attr-defined]
    assert (
        client.get("/where", base_url="http://good.example")
        .get_data(as_text=True)
        .startswith("http://good.example/")
    )


# -- every integration: private / no-store / Vary: * responses keep out of every cache -------


def _private_views() -> tuple[Any, Any, Any]:
    """The same three views in Starlette, Django and Flask: each says it is not shareable."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    headers = {"/private": {"cache-control": "private, max-age=60"}, "/vary": {"vary": "*"}}
    counter = {"n": 0}

    def body() -> str:
        counter["n"] += 1
        return f"render {counter['n']}"

    async def star(request: Any) -> Any:
        return HTMLResponse(body(), headers=headers[request.url.path])

    asgi = Starlette(routes=[Route("/private", star), Route("/vary", star)])

    from django.http import HttpResponse
    from django.urls import path

    from pyisr.integrations.django import isr as django_isr

    @django_isr(revalidate=60)
    def dj(request: Any) -> Any:
        response = HttpResponse(body())
        for name, value in headers[request.path].items():
            response[name] = value
        return response

    class URLs:
        urlpatterns = [path("private", dj), path("vary", dj)]

    from flask import Flask, request

    from pyisr.integrations.flask import isr as flask_isr

    app = Flask("pyisr_private")

    @app.get("/private", endpoint="private")
    @app.get("/vary", endpoint="vary")
    @flask_isr(revalidate=60)
    def fl() -> Any:
        return body(), 200, headers[request.path]

    return asgi, URLs, app


@pytest.mark.parametrize("framework", ["starlette", "django", "flask"])
def test_integrations_never_store_private_no_store_or_vary_star(sync_engine: Engine, framework: str) -> None:
    from django.test import Client, override_settings
    from test_integrations import _configure_django

    _configure_django()
    asgi, urls, flask_app = _private_views()
    expected = {"/private": "private, max-age=60", "/vary": NOSTORE}
    with override_settings(ROOT_URLCONF=urls):
        if framework == "starlette":
            app = ISRMiddleware(asgi, routes={"/private": 60, "/vary": 60}, engine=sync_engine)
            client: Any = _client(app)
        elif framework == "django":
            client = Client()
        else:
            client = flask_app.test_client()
        for path, cache_control in expected.items():
            first, second = client.get(path), client.get(path)
            for response in (first, second):
                assert response.headers.get("x-pyisr-cache") is None
                values = [v for k, v in response.headers.items() if k.lower() == "cache-control"]
                assert values == [cache_control], (path, values)
            assert run_sync(sync_engine.inspect(path)) is None
