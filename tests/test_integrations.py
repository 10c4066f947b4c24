"""The framework integrations: ISR for Starlette/ASGI, Django and Flask views.

One suite runs against every framework (``harness``): the same app — ``/`` cached until
invalidated, ``/blog/<id>`` every 60 s tagged ``posts``, ``/other`` not cached — built
with each integration, driven by the framework's own test client over an engine with a
fake clock. Framework-specific behaviour follows the suite.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

import pyisr
from pyisr import Engine, MemoryCache
from pyisr.http import NOSTORE
from pyisr.integrations import key_for_decoded_path, pattern_from_rule
from pyisr.integrations.asgi import ISRMiddleware, compile_route
from pyisr.runtime import run_sync

django = pytest.importorskip("django")
flask = pytest.importorskip("flask")

SWR_60 = "s-maxage=60, stale-while-revalidate=31535940"


# -- the app every framework serves ------------------------------------------------------


@dataclass
class Backend:
    """What the views read: the content version, failure switches and what they saw."""

    version: int = 1
    fail: bool = False
    status: int = 200
    calls: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)

    def page(self, name: str, **seen: Any) -> tuple[int, str]:
        self.calls += 1
        self.seen.append(seen)
        if self.fail:
            raise RuntimeError("the database is down")
        return self.status, f"<h1>{name} v{self.version}</h1>"


BACKEND = Backend()


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes


class Harness:
    name = ""

    def get(self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> Resp:
        raise NotImplementedError

    def drain(self) -> None:
        """Wait for background regenerations (on the loop the framework's engine uses)."""
        raise NotImplementedError


# -- Starlette (ASGI) --------------------------------------------------------------------


def make_starlette(engine: Engine) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, PlainTextResponse
    from starlette.routing import Route

    async def blog(request: Any) -> Any:
        if request.method == "POST":
            return PlainTextResponse("posted")
        status, body = BACKEND.page(
            f"blog {request.path_params['id']}",
            query=request.url.query,
            cookies=dict(request.cookies),
            headers=dict(request.headers),
            path=request.url.path,
        )
        response = HTMLResponse(body, status_code=status, headers={"x-custom": "yes"})
        return response

    async def home(request: Any) -> Any:
        return HTMLResponse(BACKEND.page("home")[1])

    async def other(request: Any) -> Any:
        return PlainTextResponse("other")

    return Starlette(
        routes=[
            Route("/", home),
            Route("/blog/{id:int}", blog, methods=["GET", "POST"]),
            Route("/other", other),
        ],
        middleware=[
            Middleware(
                ISRMiddleware,
                routes={"/": False, "/blog/{id:int}": 60},
                tags={"/blog/{id:int}": ["posts"]},
                engine=engine,
            )
        ],
    )


class StarletteHarness(Harness):
    name = "starlette"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # starlette's TestClient on httpx is deprecated
            from starlette.testclient import TestClient

            self.client = TestClient(make_starlette(engine), raise_server_exceptions=False)
        self.client.__enter__()

    def close(self) -> None:
        self.client.__exit__(None, None, None)

    def get(self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> Resp:
        r = self.client.request(method, path, headers=headers)
        return Resp(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)

    def drain(self) -> None:
        assert self.client.portal is not None
        self.client.portal.call(self.engine.drain)


# -- Django ------------------------------------------------------------------------------


def _django_seen(request: Any) -> dict[str, Any]:
    return {
        "query": request.META.get("QUERY_STRING", ""),
        "cookies": dict(request.COOKIES),
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "path": request.path,
        "user": request.user.is_authenticated,
        # Its key, not its contents: a render that reads the session is not shared.
        "session": request.session.session_key,
        "environ_cookie": "HTTP_COOKIE" in getattr(request, "environ", {}),
    }


def _django_response(request: Any, id: int) -> Any:
    from django.http import HttpResponse

    status, body = BACKEND.page(f"blog {id}", **_django_seen(request))
    response = HttpResponse(body, status=status)
    response["X-Custom"] = "yes"
    return response


def _django_views(is_async: bool) -> tuple[Callable[..., Any], Callable[..., Any]]:
    from django.http import HttpResponse

    from pyisr.integrations.django import isr

    if is_async:

        @isr(revalidate=60, tags=["posts"])
        async def ablog(request: Any, id: int) -> Any:
            if request.method == "POST":
                return HttpResponse("posted")
            await asyncio.sleep(0)
            return _django_response(request, id)

        @isr(revalidate=False)
        async def ahome(request: Any) -> Any:
            return HttpResponse(BACKEND.page("home")[1])

        return ablog, ahome

    @isr(revalidate=60, tags=["posts"])
    def blog(request: Any, id: int) -> Any:
        if request.method == "POST":
            return HttpResponse("posted")
        return _django_response(request, id)

    @isr(revalidate=False)
    def home(request: Any) -> Any:
        return HttpResponse(BACKEND.page("home")[1])

    return blog, home


def _django_urlconf(is_async: bool) -> type:
    from django.http import HttpResponse
    from django.urls import path

    blog, home = _django_views(is_async)

    class URLs:
        urlpatterns = [
            path("", home),
            path("blog/<int:id>", blog),
            path("other", lambda request: HttpResponse("other")),
        ]

    return URLs


def _configure_django() -> None:
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        DEBUG=False,
        SECRET_KEY="pyisr-tests",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=None,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "django.contrib.sessions"],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
        ],
        SESSION_ENGINE="django.contrib.sessions.backends.signed_cookies",
        DATABASES={},
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "OPTIONS": {
                    "context_processors": ["django.contrib.auth.context_processors.auth"],
                    "loaders": [
                        (
                            "django.template.loaders.locmem.Loader",
                            {"post.html": "<p>{{ name }} user={{ user.is_authenticated }}</p>"},
                        )
                    ],
                },
            }
        ],
    )
    django.setup()


class DjangoHarness(Harness):
    def __init__(self, is_async: bool) -> None:
        from django.test import Client, override_settings

        _configure_django()
        self.name = "django-async" if is_async else "django"
        self.override = override_settings(ROOT_URLCONF=_django_urlconf(is_async))
        self.override.enable()
        self.client = Client(raise_request_exception=False)

    def close(self) -> None:
        self.override.disable()

    def get(self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> Resp:
        r = self.client.generic(method, path, headers=headers or {})
        body = b"".join(r.streaming_content) if r.streaming else r.content
        return Resp(r.status_code, {k.lower(): v for k, v in r.items()}, body)

    def drain(self) -> None:
        run_sync(pyisr.get_engine().drain())


# -- Flask -------------------------------------------------------------------------------


def make_flask(is_async: bool) -> Any:
    from flask import Flask, make_response, request

    from pyisr.integrations.flask import isr

    app = Flask("pyisr_flask_test")

    def respond(id: int) -> Any:
        status, body = BACKEND.page(
            f"blog {id}",
            query=request.query_string.decode(),
            cookies=dict(request.cookies),
            headers={k.lower(): v for k, v in request.headers.items()},
            path=request.path,
        )
        response = make_response(body, status)
        response.headers["X-Custom"] = "yes"
        return response

    if is_async:

        @app.route("/blog/<int:id>", methods=["GET", "POST"])
        @isr(revalidate=60, tags=["posts"])
        async def blog(id: int) -> Any:
            if request.method == "POST":
                return "posted"
            await asyncio.sleep(0)
            return respond(id)

    else:

        @app.route("/blog/<int:id>", methods=["GET", "POST"])
        @isr(revalidate=60, tags=["posts"])
        def blog(id: int) -> Any:
            if request.method == "POST":
                return "posted"
            return respond(id)

    @app.get("/")
    @isr(revalidate=False)
    def home() -> Any:
        return BACKEND.page("home")[1]

    @app.get("/other")
    def other() -> Any:
        return "other"

    return app


class FlaskHarness(Harness):
    def __init__(self, is_async: bool) -> None:
        self.name = "flask-async" if is_async else "flask"
        self.client = make_flask(is_async).test_client()

    def close(self) -> None:
        pass

    def get(self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> Resp:
        r = self.client.open(path, method=method, headers=headers)
        return Resp(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.get_data())

    def drain(self) -> None:
        run_sync(pyisr.get_engine().drain())


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def backend() -> Iterator[Backend]:
    global BACKEND
    BACKEND = Backend()
    yield BACKEND


@pytest.fixture(params=["starlette", "django", "django-async", "flask", "flask-async"])
def harness(request: pytest.FixtureRequest, sync_engine: Engine) -> Iterator[Harness]:
    kind = request.param
    h: Any
    if kind == "starlette":
        h = StarletteHarness(sync_engine)
    elif kind.startswith("django"):
        h = DjangoHarness(kind.endswith("async"))
    else:
        h = FlaskHarness(kind.endswith("async"))
    yield h
    h.drain()
    h.close()


# -- the shared suite --------------------------------------------------------------------


def test_miss_then_hit_with_pyisr_headers(harness: Harness, backend: Backend) -> None:
    first = harness.get("/blog/1")
    assert first.status == 200
    assert first.body == b"<h1>blog 1 v1</h1>"
    assert first.headers["x-pyisr-cache"] == "MISS"
    assert first.headers["cache-control"] == SWR_60
    assert first.headers["etag"].startswith('"')
    assert first.headers["age"] == "0"
    assert first.headers["content-type"].startswith("text/html")
    assert first.headers["content-length"] == str(len(first.body))
    assert first.headers["x-custom"] == "yes"
    assert "set-cookie" not in first.headers
    second = harness.get("/blog/1")
    assert second.headers["x-pyisr-cache"] == "HIT"
    assert second.headers["cache-status"] == "pyisr; hit"
    assert second.body == first.body and second.headers["etag"] == first.headers["etag"]
    assert backend.calls == 1


def test_query_string_and_visitor_never_reach_the_render(harness: Harness, backend: Backend) -> None:
    visitor = {"cookie": "sessionid=abc; theme=dark", "authorization": "Bearer t", "accept-language": "fr"}
    first = harness.get("/blog/1?utm=x", headers=visitor)
    assert first.headers["x-pyisr-cache"] == "MISS"
    assert harness.get("/blog/1?page=2").headers["x-pyisr-cache"] == "HIT"
    assert harness.get("/blog/1").headers["x-pyisr-cache"] == "HIT"
    assert backend.calls == 1
    seen = backend.seen[0]
    assert seen["query"] == ""
    assert seen["cookies"] == {}
    assert set(seen["headers"]) <= {"host"}, seen["headers"]
    assert seen["path"] == "/blog/1"
    if "user" in seen:  # Django
        assert seen["user"] is False and seen["session"] is None and seen["environ_cookie"] is False


def test_stale_serves_old_page_and_regenerates_once(harness: Harness, backend: Backend, clock: Any) -> None:
    harness.get("/blog/1")
    backend.version = 2
    clock.advance(61)
    stale = harness.get("/blog/1")
    assert stale.headers["x-pyisr-cache"] == "STALE"
    assert stale.headers["cache-status"] == "pyisr; hit; fwd=stale; detail=revalidating"
    assert stale.body == b"<h1>blog 1 v1</h1>"
    assert int(stale.headers["age"]) == 61
    harness.drain()
    assert backend.calls == 2, "the stale hit started one regeneration"
    fresh = harness.get("/blog/1")
    assert fresh.headers["x-pyisr-cache"] == "HIT"
    assert fresh.body == b"<h1>blog 1 v2</h1>"


def test_revalidate_tag_and_path_make_the_next_request_miss(
    harness: Harness, backend: Backend, clock: Any
) -> None:
    harness.get("/blog/1")
    backend.version = 2
    pyisr.revalidate_tag("posts")
    clock.advance(1)
    r = harness.get("/blog/1")
    assert (r.headers["x-pyisr-cache"], r.body) == ("MISS", b"<h1>blog 1 v2</h1>")
    backend.version = 3
    pyisr.revalidate_path("/blog/[id]", "page")  # the route pattern's implicit tag
    clock.advance(1)
    r = harness.get("/blog/1")
    assert (r.headers["x-pyisr-cache"], r.body) == ("MISS", b"<h1>blog 1 v3</h1>")
    backend.version = 4
    pyisr.revalidate_path("/blog/1")
    clock.advance(1)
    assert harness.get("/blog/1").body == b"<h1>blog 1 v4</h1>"


def test_revalidate_regenerates_a_page_now_as_an_anonymous_visitor(
    harness: Harness, backend: Backend, clock: Any
) -> None:
    """``pyisr.revalidate(path)`` (the Pages Router's ``res.revalidate``) in every framework."""
    harness.get("/blog/1", headers={"cookie": "sid=alice", "x-secret": "s"})
    backend.version = 2
    calls = backend.calls
    pyisr.revalidate_sync("/blog/1")
    assert backend.calls == calls + 1  # rendered now, not at the next request
    seen = backend.seen[-1]
    assert seen["cookies"] == {} and "x-secret" not in seen["headers"] and seen["query"] == ""
    clock.advance(1)
    r = harness.get("/blog/1")
    assert (r.headers["x-pyisr-cache"], r.body) == ("HIT", b"<h1>blog 1 v2</h1>")
    assert backend.calls == calls + 1

    backend.fail = True  # a failing render raises and keeps the page
    with pytest.raises(pyisr.RevalidationError, match=r"^Failed to revalidate /blog/1: "):
        pyisr.revalidate_sync("/blog/1")
    assert harness.get("/blog/1").body == b"<h1>blog 1 v2</h1>"
    backend.fail = False
    for not_isr in ("/other", "/nothing/here"):
        with pytest.raises(pyisr.RevalidationError, match="no page at this path"):
            pyisr.revalidate_sync(not_isr)


def test_a_failing_regeneration_keeps_the_last_good_page(
    harness: Harness, backend: Backend, clock: Any
) -> None:
    harness.get("/blog/1")
    backend.fail = True
    clock.advance(61)
    assert harness.get("/blog/1").body == b"<h1>blog 1 v1</h1>"
    harness.drain()
    kept = harness.get("/blog/1")
    assert (kept.status, kept.body) == (200, b"<h1>blog 1 v1</h1>")
    # Invalidated while the view fails: the old page still beats an error.
    pyisr.revalidate_tag("posts")
    clock.advance(31)
    kept = harness.get("/blog/1")
    assert (kept.status, kept.body) == (200, b"<h1>blog 1 v1</h1>")
    backend.fail = False
    backend.version = 2
    clock.advance(61)
    harness.get("/blog/1")
    harness.drain()
    assert harness.get("/blog/1").body == b"<h1>blog 1 v2</h1>"


def test_a_5xx_is_never_cached(harness: Harness, backend: Backend, clock: Any) -> None:
    backend.status = 503
    failed = harness.get("/blog/1")
    assert failed.status == 503
    assert failed.headers["cache-control"] == NOSTORE
    assert "x-pyisr-cache" not in failed.headers
    harness.get("/blog/1")
    assert backend.calls == 2
    backend.status = 200
    ok = harness.get("/blog/1")
    assert (ok.status, ok.headers["x-pyisr-cache"]) == (200, "MISS")
    # A 5xx during regeneration keeps the last good page.
    backend.status = 500
    backend.version = 2
    clock.advance(61)
    harness.get("/blog/1")
    harness.drain()
    kept = harness.get("/blog/1")
    assert (kept.status, kept.body) == (200, b"<h1>blog 1 v1</h1>")


def test_an_exception_with_nothing_cached_is_a_500_and_not_cached(harness: Harness, backend: Backend) -> None:
    backend.fail = True
    assert harness.get("/blog/1").status == 500
    backend.fail = False
    ok = harness.get("/blog/1")
    assert (ok.status, ok.headers["x-pyisr-cache"]) == (200, "MISS")


def test_head_and_if_none_match(harness: Harness, backend: Backend) -> None:
    head = harness.get("/blog/1", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.headers["x-pyisr-cache"] == "MISS"
    assert head.headers["content-length"] == str(len(b"<h1>blog 1 v1</h1>"))
    etag = head.headers["etag"]
    nm = harness.get("/blog/1", headers={"if-none-match": etag})
    assert nm.status == 304 and nm.body == b""
    assert nm.headers["etag"] == etag
    assert nm.headers["x-pyisr-cache"] == "HIT"
    other = harness.get("/blog/1", headers={"if-none-match": '"nope"'})
    assert other.status == 200 and other.body == b"<h1>blog 1 v1</h1>"
    assert backend.calls == 1


def test_other_paths_and_methods_pass_straight_through(harness: Harness, backend: Backend) -> None:
    other = harness.get("/other")
    assert other.body == b"other" and "x-pyisr-cache" not in other.headers
    posted = harness.get("/blog/1", method="POST")
    assert posted.body == b"posted" and "x-pyisr-cache" not in posted.headers
    assert backend.calls == 0


def test_revalidate_false_never_expires(harness: Harness, backend: Backend, clock: Any) -> None:
    first = harness.get("/")
    assert first.headers["cache-control"] == "s-maxage=31536000"
    clock.advance(10**7)
    assert harness.get("/").headers["x-pyisr-cache"] == "HIT"
    assert backend.calls == 1


# -- ASGI specifics ----------------------------------------------------------------------


def test_compile_route_patterns() -> None:
    blog = compile_route("/blog/{id}", 60, ["posts"])
    assert blog.match("/blog/1") == {"id": "1"} and blog.match("/blog/1/2") is None
    assert blog.match("/blog") is None
    assert blog.isr_pattern == "/blog/[id]" and blog.lifetime.revalidate == 60 and blog.tags == ("posts",)
    assert compile_route("/n/{n:int}", 1, None).match("/n/12") == {"n": "12"}
    assert compile_route("/n/{n:int}", 1, None).match("/n/x") is None
    slash = compile_route("/docs/{slug}/", False, None)
    values = slash.match("/docs/intro")
    assert values and slash.render_path(values) == "/docs/intro/" and slash.lifetime.revalidate is None
    files = compile_route("/files/{rest:path}", 5, None)
    assert files.isr_pattern == "/files/[[...rest]]"
    values = files.match("/files")
    assert values is not None and files.render_path(values) == "/files/"
    assert files.match("/files/a/b") == {"rest": "a/b"}
    root = compile_route("/", False, None)
    assert root.match("/") == {} and root.match("/x") is None
    with pytest.raises(ValueError, match="convertor"):
        compile_route("/x/{a:nope}", 1, None)
    with pytest.raises(ValueError, match="revalidate"):
        compile_route("/x", -1, None)
    with pytest.raises(ValueError, match="list of strings"):
        compile_route("/x", 1, "posts")  # type: ignore[arg-type]


def test_compile_route_uses_the_apps_own_custom_convertors() -> None:
    """Starlette's compiler: a convertor the app registered means the same to the cache."""
    from starlette.convertors import Convertor, register_url_convertor

    class Slug(Convertor[str]):
        regex = "[a-z0-9-]+"

        def convert(self, value: str) -> str:
            return value

        def to_string(self, value: str) -> str:
            return value

    register_url_convertor("pyisr_test_slug", Slug())
    route = compile_route("/posts/{slug:pyisr_test_slug}", 60, None)
    assert route.match("/posts/hello-world") == {"slug": "hello-world"}
    assert route.match("/posts/Hello") is None
    assert route.isr_pattern == "/posts/[slug]"


def test_middleware_rejects_bad_options() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        pass

    eng = Engine(MemoryCache())
    with pytest.raises(ValueError, match="not in routes"):
        ISRMiddleware(app, routes={"/a": 1}, tags={"/b": ["x"]}, engine=eng)
    with pytest.raises(ValueError, match="cookie"):
        ISRMiddleware(app, routes={"/a": 1}, engine=eng, allow_headers=["host", "Cookie"])


def _asgi_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def test_asgi_single_flight_trailing_slash_streaming_and_revalidate(engine: Engine) -> None:
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, StreamingResponse
    from starlette.routing import Route

    calls: list[str] = []

    async def doc(request: Any) -> Any:
        calls.append(request.url.path)
        await asyncio.sleep(0.05)
        return HTMLResponse(f"doc {request.path_params['slug']} #{len(calls)}")

    async def stream(request: Any) -> Any:
        async def chunks() -> Any:
            for part in (b"a", b"b", b"c"):
                yield part

        return StreamingResponse(chunks(), media_type="text/plain")

    app = ISRMiddleware(
        Starlette(routes=[Route("/docs/{slug}/", doc), Route("/stream", stream)]),
        routes={"/docs/{slug}/": 60, "/stream": 60},
        engine=engine,
    )
    async with _asgi_client(app) as client:
        responses = await asyncio.gather(*(client.get("/docs/intro") for _ in range(5)))
        assert [r.status_code for r in responses] == [200] * 5
        assert len(calls) == 1, "concurrent misses share one render"
        assert calls == ["/docs/intro/"], "rendered at the route's own path, not redirected"
        slash = await client.get("/docs/intro/?x=1")
        assert slash.headers["x-pyisr-cache"] == "HIT" and slash.text == "doc intro #1"
        streamed = await client.get("/stream")
        assert streamed.text == "abc" and streamed.headers["content-type"].startswith("text/plain")
        assert (await client.get("/stream")).headers["x-pyisr-cache"] == "HIT"
        # pyisr.revalidate(path) regenerates through the middleware's resolver.
        await pyisr.revalidate("/docs/intro")
        assert calls[-1] == "/docs/intro/"
        again = await client.get("/docs/intro")
        assert again.headers["x-pyisr-cache"] == "HIT" and again.text == "doc intro #2"
        with pytest.raises(pyisr.RevalidationError, match="404"):
            await pyisr.revalidate("/nowhere")


async def test_asgi_resolvers_chain_on_one_engine(engine: Engine) -> None:
    from starlette.responses import PlainTextResponse

    async def resolver(key: str) -> Any:
        return None

    engine.add_resolver(resolver)
    made: list[str] = []

    def app_for(name: str) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            made.append(name)
            await PlainTextResponse(name)(scope, receive, send)

        return app

    ISRMiddleware(app_for("a"), routes={"/a": 60}, engine=engine)
    ISRMiddleware(app_for("b"), routes={"/b": 60}, engine=engine)
    await pyisr.revalidate("/a")
    await pyisr.revalidate("/b")
    assert made == ["a", "b"]
    assert (await engine.inspect("/b")) is not None


async def test_asgi_passes_websockets_and_lifespan_through(engine: Engine) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    mw = ISRMiddleware(app, routes={"/": 60}, engine=engine)

    async def receive() -> Any:  # pragma: no cover
        return {}

    async def send(message: Any) -> None:  # pragma: no cover
        pass

    await mw({"type": "lifespan"}, receive, send)
    await mw({"type": "websocket", "path": "/"}, receive, send)
    assert seen == ["lifespan", "websocket"]


# -- shared helpers ----------------------------------------------------------------------


def test_rule_patterns_and_keys() -> None:
    assert pattern_from_rule("blog/<int:id>/") == "/blog/[id]"
    assert pattern_from_rule("/blog/<id>") == "/blog/[id]"
    assert pattern_from_rule("/docs/<path:rest>") == "/docs/[...rest]"
    assert pattern_from_rule("/n/<int(min=1):n>") == "/n/[n]"
    assert pattern_from_rule("^blog/(?P<id>[0-9]+)/$") is None
    assert pattern_from_rule("") == "/"
    assert key_for_decoded_path("/blog/a b/") == "/blog/a b"
    assert key_for_decoded_path("/blog/100%") == "/blog/100%25"
    assert key_for_decoded_path("/a/../index") == "/"


# -- Django and Flask specifics ----------------------------------------------------------


@pytest.mark.parametrize("is_async", [False, True])
def test_django_template_response_renders_for_an_anonymous_visitor(
    sync_engine: Engine, backend: Backend, is_async: bool
) -> None:
    from django.template.response import TemplateResponse
    from django.test import Client, override_settings
    from django.urls import path

    from pyisr.integrations.django import isr

    _configure_django()

    if is_async:

        @isr(revalidate=60)
        async def post(request: Any, name: str) -> Any:
            backend.calls += 1
            return TemplateResponse(request, "post.html", {"name": name})

    else:

        @isr(revalidate=60)
        def post(request: Any, name: str) -> Any:
            backend.calls += 1
            return TemplateResponse(request, "post.html", {"name": name})

    class URLs:
        urlpatterns = [path("p/<str:name>/", post)]

    with override_settings(ROOT_URLCONF=URLs):
        client = Client()
        first = client.get("/p/hello/", headers={"cookie": "sessionid=x"})
        assert first.content == b"<p>hello user=False</p>"
        assert first["x-pyisr-cache"] == "MISS"
        assert client.get("/p/hello/").headers["x-pyisr-cache"] == "HIT"
        assert backend.calls == 1
        pyisr.revalidate_path("/p/[name]", "page")
        sync_engine.clock.advance(1)  # type: ignore[attr-defined]
        assert client.get("/p/hello/").headers["x-pyisr-cache"] == "MISS"


def test_flask_dispatches_the_render_through_the_app(sync_engine: Engine, backend: Backend) -> None:
    from flask import Flask, abort, g

    from pyisr.integrations.flask import isr

    app = Flask("pyisr_flask_dispatch")

    @app.before_request
    def load() -> None:
        g.site = "my site"

    @app.get("/page/<name>")
    @isr(revalidate=60)
    def page(name: str) -> Any:
        backend.calls += 1
        if name == "missing":
            abort(404)
        return f"{g.site}: {name}"

    client = app.test_client()
    assert client.get("/page/a").get_data() == b"my site: a"
    gone = client.get("/page/missing")
    assert (gone.status_code, gone.headers["x-pyisr-cache"]) == (404, "MISS")
    again = client.get("/page/missing")
    assert (again.status_code, again.headers["x-pyisr-cache"]) == (404, "HIT"), "a 404 is cached"
    assert backend.calls == 2


def test_decorators_validate_their_options() -> None:
    from pyisr.integrations.django import isr as django_isr
    from pyisr.integrations.flask import isr as flask_isr

    for isr in (django_isr, flask_isr):
        with pytest.raises(ValueError, match="revalidate"):
            isr(revalidate="soon")
        with pytest.raises(ValueError, match="list of strings"):
            isr(revalidate=1, tags="posts")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="authorization"):
            isr(revalidate=1, allow_headers=["Authorization"])
