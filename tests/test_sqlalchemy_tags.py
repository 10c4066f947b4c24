"""Automatic tags from SQLAlchemy (``pyisr.integrations.sqlalchemy``).

Pages are rendered by a real engine (``Engine.get``, so sync renders run in pyisr's render
threads with the render context copied) over real SQLite databases; what a page read is
read back from its stored entry, and what a commit changed from the entries that are
invalidated afterwards. No framework: the integrations have their own suites.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import Column, ForeignKey, Table, create_engine, func, insert, select, text, update  # noqa: E402
from sqlalchemy.orm import (  # noqa: E402
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
    sessionmaker,
)

from pyisr import Engine, Rendered  # noqa: E402
from pyisr.cache.filesystem import FileSystemCache  # noqa: E402
from pyisr.cache.tier import MemoryTier  # noqa: E402
from pyisr.engine import CacheStatus  # noqa: E402
from pyisr.integrations.sqlalchemy import revalidate_table, track, untracked  # noqa: E402
from pyisr.runtime import run_sync  # noqa: E402


class Base(DeclarativeBase):
    pass


post_labels = Table(
    "post_labels",
    Base.metadata,
    Column("post_id", ForeignKey("posts.id"), primary_key=True),
    Column("label_id", ForeignKey("labels.id"), primary_key=True),
)


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    comments: Mapped[list[Comment]] = relationship(back_populates="post", cascade="all, delete-orphan")
    labels: Mapped[list[Label]] = relationship(secondary=post_labels)


class Comment(Base):
    __tablename__ = "comments"
    id: Mapped[int] = mapped_column(primary_key=True)
    post_id: Mapped[int] = mapped_column(ForeignKey("posts.id"))
    text: Mapped[str] = mapped_column(default="")
    post: Mapped[Post] = relationship(back_populates="comments")


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = create_engine(f"sqlite:///{tmp_path / 'posts.db'}")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(Post), [{"id": i, "title": f"post {i}"} for i in (1, 2, 3)])
        conn.execute(insert(Comment), [{"id": 1, "post_id": 1, "text": "first"}])
    yield track(sessionmaker(engine))
    engine.dispose()


def page(db: sessionmaker[Session], read: Callable[[Session], object]) -> Callable[[], Rendered]:
    """A page render that reads through the tracked sessions, as a view would."""

    def render() -> Rendered:
        with db() as session:
            return Rendered(repr(read(session)))

    return render


def get(engine: Engine, key: str, render: Callable[[], Rendered]) -> tuple[CacheStatus, str]:
    served = run_sync(engine.get(key, render))
    assert served.entry is not None
    return served.status, served.entry.body.decode()


def tags_of(engine: Engine, key: str) -> set[str]:
    entry = run_sync(engine.inspect(key))
    assert entry is not None, f"{key} is not stored"
    return {t for t in entry.tags if not t.startswith("_pyisr:")}


def title(session: Session, id: int) -> str | None:
    post = session.get(Post, id)
    return post.title if post is not None else None


# -- reads: what a page is tagged with ------------------------------------------------------------


def test_a_lookup_by_key_tags_the_row_and_a_list_tags_the_table(
    sync_engine: Engine, db: sessionmaker[Session]
) -> None:
    get(sync_engine, "/posts/1", page(db, lambda s: title(s, 1)))
    get(sync_engine, "/posts/9", page(db, lambda s: title(s, 9)))  # the view's 404
    get(sync_engine, "/posts", page(db, lambda s: s.scalars(select(Post)).all()))
    get(sync_engine, "/count", page(db, lambda s: s.scalar(select(func.count()).select_from(Post))))
    get(sync_engine, "/where", page(db, lambda s: s.scalars(select(Post).where(Post.id == 2)).all()))
    assert tags_of(sync_engine, "/posts/1") == {"posts:1", "posts:*"}
    assert tags_of(sync_engine, "/posts/9") == {"posts:9", "posts:*"}, "creating post 9 will refresh it"
    assert tags_of(sync_engine, "/posts") == {"posts", "posts:1", "posts:2", "posts:3"}
    assert tags_of(sync_engine, "/count") == {"posts"}
    assert tags_of(sync_engine, "/where") == {"posts:2", "posts:*"}


def test_related_rows_tag_their_tables_however_they_load(
    sync_engine: Engine, db: sessionmaker[Session]
) -> None:
    def lazy(s: Session) -> object:
        return [c.text for c in s.get(Post, 1).comments] + [c.post.title for c in s.scalars(select(Comment))]

    get(sync_engine, "/lazy", page(db, lazy))
    # A joined eager load adds its table when the statement is compiled, even when the
    # collection is empty: the first comment on post 2 must refresh this page.
    get(
        sync_engine,
        "/joined",
        page(db, lambda s: s.get(Post, 2, options=[joinedload(Post.comments)]).comments),
    )
    get(sync_engine, "/labels", page(db, lambda s: s.get(Post, 3).labels))
    assert {"posts:1", "comments", "comments:1"} <= tags_of(sync_engine, "/lazy")
    assert tags_of(sync_engine, "/joined") >= {"posts:2", "comments"}
    assert tags_of(sync_engine, "/labels") >= {"posts:3", "labels", "post_labels"}


def test_a_large_read_tags_its_table_only(tmp_path: Path, sync_engine: Engine) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'big.db'}")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(Post), [{"id": i, "title": str(i)} for i in range(1, 301)])
    few = track(sessionmaker(engine), max_row_tags=10)
    get(sync_engine, "/all", page(few, lambda s: s.scalars(select(Post)).all()))
    get(sync_engine, "/gets", page(few, lambda s: [s.get(Post, i) for i in range(1, 31)]))
    assert len(tags_of(sync_engine, "/all")) <= 11 and "posts" in tags_of(sync_engine, "/all")
    gets = tags_of(sync_engine, "/gets")
    assert len(gets) <= 12 and "posts" in gets, "lookups past the limit fall back to the table"


def test_untracked_views_and_code_outside_renders_tag_nothing(
    sync_engine: Engine, db: sessionmaker[Session]
) -> None:
    @untracked
    def view(session: Session) -> object:
        return title(session, 1)

    get(sync_engine, "/off", page(db, view))
    assert tags_of(sync_engine, "/off") == set()

    def block(session: Session) -> object:
        with untracked():
            return title(session, 2)

    get(sync_engine, "/off-block", page(db, block))
    assert tags_of(sync_engine, "/off-block") == set()
    with db() as session:  # no render: nothing to tag, nothing breaks
        assert title(session, 1) == "post 1"


# -- writes: what a commit revalidates ------------------------------------------------------------


def test_an_edit_refreshes_its_post_and_the_lists_and_nothing_else(
    sync_engine: Engine, db: sessionmaker[Session], clock: Any
) -> None:
    pages = {
        "/posts/1": page(db, lambda s: title(s, 1)),
        "/posts/2": page(db, lambda s: title(s, 2)),
        "/posts": page(db, lambda s: [p.title for p in s.scalars(select(Post))]),
    }
    for key, render in pages.items():
        get(sync_engine, key, render)
    clock.advance(1)
    with db() as session:
        session.get(Post, 1).title = "edited"
        session.flush()
        clock.advance(1)
        assert get(sync_engine, "/posts/1", pages["/posts/1"])[0] is CacheStatus.HIT, "not before the commit"
        session.commit()
    clock.advance(1)
    assert get(sync_engine, "/posts/1", pages["/posts/1"]) == (CacheStatus.MISS, "'edited'")
    status, body = get(sync_engine, "/posts", pages["/posts"])
    assert status is CacheStatus.MISS and "edited" in body
    assert get(sync_engine, "/posts/2", pages["/posts/2"])[0] is CacheStatus.HIT, (
        "other posts keep their page"
    )


def test_inserts_deletes_and_many_to_many_changes_reach_their_pages(
    sync_engine: Engine, db: sessionmaker[Session], clock: Any
) -> None:
    pages = {
        "/posts/4": page(db, lambda s: title(s, 4)),
        "/posts/1/comments": page(db, lambda s: [c.text for c in s.get(Post, 1).comments]),
        "/posts/3/labels": page(db, lambda s: [la.id for la in s.get(Post, 3).labels]),
        "/posts/2": page(db, lambda s: title(s, 2)),
    }
    for key, render in pages.items():
        get(sync_engine, key, render)
    clock.advance(1)
    with db() as session:
        session.add(Post(id=4, title="new"))
        session.add(Comment(post_id=1, text="second"))
        labelled = session.get(Post, 3)
        labelled.labels.append(Label(id=7))
        session.delete(session.get(Post, 2))
        session.commit()
    clock.advance(1)
    assert get(sync_engine, "/posts/4", pages["/posts/4"]) == (CacheStatus.MISS, "'new'"), (
        "the cached 404 went"
    )
    assert get(sync_engine, "/posts/1/comments", pages["/posts/1/comments"])[1] == "['first', 'second']"
    assert get(sync_engine, "/posts/3/labels", pages["/posts/3/labels"])[1] == "[7]"
    assert get(sync_engine, "/posts/2", pages["/posts/2"]) == (CacheStatus.MISS, "None"), "deleted: the 404"


def test_a_rollback_revalidates_nothing_and_a_savepoint_waits_for_the_commit(
    sync_engine: Engine, db: sessionmaker[Session], clock: Any
) -> None:
    render = page(db, lambda s: title(s, 1))
    get(sync_engine, "/posts/1", render)
    clock.advance(1)
    with db() as session:
        session.get(Post, 1).title = "never"
        session.flush()
        session.rollback()
        clock.advance(1)
        assert get(sync_engine, "/posts/1", render)[0] is CacheStatus.HIT
        with session.begin_nested():
            session.get(Post, 1).title = "inner"
        clock.advance(1)
        assert get(sync_engine, "/posts/1", render)[0] is CacheStatus.HIT, "released, not committed"
        session.commit()
    clock.advance(1)
    assert get(sync_engine, "/posts/1", render) == (CacheStatus.MISS, "'inner'")


def test_bulk_statements_and_raw_sql_reach_every_page_of_the_table(
    sync_engine: Engine, db: sessionmaker[Session], clock: Any
) -> None:
    one = page(db, lambda s: title(s, 1))
    three = page(db, lambda s: title(s, 3))
    get(sync_engine, "/posts/1", one)
    get(sync_engine, "/posts/3", three)
    clock.advance(1)
    with db() as session:  # an ORM bulk UPDATE: which rows is unknown, so every post page
        session.execute(update(Post).where(Post.title.like("post%")).values(title="bulk"))
        session.commit()
    clock.advance(1)
    assert get(sync_engine, "/posts/1", one) == (CacheStatus.MISS, "'bulk'")
    assert get(sync_engine, "/posts/3", three) == (CacheStatus.MISS, "'bulk'")
    with db() as session:  # raw SQL: the session cannot see it; revalidate_table can
        session.execute(text("UPDATE posts SET title = 'raw' WHERE id = 1"))
        revalidate_table(Post, 1, session=session)  # waits for the commit
        clock.advance(1)
        assert get(sync_engine, "/posts/1", one)[0] is CacheStatus.HIT
        session.commit()
    clock.advance(1)
    assert get(sync_engine, "/posts/1", one) == (CacheStatus.MISS, "'raw'")
    assert get(sync_engine, "/posts/3", three)[0] is CacheStatus.HIT, "one row named: its pages only"
    with db() as session:
        session.execute(text("UPDATE posts SET title = 'all'"))
        session.commit()
    revalidate_table("posts")
    clock.advance(1)
    assert get(sync_engine, "/posts/3", three) == (CacheStatus.MISS, "'all'")


def test_a_page_rendered_during_an_uncommitted_change_never_outlives_the_commit(
    sync_engine: Engine, db: sessionmaker[Session], clock: Any
) -> None:
    """The transaction race: the render reads the old row while the edit is uncommitted
    and is stored; the commit's revalidation comes after the render started, so the next
    request renders again and sees the edit."""
    render = page(db, lambda s: title(s, 1))
    flushed, rendered = threading.Event(), threading.Event()

    def edit() -> None:
        with db() as session:
            session.get(Post, 1).title = "edited"
            session.flush()  # the row is changed, not committed
            clock.advance(1)  # the render below starts after the flush...
            flushed.set()
            assert rendered.wait(10)
            clock.advance(1)  # ...and before the commit
            session.commit()

    writer = threading.Thread(target=edit)
    writer.start()
    assert flushed.wait(10)
    assert get(sync_engine, "/posts/1", render) == (CacheStatus.MISS, "'post 1'"), "read before the commit"
    rendered.set()
    writer.join(10)
    clock.advance(1)
    assert get(sync_engine, "/posts/1", render) == (CacheStatus.MISS, "'edited'")
    assert get(sync_engine, "/posts/1", render) == (CacheStatus.HIT, "'edited'")


def test_a_commit_in_one_process_reaches_the_pages_of_another(
    tmp_path: Path, db: sessionmaker[Session]
) -> None:
    """Two engines over one file-system cache, each with its memory tier, stand for two
    workers: the tags a commit revalidates through one reach the other's pages (a tier
    rereads the tag log every ``tag_refresh`` seconds: 0.5 by default, none here)."""
    store = tmp_path / "cache"
    worker_a = Engine(MemoryTier(FileSystemCache(store, fsync=False), 1 << 20, tag_refresh=0))
    worker_b = Engine(MemoryTier(FileSystemCache(store, fsync=False), 1 << 20, tag_refresh=0))
    writes = track(sessionmaker(db.kw["bind"]), engine=worker_a)
    render = page(db, lambda s: title(s, 2))
    get(worker_b, "/posts/2", render)
    assert get(worker_b, "/posts/2", render)[0] is CacheStatus.HIT
    with writes() as session:
        session.get(Post, 2).title = "elsewhere"
        session.commit()
    assert get(worker_b, "/posts/2", render) == (CacheStatus.MISS, "'elsewhere'")
    run_sync(worker_a.close())
    run_sync(worker_b.close())


# -- AsyncSession --------------------------------------------------------------------------------


async def test_async_sessions_tag_reads_and_revalidate_after_commit(
    tmp_path: Path, engine: Engine, clock: Any
) -> None:
    pytest.importorskip("aiosqlite")
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    database = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
    async with database.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(insert(Post), [{"id": 1, "title": "async"}])
    sessions = track(async_sessionmaker(database, expire_on_commit=False))

    async def render() -> Rendered:
        async with sessions() as session:
            post = await session.get(Post, 1)
            listed = (await session.scalars(select(Post))).all()
            return Rendered(f"{post.title if post else None} {len(listed)}")

    assert (await engine.get("/a", render)).entry.body == b"async 1"  # type: ignore[union-attr]
    entry = await engine.inspect("/a")
    assert entry is not None and {"posts:1", "posts:*", "posts"} <= set(entry.tags)
    clock.advance(1)
    async with sessions() as session:
        (await session.get(Post, 1)).title = "changed"  # type: ignore[union-attr]
        session.add(Post(id=2, title="two"))
        await session.commit()  # the revalidation is awaited on this loop
    clock.advance(1)
    served = await engine.get("/a", render)
    assert (served.status, served.entry.body) == (CacheStatus.MISS, b"changed 2")  # type: ignore[union-attr]
    await asyncio.sleep(0)
    await database.dispose()
