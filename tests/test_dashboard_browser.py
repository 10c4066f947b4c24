"""The dashboard in a real browser: a ``pyisr start`` of the example blog with a dashboard
secret, driven by the system Chromium through playwright.

Signs in (a wrong secret first), filters the table as it types and through the store,
revalidates a page and watches it turn invalidated, then fresh once it is requested,
and takes screenshots at a desktop and a phone's width (``PYISR_DASHBOARD_SHOTS=dir``
keeps them there; the README's ``docs/dashboard.png`` is the desktop summary). The
browser only talks to the server on 127.0.0.1. Needs ``/usr/bin/chromium`` and the
``playwright`` package; without them it is skipped, except under ``CI=true``, where that
is a failure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import launched_chromium, require_browser
from e2e_support import Server, copy_site, run_cli

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "blog"
SECRET = "browser-dashboard-secret-42"
#: Seconds until the server has reported what it counted (pyisr.events.REPORT_EVERY, and some).
REPORTED = 5.5

require_browser()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("dashboard")
    site = copy_site(EXAMPLE, root / "site")
    env = {"BLOG_DB": str(root / "blog.db"), "BLOG_API_URL": "", "PYISR_DASHBOARD_SECRET": SECRET}
    result = run_cli(["build", str(site)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    srv = Server(site, env).start()
    for path in ["/blog"] * 9 + ["/blog/1"] * 6 + ["/blog/2"] * 4 + ["/blog/3", "/blog/3", "/"]:
        assert srv.get(path).status_code == 200
    time.sleep(REPORTED)  # the server reports its counts to the store every few seconds
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launched_chromium() as chromium:
        yield chromium


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PYISR_DASHBOARD_SHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sign_in(page: Any, server: Server, secret: str) -> Any:
    page.goto(server.url + "/_pyisr/")
    assert page.url == server.url + "/_pyisr/login"  # signed out: the form
    page.fill("#secret", secret)
    with page.expect_navigation() as answer:
        page.click("button[type=submit]")
    return answer.value


def test_sign_in_filter_revalidate(server: Server, browser: Any, shots: Path) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    errors: list[str] = []
    # A script error or a Content-Security-Policy refusal (the wrong secret's 403 is no error here).
    page.on(
        "console",
        lambda message: (
            errors.append(message.text)
            if message.type == "error" and "status of 403" not in message.text
            else None
        ),
    )
    try:
        refused = sign_in(page, server, "not-the-secret")
        assert refused.status == 403
        assert "not the dashboard" in page.locator("#error").inner_text()
        page.screenshot(path=str(shots / "login-refused.png"))

        signed_in = sign_in(page, server, SECRET)
        assert signed_in.status == 200 and page.url == server.url + "/_pyisr/"
        cookie = next(c for c in context.cookies() if c["name"] == "pyisr_dashboard")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/_pyisr"
        assert int(page.locator("#entry-count").inner_text()) >= 27
        assert page.locator("#health").inner_text() == "OK"
        # The stylesheet applied (a CSP that blocked it would leave the default look).
        assert page.evaluate("getComputedStyle(document.querySelector('header.top')).display") == "flex"
        page.screenshot(path=str(shots / "summary-desktop.png"), full_page=True)

        page.click("text=Entries")
        page.wait_for_url(server.url + "/_pyisr/entries")
        on_page = [k.strip() for k in page.locator("#entries td.key a").all_inner_texts()]
        needle = on_page[2]
        page.fill("#filter-q", needle)  # filtered in the page as it is typed
        keys = [k.strip() for k in page.locator("#entries tbody tr:visible td.key a").all_inner_texts()]
        assert keys and all(needle in k for k in keys) and len(keys) < len(on_page), keys
        page.fill("#filter-q", "no-such-key")
        assert page.locator("#entries tbody tr:visible").count() == 0
        assert page.locator("#filter-none").is_visible()
        page.fill("#filter-q", "blog/2")
        with page.expect_navigation():
            page.press("#filter-q", "Enter")  # then through the whole store
        assert "q=blog%2F2" in page.url
        found = [k.strip() for k in page.locator("#entries td.key a").all_inner_texts()]
        assert found and all("blog/2" in k for k in found)
        assert int(page.locator("#total").inner_text()) >= len(found)
        page.select_option("select[name=sort]", "key")  # applied at once
        page.wait_for_url("**sort=key**")
        assert page.locator("#entries td.key a").first.inner_text().strip() == "/blog/2"
        page.screenshot(path=str(shots / "entries-desktop.png"), full_page=True)

        page.goto(server.url + "/_pyisr/entry?key=/blog/1")
        assert page.locator("#entry-state").inner_text() == "fresh"
        page.click("button[data-action=path]")
        page.wait_for_load_state()
        assert "Path /blog/1 invalidated" in page.locator("#result").inner_text()
        assert page.locator("#entry-state").inner_text() == "invalidated"
        assert "by dashboard (signed in from 127.0.0.1)" in page.locator("#explain").inner_text()
        page.screenshot(path=str(shots / "entry-invalidated-desktop.png"), full_page=True)

        assert server.get("/blog/1").headers["x-pyisr-cache"] == "MISS"  # the next request renders it
        page.reload()
        assert page.locator("#entry-state").inner_text() == "fresh"
        assert page.locator("#result").count() == 0  # a result is shown once
        page.screenshot(path=str(shots / "entry-desktop.png"), full_page=True)

        time.sleep(REPORTED)  # the regeneration, counted
        page.goto(server.url + "/_pyisr/")  # the summary with the invalidation recorded
        assert page.locator("#hit-ratio").inner_text() != "–"
        assert "dashboard (signed in from 127.0.0.1)" in page.locator("#invalidations").inner_text()
        page.screenshot(path=str(shots / "dashboard.png"))

        phone = browser.new_context(
            viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
        )
        try:
            phone.add_cookies(context.cookies())
            small = phone.new_page()
            small.goto(server.url + "/_pyisr/")
            # Nothing wider than the screen: no sideways scrolling of the whole page.
            assert small.evaluate("document.documentElement.scrollWidth") <= 390
            small.screenshot(path=str(shots / "summary-phone.png"), full_page=True)
            small.screenshot(path=str(shots / "summary-phone-top.png"))
            small.locator("#entries").screenshot(path=str(shots / "table-phone.png"))
            small.goto(server.url + "/_pyisr/entry?key=/blog/1")
            assert small.evaluate("document.documentElement.scrollWidth") <= 390
            small.screenshot(path=str(shots / "entry-phone.png"))
            small.goto(server.url + "/_pyisr/entries")
            assert small.evaluate("document.documentElement.scrollWidth") <= 390
            small.screenshot(path=str(shots / "entries-phone.png"))
        finally:
            phone.close()
    finally:
        context.close()
    assert all(url.startswith(server.url) for url in requested), requested
    assert not errors, errors  # no script or policy errors in the console
    for name in ("summary-desktop.png", "entry-desktop.png", "summary-phone.png"):
        assert (shots / name).stat().st_size > 10_000
