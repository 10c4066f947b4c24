"""A FastAPI + SQLAlchemy blog whose pages pyisr caches, tagged by the rows they read.

Run it (SQLite in this folder by default; ``DATABASE_URL`` for PostgreSQL)::

    uvicorn --app-dir examples/fastapi_sqlalchemy posts_app:app --workers 2

``/posts`` (the list) and ``/posts/{id}`` (a post, or a cached 404) are ISR pages. Nothing
here calls ``revalidate_tag``: ``track(SessionLocal)`` tags each page with the rows it
read (``posts``, ``posts:3``...) and, when an edit commits, revalidates the rows it
changed, in every worker (they share the cache in ``PYISR_CACHE``, ``.pyisr/cache`` by
default). Editors (a demo ``editor=1`` cookie) and draft mode get fresh pages.
"""

from __future__ import annotations

import hmac
import html
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel
from sqlalchemy import String, Text, create_engine, exc, func, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from pyisr.draft import enable_draft_mode
from pyisr.integrations.asgi import ISRMiddleware, isr
from pyisr.integrations.sqlalchemy import track


class Base(DeclarativeBase):
    pass


class Post(Base):
    __tablename__ = "posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text, default="")


class PostIn(BaseModel):
    title: str
    body: str = ""


SEED = [
    {"title": "Hello, ISR", "body": "Pages are rendered once and served to everyone."},
    {"title": "Tags from the ORM", "body": "Each page knows the rows it read."},
    {"title": "Edits refresh pages", "body": "A commit revalidates the rows it changed."},
]


def is_editor(request: Request) -> bool:
    """Who skips the cache (a demo: check a real login or a signed cookie in your app)."""
    return request.cookies.get("editor") == "1"


def get_session(request: Request) -> Iterator[Session]:
    """One session per request (the render of a page is a request of its own)."""
    with request.app.state.sessions() as session:
        yield session


DB = Annotated[Session, Depends(get_session)]


def page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>{body}"
    )


def create_app(database_url: str) -> FastAPI:
    """The app over ``database_url`` (tests make one per database)."""
    engine = create_engine(database_url)
    SessionLocal = track(sessionmaker(engine))  # noqa: N806 - the name SQLAlchemy's docs use

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        init_db(engine)
        yield
        engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.state.sessions = SessionLocal

    @app.get("/posts")
    @isr(revalidate=3600, bypass=is_editor)
    def post_list(session: DB) -> HTMLResponse:
        posts = session.scalars(select(Post).order_by(Post.id)).all()
        items = "".join(f'<li><a href="/posts/{p.id}">{html.escape(p.title)}</a></li>' for p in posts)
        return page("Posts", f"<ul>{items}</ul><p>rendered at {time.time():.3f}</p>")

    @app.get("/posts/{post_id}")
    @isr(revalidate=3600, bypass=is_editor)
    def post_detail(post_id: int, session: DB) -> HTMLResponse:
        post = session.get(Post, post_id)
        if post is None:
            raise HTTPException(404, "no such post")  # cached too, until the post exists
        return page(post.title, f"<p>{html.escape(post.body)}</p><p>rendered at {time.time():.3f}</p>")

    @app.post("/posts", status_code=201)
    def create_post(data: PostIn, session: DB) -> dict[str, Any]:
        post = Post(title=data.title, body=data.body)
        session.add(post)
        session.commit()  # revalidates "posts" (the list) and "posts:<id>" (a cached 404)
        return {"id": post.id}

    @app.put("/posts/{post_id}")
    def edit_post(post_id: int, data: PostIn, session: DB) -> dict[str, Any]:
        post = session.get(Post, post_id)
        if post is None:
            raise HTTPException(404, "no such post")
        post.title, post.body = data.title, data.body
        session.commit()  # revalidates "posts" and "posts:<id>": the list and this post
        return {"id": post_id}

    @app.delete("/posts/{post_id}", status_code=204)
    def delete_post(post_id: int, session: DB) -> None:
        post = session.get(Post, post_id)
        if post is None:
            raise HTTPException(404, "no such post")
        session.delete(post)
        session.commit()

    @app.get("/draft")
    def draft(secret: str, path: str = "/posts") -> RedirectResponse:
        """Draft mode for whoever knows ``PYISR_DRAFT_SECRET``: fresh pages, never cached."""
        if not path.startswith("/") or not is_valid_secret(secret):
            raise HTTPException(401, "bad secret")
        response = RedirectResponse(path, status_code=303)
        return enable_draft_mode(response, secure=False)  # secure=True behind HTTPS

    @app.get("/healthz")
    def healthz() -> dict[str, int]:
        return {"pid": os.getpid()}

    # Added first, so it sits inside any middleware added later (CORS, sessions, auth).
    app.add_middleware(ISRMiddleware)
    return app


def is_valid_secret(secret: str) -> bool:
    expected = os.environ.get("PYISR_DRAFT_SECRET", "")
    return bool(expected) and hmac.compare_digest(secret.encode(), expected.encode())


def init_db(engine: Any) -> None:
    """Create the table and the first posts, once, however many workers start together."""
    for _ in range(20):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(7411)"))
                Base.metadata.create_all(conn)
                if conn.scalar(select(func.count()).select_from(Post)) == 0:
                    conn.execute(insert(Post), SEED)
            return
        except exc.DBAPIError:
            time.sleep(0.1)  # another worker was creating them: look again
    raise RuntimeError("could not create the example's tables")


#: SQLite beside this file by default (ignored by git); PostgreSQL: DATABASE_URL=postgresql+psycopg://...
DEFAULT_DATABASE = f"sqlite:///{Path(__file__).parent / 'posts.db'}"
app = create_app(os.environ.get("DATABASE_URL", DEFAULT_DATABASE))
