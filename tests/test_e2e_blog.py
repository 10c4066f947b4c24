"""examples/blog end to end: the seeds' scenario against a real ``pyisr build`` + ``pyisr start``.

The example is copied to a temporary folder with its own SQLite file. The main server
runs with ``BLOG_API_URL`` pointing at the example's own JSON origin (``origin.py``,
a subprocess on 127.0.0.1), so post pages read through ``fetch(..., tags=["posts"])``
and the list through ``cached(..., tags=["posts"])``; a second, shorter run checks the
default SQLite-only mode (no origin, no network at all).

Windows are shortened through the example's environment overrides: post pages 2 s
(the seeds' 60 s). The fetch of a post takes the page's window, as a fetch inside a
``revalidate = 60`` page does in the seed, so a post edited in SQLite shows up after
one window: the first request after it is STALE with the old page, the background
regeneration refetches the (now stale) data, and a later request is HIT with the new
text. Data read through ``cached`` keeps the seed's hour; ``revalidate_tag("posts")``
(the admin form) is what refreshes it at once, which the SQLite-only run shows.

What needs no server process runs in-process on a fake clock in test_http_contract.py
(``test_blog_*``): a failing regeneration and its back-off, and the SQLite-only mode's
regeneration after the window. Here the example runs the way a user runs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import Server, copy_site, free_port, heading, rendered_at, run_cli, sql

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "blog"
WINDOW = 2  # BLOG_REVALIDATE: the post pages' window, in seconds
ISR_WINDOW = f"s-maxage={WINDOW}, stale-while-revalidate={31536000 - WINDOW}"
NOSTORE = "private, no-cache, no-store, max-age=0, must-revalidate"
SECRET = "blog-e2e-secret"
POST_3_TITLE = "Choosing a Revalidation Window"


# -- helpers ---------------------------------------------------------------------------


class Origin:
    """The example's JSON origin (``origin.py``) as a subprocess, stopped by its PID."""

    def __init__(self, site: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = site.parent / f"origin-{self.port}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(site / "origin.py"), "--port", str(self.port)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"origin exited: {self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/posts/1", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"origin did not start: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fresh_hit(server: Server, path: str) -> tuple[httpx.Response, float]:
    """GET ``path`` until it is a HIT; returns it and the time it was seen.

    The entry of a HIT was made before that moment, so it is surely stale
    ``WINDOW`` seconds later, whenever the build or an earlier test made it.
    """
    deadline = time.monotonic() + 10
    while True:
        response = server.get(path)
        assert response.status_code == 200, (path, response.status_code)
        if response.headers["x-pyisr-cache"] == "HIT":
            return response, time.monotonic()
        assert time.monotonic() < deadline, f"{path} never became a HIT"
        time.sleep(0.2)


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def until_regenerated(server: Server, path: str, old: httpx.Response) -> httpx.Response:
    """GET ``path`` until its background regeneration has landed; returns that answer.

    Meanwhile every answer must be the old page, STALE.
    """
    deadline = time.monotonic() + 10
    while True:
        response = server.get(path)
        if response.headers["x-pyisr-cache"] != "STALE":
            return response
        assert response.text == old.text
        assert time.monotonic() < deadline, f"{path} was never regenerated"
        time.sleep(0.05)


def build(site: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = run_cli(["build", str(site)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# -- the main run: JSON origin + SQLite ---------------------------------------------------


@pytest.fixture(scope="module")
def blog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("blog")
    site = copy_site(EXAMPLE, root / "site")
    db = root / "blog.db"
    env = {
        "BLOG_DB": str(db),
        "BLOG_REVALIDATE": str(WINDOW),
        "MY_SECRET_TOKEN": SECRET,
        "PYISR_DEBUG_CACHE": "1",
    }
    origin = Origin(site, env)  # creates and seeds the database
    env["BLOG_API_URL"] = origin.url
    server: Server | None = None
    try:
        result = build(site, env)
        server = Server(site, env).start()
        yield {"site": site, "db": db, "server": server, "build": result, "origin": origin}
    finally:
        if server is not None:
            server.stop()
        origin.stop()


@pytest.fixture
def server(blog: dict[str, object]) -> Server:
    srv = blog["server"]
    assert isinstance(srv, Server)
    return srv


@pytest.fixture
def db(blog: dict[str, object]) -> Path:
    path = blog["db"]
    assert isinstance(path, Path)
    return path


def test_build_prerenders_the_25_posts_in_both_styles(blog: dict[str, object]) -> None:
    site = blog["site"]
    assert isinstance(site, Path)
    manifest = json.loads((site / ".pyisr" / "manifest.json").read_text())
    routes = {r["pattern"]: r for r in manifest["routes"]}
    # 1. During the build, all known blog posts are generated (there are 25).
    assert routes["/blog/[id]"]["prerendered"] == sorted(f"/blog/{n}" for n in range(1, 26))
    assert routes["/posts/[id]"]["prerendered"] == sorted(f"/posts/{n}" for n in range(1, 26))
    assert routes["/posts/[id]"]["fallback"] == "blocking"
    assert routes["/blog/[id]"]["dynamic_params"] is True
    assert routes["/blog"]["revalidate"] == 3600
    assert routes["/blog/[id]"]["revalidate"] == WINDOW
    assert routes["/admin"]["prerendered"] == []  # revalidate = 0: never cached
    output = blog["build"]
    assert isinstance(output, subprocess.CompletedProcess)
    assert re.search(r"/blog/\[id\]\s.*\b25\b", output.stdout), output.stdout
    assert re.search(r"/posts/\[id\]\s.*\b25\b", output.stdout), output.stdout
    assert "Built 52 pages" in output.stderr, output.stderr  # /, /blog, 25 + 25 posts


def test_prerendered_pages_are_hits_with_isr_headers(server: Server) -> None:
    # 2. All requests made to these pages are cached and instantaneous.
    post = server.get("/blog/1")
    assert post.status_code == 200
    assert post.headers["x-pyisr-cache"] in ("HIT", "STALE")  # the build made it; it may be old
    assert post.headers["cache-control"] == ISR_WINDOW
    assert heading(post) == "Hello, Incremental Static Regeneration"
    assert '<link rel="stylesheet" href="/style.css">' in post.text
    twin = server.get("/posts/1")
    assert twin.status_code == 200 and twin.headers["x-pyisr-cache"] in ("HIT", "STALE")
    assert twin.headers["cache-control"] == ISR_WINDOW
    assert heading(twin) == heading(post)
    assert "Pages Router style" in twin.text
    listing = server.get("/blog")
    assert listing.headers["x-pyisr-cache"] == "HIT"
    assert listing.headers["cache-control"] == "s-maxage=3600, stale-while-revalidate=31532400"
    assert heading(listing) == "Blog Posts"
    assert len(re.findall(r'<a href="/blog/\d+">', listing.text)) == 25
    home = server.get("/")
    assert home.status_code == 200 and home.headers["x-pyisr-cache"] == "HIT"
    assert 'href="/blog"' in home.text


def test_after_the_window_stale_then_regenerated_with_new_content(server: Server, db: Path) -> None:
    old, seen = fresh_hit(server, "/blog/3")
    assert heading(old) == POST_3_TITLE
    sql(db, "UPDATE posts SET title = ? WHERE id = 3", "Choosing a Revalidation Window, Revised")
    # Within the window: still the cached page.
    assert server.get("/blog/3").text == old.text
    sleep_until(seen + WINDOW + 0.2)
    # 3. After the window, the next request still shows the cached (stale) page...
    stale = server.get("/blog/3")
    assert stale.headers["x-pyisr-cache"] == "STALE"
    assert stale.text == old.text
    # 4./5. ...a new version is generated in the background, then served and cached.
    new = until_regenerated(server, "/blog/3", old)
    assert new.headers["x-pyisr-cache"] == "HIT"
    assert heading(new) == "Choosing a Revalidation Window, Revised"
    assert rendered_at(new) > rendered_at(old)
    assert server.get("/blog/3").text == new.text


def test_an_unknown_post_is_generated_on_demand_then_cached(server: Server, db: Path) -> None:
    sql(
        db,
        "INSERT INTO posts (id, title, content, author, published) VALUES (26, ?, ?, ?, ?)",
        "Post Twenty-Six Arrives",
        "Written after the build.\n\nRendered on its first request.",
        "Tess Tester",
        "2025-01-01",
    )
    # 6. /blog/26 is generated and cached on demand.
    first = server.get("/blog/26")
    assert first.status_code == 200
    assert first.headers["x-pyisr-cache"] == "MISS"
    assert first.headers["cache-control"] == ISR_WINDOW
    assert heading(first) == "Post Twenty-Six Arrives"
    second = server.get("/blog/26")
    assert second.headers["x-pyisr-cache"] == "HIT"
    assert second.text == first.text
    # The Pages-Router twin renders it too (fallback: "blocking").
    twin = server.get("/posts/26")
    assert twin.status_code == 200 and twin.headers["x-pyisr-cache"] == "MISS"
    assert heading(twin) == "Post Twenty-Six Arrives"


def test_missing_posts_and_paths_get_the_custom_404(server: Server) -> None:
    for path in ("/posts/999", "/blog/999", "/blog/abc"):
        response = server.get(path)
        assert response.status_code == 404, path
        assert response.headers["x-pyisr-cache"] == "MISS", path  # a cached 404
        assert "404: Page not found" in response.text and 'href="/style.css"' in response.text
    assert server.get("/posts/999").headers["x-pyisr-cache"] == "HIT"
    nowhere = server.get("/no/such/page")
    assert nowhere.status_code == 404
    assert nowhere.headers["cache-control"] == NOSTORE
    assert "x-pyisr-cache" not in nowhere.headers
    assert "404: Page not found" in nowhere.text


def test_public_stylesheet_is_served(server: Server) -> None:
    css = server.get("/style.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert "font-family" in css.text and "--accent" in css.text
    assert server.get("/favicon.svg").status_code == 200


def test_on_demand_revalidation_api_route(server: Server, db: Path) -> None:
    before = server.get("/posts/7")
    assert before.status_code == 200
    sql(db, "UPDATE posts SET title = ? WHERE id = 7", "On-Demand, Right Now")
    # Wrong or missing secret: 401 {"message": "Invalid token"}.
    for query in ("?secret=wrong&path=/posts/7", "?path=/posts/7", "?secret="):
        denied = server.get("/api/revalidate" + query)
        assert denied.status_code == 401, query
        assert denied.json() == {"message": "Invalid token"}
    assert heading(server.get("/posts/7")) == heading(before)
    # The right secret: the page is regenerated before the answer; the next GET is a HIT.
    ok = server.get(f"/api/revalidate?secret={SECRET}&path=/posts/7")
    assert ok.status_code == 200 and ok.json() == {"revalidated": True}
    after = server.get("/posts/7")
    assert after.headers["x-pyisr-cache"] == "HIT"
    assert heading(after) == "On-Demand, Right Now"
    # As in the seed, the path defaults to /posts/1.
    default = server.request("POST", f"/api/revalidate?secret={SECRET}")
    assert default.status_code == 200 and default.json() == {"revalidated": True}
    # A path that is no page: 500 "Error revalidating".
    nowhere = server.get(f"/api/revalidate?secret={SECRET}&path=/nowhere")
    assert nowhere.status_code == 500 and nowhere.text == "Error revalidating"


def test_debug_cache_log_has_hit_and_miss_lines(server: Server) -> None:
    fresh_hit(server, "/blog/1")
    log = server.log()
    assert re.search(r"^/blog/1 HIT age=\d+s$", log, re.M), log
    assert re.search(r"^/blog/26 MISS rendered in [\d.]+ms", log, re.M), log
    assert re.search(r"^/blog/3 STALE ", log, re.M), log
    assert re.search(r"^/blog/3 REGENERATE rendered in [\d.]+ms", log, re.M), log


def test_zz_admin_form_adds_a_post_and_revalidates_the_posts_tag(server: Server) -> None:
    """Runs last: revalidate_tag("posts") invalidates every page that shows a post."""
    form = server.get("/admin")
    assert form.status_code == 200
    assert form.headers["cache-control"] == NOSTORE and "x-pyisr-cache" not in form.headers
    assert 'action="/admin/posts"' in form.text and 'name="title"' in form.text
    assert server.get("/blog").headers["x-pyisr-cache"] == "HIT"
    bad = server.request("POST", "/admin/posts", data={"title": "  ", "content": "text"})
    assert bad.status_code == 400 and "the title is empty" in bad.text
    created = server.request(
        "POST",
        "/admin/posts",
        data={"title": "Field Notes from the Admin Form", "content": "One.\n\nTwo.", "author": "Ed"},
    )
    assert created.status_code == 303
    assert created.headers["location"] == "/blog"
    listing = server.get("/blog")
    assert listing.headers["x-pyisr-cache"] == "MISS"  # invalidated: rendered fresh, blocking
    assert "Field Notes from the Admin Form" in listing.text
    match = re.search(r'<a href="/blog/(\d+)">Field Notes from the Admin Form</a>', listing.text)
    assert match, listing.text
    assert server.get("/blog").headers["x-pyisr-cache"] == "HIT"
    post = server.get(f"/blog/{match.group(1)}")
    assert post.status_code == 200 and heading(post) == "Field Notes from the Admin Form"
    # Every post page carries the tag: the next request for one renders it fresh.
    assert server.get("/blog/1").headers["x-pyisr-cache"] == "MISS"
    assert "Field Notes from the Admin Form" in server.get("/").text


# -- the default mode: SQLite only, no origin ----------------------------------------------


def test_sqlite_only_mode_and_revalidate_tag(tmp_path: Path) -> None:
    """No BLOG_API_URL, the seed's windows: everything reads SQLite through cached().

    (The page regenerating after its window with the hour-old cached data, so with the
    same text: test_http_contract.py, on a fake clock.)
    """
    site = copy_site(EXAMPLE, tmp_path / "site")
    db = tmp_path / "blog.db"
    env = {"BLOG_DB": str(db), "BLOG_API_URL": ""}
    build(site, env)
    assert db.is_file()  # created and seeded on first use
    server = Server(site, env).start()
    try:
        old, _ = fresh_hit(server, "/blog/2")
        assert heading(old) == "Why Stale-While-Revalidate Feels Instant"
        assert old.headers["cache-control"] == "s-maxage=60, stale-while-revalidate=31535940"
        sql(db, "UPDATE posts SET title = ? WHERE id = 2", "Why Stale Pages Feel Instant")
        # Within the window: still the cached page.
        assert server.get("/blog/2").text == old.text
        # revalidate_tag("posts") from the admin form refreshes the data and the pages.
        form = {"title": "Offline and Fine", "content": "Yes."}
        created = server.request("POST", "/admin/posts", data=form)
        assert created.status_code == 303
        fresh = server.get("/blog/2")
        assert fresh.headers["x-pyisr-cache"] == "MISS"
        assert heading(fresh) == "Why Stale Pages Feel Instant"
        assert "Offline and Fine" in server.get("/blog").text
        assert server.get("/blog/26").status_code == 200
    finally:
        server.stop()
