"""The blog's SQLite database: plain functions, no caching (see ``lib/blog.py`` for that).

The file is ``data/blog.db`` next to the site (or ``$BLOG_DB``), created with the 25
seed posts the first time anything reads it. Reads use one connection per thread (and
process, and database file), writes open their own, so the functions are safe from the
worker threads pages render in and from several processes (the server, the build,
``origin.py``), and a build of thousands of pages does not open thousands of connections.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from lib import seed

SITE_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = """
CREATE TABLE posts (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    title     TEXT NOT NULL,
    content   TEXT NOT NULL,
    author    TEXT NOT NULL DEFAULT 'Editor',
    published TEXT NOT NULL
);
"""
COLUMNS = "id, title, content, author, published"
MAX_TITLE = 200
MAX_CONTENT = 20_000

_create_lock = threading.Lock()


def database_path() -> Path:
    """``$BLOG_DB`` if set, else ``data/blog.db`` in the site folder."""
    configured = os.environ.get("BLOG_DB", "").strip()
    return Path(configured) if configured else SITE_ROOT / "data" / "blog.db"


def ensure_database(path: Path | None = None) -> Path:
    """Create and seed the database file if it does not exist yet.

    The file is built under a temporary name and linked into place, which fails if
    another thread or process got there first: nobody ever sees a half-seeded file.
    """
    path = path or database_path()
    if path.exists():
        return path
    with _create_lock:
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.unlink(missing_ok=True)
        conn = sqlite3.connect(tmp)
        try:
            conn.executescript(SCHEMA)
            conn.executemany(f"INSERT INTO posts ({COLUMNS}) VALUES (?, ?, ?, ?, ?)", seed.rows())
            conn.commit()
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it meanwhile: same seed, use theirs
        finally:
            tmp.unlink(missing_ok=True)
    return path


def connect(path: Path | None = None) -> sqlite3.Connection:
    conn = sqlite3.connect(ensure_database(path), timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


_local = threading.local()


def _reader() -> sqlite3.Connection:
    """This thread's connection for reads, opened once per process and database file."""
    path = ensure_database()
    ident = (os.getpid(), str(path), path.stat().st_ino)
    held = getattr(_local, "reader", None)
    if held is not None and held[0] == ident:
        return held[1]
    if held is not None and held[0][0] == ident[0]:
        held[1].close()  # the file was replaced: read the new one
    conn = connect(path)
    _local.reader = (ident, conn)
    return conn


def _as_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {key: row[key] for key in row.keys()}


def all_posts() -> list[dict[str, Any]]:
    """Every post, newest first."""
    rows = _reader().execute(f"SELECT {COLUMNS} FROM posts ORDER BY id DESC").fetchall()
    return [_as_dict(r) for r in rows]


def newest_id() -> int | None:
    """The id of the newest post (``None`` with no posts): one index lookup, not a scan."""
    row = _reader().execute("SELECT MAX(id) FROM posts").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def get_post(post_id: int) -> dict[str, Any] | None:
    """One post, or ``None`` if there is no post with this id."""
    row = _reader().execute(f"SELECT {COLUMNS} FROM posts WHERE id = ?", (post_id,)).fetchone()
    return _as_dict(row) if row is not None else None


def add_post(title: str, content: str, author: str = "Editor") -> dict[str, Any]:
    """Insert a post and return it; ``ValueError`` says what is wrong with the input."""
    title, content, author = title.strip(), content.strip(), (author.strip() or "Editor")
    if not title:
        raise ValueError("the title is empty")
    if not content:
        raise ValueError("the content is empty")
    if len(title) > MAX_TITLE:
        raise ValueError(f"the title is longer than {MAX_TITLE} characters")
    if len(content) > MAX_CONTENT:
        raise ValueError(f"the content is longer than {MAX_CONTENT} characters")
    published = dt.date.today().isoformat()
    conn = connect()
    try:
        with conn:
            cursor = conn.execute(
                "INSERT INTO posts (title, content, author, published) VALUES (?, ?, ?, ?)",
                (title, content, author[:80], published),
            )
        post_id = int(cursor.lastrowid or 0)
    finally:
        conn.close()
    post = get_post(post_id)
    assert post is not None
    return post


def update_post(post_id: int, *, title: str | None = None, content: str | None = None) -> bool:
    """Change a post's title and/or content; ``False`` if there is no such post."""
    fields = {k: v for k, v in {"title": title, "content": content}.items() if v is not None}
    if not fields:
        return get_post(post_id) is not None
    assignments = ", ".join(f"{name} = ?" for name in fields)
    conn = connect()
    try:
        with conn:
            cursor = conn.execute(f"UPDATE posts SET {assignments} WHERE id = ?", (*fields.values(), post_id))
    finally:
        conn.close()
    return cursor.rowcount > 0
