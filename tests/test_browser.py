"""In a real browser: examples/blog renders as a styled blog, and a fallback shell turns
into its page by itself.

Needs the system Chromium (``/usr/bin/chromium``) and the ``playwright`` package; it
never downloads a browser (no ``playwright install``). Skipped when either is missing,
except under ``CI=true`` (tests/browser_support.py).
The browser only talks to the example's server on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_support import launched_chromium, require_browser
from e2e_support import Server, copy_site, run_cli

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "blog"

require_browser()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("browser")
    site = copy_site(EXAMPLE, root / "site")
    env = {"BLOG_DB": str(root / "blog.db"), "BLOG_API_URL": ""}
    result = run_cli(["build", str(site)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    srv = Server(site, env).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with launched_chromium() as chromium:
        yield chromium


def _default_font(browser: object) -> str:
    """The body font of an unstyled page: what the stylesheet must change."""
    page = browser.new_page()  # type: ignore[attr-defined]
    try:
        page.set_content("<html><body><p>plain</p></body></html>")
        return str(page.evaluate("getComputedStyle(document.body).fontFamily"))
    finally:
        page.close()


def test_blog_pages_render_styled(server: Server, browser: object, tmp_path: Path) -> None:
    default_font = _default_font(browser)
    page = browser.new_page(viewport={"width": 1100, "height": 900})  # type: ignore[attr-defined]
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    try:
        response = page.goto(server.url + "/blog")
        assert response is not None and response.status == 200
        assert response.headers["x-pyisr-cache"] == "HIT"
        assert page.title() == "Blog Posts · The ISR Journal"
        assert page.locator("h1").inner_text() == "Blog Posts"
        assert page.locator("#posts li").count() == 25
        font = page.evaluate("getComputedStyle(document.body).fontFamily")
        assert "Georgia" in font and font != default_font
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(251, 250, 247)"  # --paper from style.css
        page.screenshot(path=str(tmp_path / "blog.png"), full_page=True)

        page.click("text=Hello, Incremental Static Regeneration")
        page.wait_for_url(server.url + "/blog/1")
        assert page.locator("article h1").inner_text() == "Hello, Incremental Static Regeneration"
        assert page.locator("#content p").count() == 2
        header_font = page.evaluate("getComputedStyle(document.querySelector('h1')).fontFamily")
        assert "Georgia" not in header_font  # headings use the sans-serif stack
        page.screenshot(path=str(tmp_path / "post.png"), full_page=True)

        missing = page.goto(server.url + "/blog/999")
        assert missing is not None and missing.status == 404
        assert page.locator("h1").inner_text() == "404: Page not found"
        assert "Georgia" in page.evaluate("getComputedStyle(document.body).fontFamily")
    finally:
        page.close()
    assert all(url.startswith(server.url) for url in requested), requested
    assert (tmp_path / "blog.png").stat().st_size > 10_000
    assert (tmp_path / "post.png").stat().st_size > 10_000


FALLBACK_PAGE = """
import time
from pyisr import is_fallback


def get_static_paths():
    return {"paths": [], "fallback": True}


def get_static_props(params):
    time.sleep(0.8)
    return {"props": {"id": params["id"]}, "revalidate": 60}


def page(props):
    if is_fallback():
        return "<html><head><title>Loading</title></head><body><p id='loading'>Loading...</p></body></html>"
    return (
        f"<html><head><title>Item {props['id']}</title></head>"
        f"<body><h1 id='item'>Item {props['id']}</h1></body></html>"
    )
"""


def test_a_fallback_shell_turns_into_the_page_by_itself(browser: object, tmp_path: Path) -> None:
    """fallback: True (SPEC S-17) as a visitor sees it: "Loading...", then the page, same URL."""
    site = tmp_path / "site"
    (site / "pages" / "items").mkdir(parents=True)
    (site / "pages" / "items" / "[id].py").write_text(FALLBACK_PAGE)
    assert run_cli(["build", str(site)], {}).returncode == 0
    server = Server(site, {}).start()
    page = browser.new_page()  # type: ignore[attr-defined]
    try:
        response = page.goto(server.url + "/items/42")
        assert response is not None and response.status == 200
        assert response.headers["x-pyisr-cache"] == "MISS"
        assert page.locator("#loading").inner_text() == "Loading..."
        page.wait_for_selector("#item", timeout=10_000)
        assert page.locator("#item").inner_text() == "Item 42"
        assert page.title() == "Item 42"
        assert page.url == server.url + "/items/42"
        page.screenshot(path=str(tmp_path / "fallback.png"))
        # The page is cached now: a new visit gets it directly, no shell.
        again = page.goto(server.url + "/items/42")
        assert again is not None and again.headers["x-pyisr-cache"] == "HIT"
        assert page.locator("#loading").count() == 0
    finally:
        page.close()
        server.stop()
