"""FastAPI and Starlette: endpoints cached where they are declared (``@isr``, route names),
CORS on cached answers whichever order the middleware is added in, bypass and draft mode,
and the example app (``examples/fastapi_sqlalchemy``) driven in-process.

Every app is a real FastAPI/Starlette app spoken to through httpx's ASGI transport.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

fastapi = pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fastapi import FastAPI, HTTPException, Request  # noqa: E402
from fastapi.middleware.cors import CORSMiddleware  # noqa: E402
from fastapi.responses import HTMLResponse, PlainTextResponse  # noqa: E402
from sqlalchemy import String  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column  # noqa: E402
from starlette.convertors import Convertor, register_url_convertor  # noqa: E402

import pyisr  # noqa: E402
from pyisr import Engine, MemoryCache, set_engine  # noqa: E402
from pyisr.draft import COOKIE, enable_draft_mode  # noqa: E402
from pyisr.http import NOSTORE  # noqa: E402
from pyisr.integrations.asgi import ISRMiddleware, isr  # noqa: E402

EXAMPLE = Path(__file__).parent.parent / "examples" / "fastapi_sqlalchemy"


class Notes(DeclarativeBase):
    pass


class Note(Notes):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(50))


class Slug(Convertor[str]):
    """A custom convertor the app registers: lower-case words and dashes."""

    regex = "[a-z]+(?:-[a-z]+)*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("slug", Slug())


@pytest.fixture
async def live() -> AsyncIterator[Engine]:
    """The process engine on the real clock (commits and renders a few µs apart)."""
    engine = Engine(MemoryCache(), render_timeout=5.0)
    set_engine(engine)
    yield engine
    await engine.drain()
    set_engine(None)


def client(app: Any, **options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", **options)


def blog(calls: list[str]) -> FastAPI:
    app = FastAPI()

    @app.get("/posts/new")
    async def new_post() -> dict[str, str]:
        calls.append("new")
        return {"form": "new post"}

    @app.get("/posts/{id}")
    @isr(revalidate=60, tags=["posts"])
    async def post_detail(id: int, request: Request) -> dict[str, Any]:
        calls.append(f"post {id}")
        if id == 404:
            raise HTTPException(404, "no such post")
        return {"id": id, "cookies": dict(request.cookies), "query": str(request.url.query)}

    @app.get("/docs/{name:slug}/")
    async def doc(name: str) -> PlainTextResponse:
        calls.append(f"doc {name}")
        return PlainTextResponse(f"doc {name} #{len(calls)}")

    @app.get("/plain/{name}")
    async def plain(name: str) -> PlainTextResponse:
        calls.append(f"plain {name}")
        return PlainTextResponse(name)

    return app


# -- where cached endpoints are declared ---------------------------------------------------------


async def test_decorated_and_named_endpoints_are_cached_as_the_router_routes_them(live: Engine) -> None:
    calls: list[str] = []
    app = blog(calls)
    app.add_middleware(ISRMiddleware, routes={"doc": 30}, tags={"doc": ["docs"]})
    async with client(app) as c:
        first = await c.get("/posts/7?utm=x", headers={"cookie": "session=alice"})
        again = await c.get("/posts/7")
        assert (first.headers["x-pyisr-cache"], again.headers["x-pyisr-cache"]) == ("MISS", "HIT")
        assert first.json() == {"id": 7, "cookies": {}, "query": ""}, "rendered for nobody in particular"
        assert again.headers["cache-control"].startswith("s-maxage=60")
        # Declared before /posts/{id}: the router sends /posts/new elsewhere, never cached.
        for _ in range(2):
            assert "x-pyisr-cache" not in (await c.get("/posts/new")).headers
        # A custom convertor, a trailing slash, a route name: one key for both spellings.
        doc = await c.get("/docs/getting-started/")
        assert (doc.headers["x-pyisr-cache"], doc.headers["cache-control"][:11]) == ("MISS", "s-maxage=30")
        assert (await c.get("/docs/getting-started")).headers["x-pyisr-cache"] == "HIT"
        assert (await c.get("/docs/Not_A_Slug/")).status_code == 404
        missing = [await c.get("/posts/404") for _ in range(2)]
        assert [(r.status_code, r.headers["x-pyisr-cache"]) for r in missing] == [(404, "MISS"), (404, "HIT")]
        assert "x-pyisr-cache" not in (await c.get("/plain/x")).headers
    entry = await live.inspect("/posts/7")
    assert entry is not None and {"posts", "_pyisr:page:/posts/[id]"} <= set(entry.tags)
    doc_entry = await live.inspect("/docs/getting-started")
    assert doc_entry is not None and "docs" in doc_entry.tags
    assert calls.count("post 7") == 1 and calls.count("new") == 2


async def test_revalidate_path_reaches_decorated_routes_with_or_without_the_slash(live: Engine) -> None:
    calls: list[str] = []
    app = blog(calls)
    app.add_middleware(ISRMiddleware, routes=["doc"])
    async with client(app) as c:
        assert (await c.get("/docs/intro/")).text == "doc intro #1"
        await pyisr.revalidate("/docs/intro")
        await pyisr.revalidate("/docs/intro/")
        again = await c.get("/docs/intro/")
        assert (again.headers["x-pyisr-cache"], again.text) == ("HIT", "doc intro #3")
        await pyisr.revalidate("/posts/3")
        assert calls[-1] == "post 3"
        with pytest.raises(pyisr.RevalidationError, match="404"):
            await pyisr.revalidate("/posts/new")


async def test_patterns_mounts_and_misnamed_routes(live: Engine) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount, Route

    async def item(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"item {request.path_params['id']}")

    api = Mount("/api", routes=[Route("/items/{id:int}", item, name="item")], name="api")
    legacy = Starlette(routes=[api, Route("/old/{id}", item)])
    app = ISRMiddleware(legacy, routes={"api:item": 60, "/old/{id}": 120})
    async with client(app) as c:
        for path, max_age in (("/api/items/3", "60"), ("/old/5", "120")):
            r = [await c.get(path) for _ in range(2)]
            assert [x.headers["x-pyisr-cache"] for x in r] == ["MISS", "HIT"]
            assert r[0].headers["cache-control"].startswith(f"s-maxage={max_age},")
    with pytest.raises(ValueError, match="name no route"):
        async with client(ISRMiddleware(legacy, routes=["nothing"])) as c:
            await c.get("/api/items/3")
    both = blog([])
    both.add_middleware(ISRMiddleware, routes=["post_detail"])
    with pytest.raises(ValueError, match="decorated with @isr and named"):
        async with client(both) as c:
            await c.get("/posts/1")
    with pytest.raises(ValueError, match="origin"):
        ISRMiddleware(legacy, allow_headers=["origin"])


# -- CORS on cached answers ----------------------------------------------------------------------


@pytest.mark.parametrize("order", ["cors-outside", "cors-inside"])
async def test_cached_answers_carry_each_visitors_cors_headers(live: Engine, order: str) -> None:
    app = blog([])
    cors = {"allow_origins": ["https://a.example", "https://b.example"]}
    if order == "cors-outside":  # the documented order: ISRMiddleware added first
        app.add_middleware(ISRMiddleware)
        app.add_middleware(CORSMiddleware, **cors)
    else:
        app.add_middleware(CORSMiddleware, **cors)
        app.add_middleware(ISRMiddleware)
    async with client(app) as c:
        a = await c.get("/posts/1", headers={"origin": "https://a.example"})
        b = await c.get("/posts/1", headers={"origin": "https://b.example"})
        evil = await c.get("/posts/1", headers={"origin": "https://evil.example"})
        none = await c.get("/posts/1")
    assert [r.headers["x-pyisr-cache"] for r in (a, b, evil, none)] == ["MISS", "HIT", "HIT", "HIT"]
    assert a.headers["access-control-allow-origin"] == "https://a.example"
    assert b.headers["access-control-allow-origin"] == "https://b.example", "never a's origin"
    assert "access-control-allow-origin" not in evil.headers
    for response in (a, b, evil, none):
        assert "origin" in response.headers.get("vary", "").lower(), "shared caches keep one copy per origin"
    entry = await live.inspect("/posts/1")
    assert entry is not None and not any(k.startswith("access-control") for k in entry.headers)


# -- bypass and draft mode -----------------------------------------------------------------------


async def test_bypassed_visitors_and_draft_mode_get_fresh_pages_never_stored(
    live: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYISR_DRAFT_SECRET", "preview-secret")
    calls: list[str] = []
    app = FastAPI()

    @app.get("/article/{slug}")
    @isr(revalidate=60, bypass=lambda request: request.headers.get("x-editor") == "yes")
    async def article(slug: str, request: Request) -> HTMLResponse:
        calls.append(slug)
        return HTMLResponse(f"{slug} for {request.cookies.get('user', 'anyone')} #{len(calls)}")

    @app.get("/preview")
    async def preview() -> HTMLResponse:
        return enable_draft_mode(HTMLResponse("draft mode on"), secure=False)

    app.add_middleware(ISRMiddleware, bypass=lambda request: request.cookies.get("user") == "admin")
    async with client(app) as c:
        admin = await c.get("/article/a", headers={"cookie": "user=admin"})
        editor = await c.get("/article/a", headers={"x-editor": "yes"})
        for response in (admin, editor):
            assert response.headers["x-pyisr-cache"] == "BYPASS"
            assert response.headers.get_list("cache-control") == [NOSTORE]
        assert admin.text == "a for admin #1", "the visitor's own request"
        assert await live.inspect("/article/a") is None, "a bypassed render is never stored"
        shared = await c.get("/article/a", headers={"cookie": "user=bob"})
        assert (shared.headers["x-pyisr-cache"], shared.text) == ("MISS", "a for anyone #3")
        assert (await c.get("/preview")).status_code == 200
        assert COOKIE in c.cookies
        drafted = await c.get("/article/a")
        assert (drafted.headers["x-pyisr-cache"], drafted.text) == ("BYPASS", "a for anyone #4")
        c.cookies.clear()
        assert (await c.get("/article/a")).headers["x-pyisr-cache"] == "HIT"


# -- SQLAlchemy: the example app and async sessions --------------------------------------------


@pytest.fixture
def posts_app(tmp_path: Path) -> Iterator[Any]:
    sys.path.insert(0, str(EXAMPLE))
    try:
        import posts_app as module
    finally:
        sys.path.remove(str(EXAMPLE))
    yield module.create_app(f"sqlite:///{tmp_path / 'posts.db'}")


async def test_the_example_app_refreshes_pages_when_they_change(live: Engine, posts_app: Any) -> None:
    async with posts_app.router.lifespan_context(posts_app), client(posts_app) as c:
        for path in ("/posts", "/posts/1", "/posts/2", "/posts/4"):
            await c.get(path)
        assert (await c.get("/posts/1")).headers["x-pyisr-cache"] == "HIT"
        assert (await c.put("/posts/1", json={"title": "Edited title"})).status_code == 200
        detail, listing = await c.get("/posts/1"), await c.get("/posts")
        assert detail.headers["x-pyisr-cache"] == "MISS" and "Edited title" in detail.text
        assert listing.headers["x-pyisr-cache"] == "MISS" and "Edited title" in listing.text
        assert (await c.get("/posts/2")).headers["x-pyisr-cache"] == "HIT", "other posts keep their page"
        assert (await c.delete("/posts/2")).status_code == 204
        gone = [await c.get("/posts/2") for _ in range(2)]
        assert [(r.status_code, r.headers["x-pyisr-cache"]) for r in gone] == [(404, "MISS"), (404, "HIT")]
        assert (await c.post("/posts", json={"title": "Fourth"})).json() == {"id": 4}
        created = await c.get("/posts/4")
        assert (created.status_code, created.headers["x-pyisr-cache"]) == (200, "MISS"), "the cached 404 went"
        assert "Fourth" in (await c.get("/posts")).text
        editor = await c.get("/posts/1", headers={"cookie": "editor=1"})
        assert editor.headers["x-pyisr-cache"] == "BYPASS"


async def test_async_endpoints_with_async_sessions_are_tagged_and_refreshed(
    live: Engine, tmp_path: Path
) -> None:
    pytest.importorskip("aiosqlite")
    from sqlalchemy import insert
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from pyisr.integrations.sqlalchemy import track

    database = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'notes.db'}")
    async with database.begin() as conn:
        await conn.run_sync(Notes.metadata.create_all)
        await conn.execute(insert(Note), [{"id": 1, "text": "hello"}])
    sessions = track(async_sessionmaker(database))
    app = FastAPI()

    @app.get("/notes/{id}")
    @isr(revalidate=False)
    async def note(id: int) -> PlainTextResponse:
        async with sessions() as session:
            found = await session.get(Note, id)
        if found is None:
            raise HTTPException(404)
        return PlainTextResponse(found.text)

    @app.post("/notes/{id}")
    async def edit(id: int, request: Request) -> PlainTextResponse:
        async with sessions() as session:
            found = await session.get(Note, id)
            assert found is not None
            found.text = (await request.body()).decode()
            await session.commit()
        return PlainTextResponse("ok")

    app.add_middleware(ISRMiddleware)
    async with client(app) as c:
        assert (await c.get("/notes/1")).text == "hello"
        assert (await c.get("/notes/1")).headers["x-pyisr-cache"] == "HIT"
        await c.post("/notes/1", content=b"changed")
        after = await c.get("/notes/1")
        assert (after.headers["x-pyisr-cache"], after.text) == ("MISS", "changed")
    entry = await live.inspect("/notes/1")
    assert entry is not None and "notes:1" in entry.tags
    await database.dispose()
