"""A shared page never carries a visitor's identity: ``pyisr start``, as an attacker tries it.

Each test does what the attack did against a real server on 127.0.0.1: two visitors
ask for a page that sets a cookie (App page, route handler, Pages page), and the
second must never receive the first's cookie; pages that say ``private``,
``no-store`` or ``Vary: *`` are never stored; a forged ``Host`` never reaches a
shared render. Every response carries exactly one ``Cache-Control``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import Server, copy_site, run_cli

from pyisr.http import NOSTORE

pytestmark = pytest.mark.slow

SITE = Path(__file__).parent / "sites" / "identity"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    site = copy_site(SITE, tmp_path_factory.mktemp("identity") / "site")
    env = {"PYISR_REVALIDATE_SECRET": "s3cret"}
    built = run_cli(["build", str(site)], env)
    assert built.returncode == 0, built.stdout + built.stderr
    srv = Server(site, env).start()
    yield srv
    srv.stop()


def one_cache_control(response: httpx.Response) -> str:
    values = response.headers.get_list("cache-control")
    assert len(values) == 1, f"{response.url}: {values}"
    return values[0]


def session_cookie(response: httpx.Response) -> str | None:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith("session="):
            return header.split(";", 1)[0].split("=", 1)[1]
    return None


@pytest.mark.parametrize("path", ["/account", "/cookie-route", "/p/1"])
def test_a_page_that_sets_a_cookie_is_never_served_to_another_visitor(server: Server, path: str) -> None:
    alice = server.get(path)
    assert alice.status_code == 200
    alice_cookie = session_cookie(alice)
    assert alice_cookie, "the visitor who caused the render gets the cookie it set"
    assert alice_cookie in alice.text
    assert one_cache_control(alice) == NOSTORE
    assert alice.headers.get("x-pyisr-cache") != "HIT"
    for _ in range(3):
        other = server.get(path)
        assert other.status_code == 200
        assert alice_cookie not in other.text
        assert alice_cookie not in " ".join(other.headers.get_list("set-cookie"))
        assert one_cache_control(other) == NOSTORE
        assert other.headers.get("x-pyisr-cache") not in ("HIT", "STALE")
        assert session_cookie(other) is not None, "each visitor gets a cookie of their own"
    if path == "/account":
        assert len(alice.headers.get_list("set-cookie")) == 2, "both cookies reach their visitor"
    inspected = server.get(f"/_pyisr/cache?path={path}", headers={"authorization": "Bearer s3cret"})
    assert inspected.status_code == 404 and inspected.json()["cached"] is False, "never stored"


def test_the_props_of_a_pages_page_that_sets_a_cookie_are_the_visitors_own(server: Server) -> None:
    build_id = server.get("/_pyisr/health", headers={"authorization": "Bearer s3cret"}).json()["build_id"]
    server.get("/p/7")
    props = server.get(f"/_pyisr/data/{build_id}/p/7.json")
    assert props.status_code == 200 and props.json() == {"props": {"id": "7"}}
    assert one_cache_control(props) == NOSTORE


def test_the_reason_is_logged_once_per_route(server: Server) -> None:
    for _ in range(3):
        server.get("/account")
    log = server.log()
    assert log.count("/account sets a cookie: served uncached") == 1, log


@pytest.mark.parametrize(
    ("path", "reason", "cache_control"),
    [
        ("/private", "says Cache-Control: private", "private, max-age=60"),
        ("/nostore", "says Cache-Control: no-store", "no-store"),
        ("/vary", "says Vary: *", NOSTORE),
    ],
)
def test_private_no_store_and_vary_star_are_never_stored(
    server: Server, path: str, reason: str, cache_control: str
) -> None:
    """SPEC S-66: both rendered, neither stored; the page's own Cache-Control is kept."""
    first = server.get(path)
    second = server.get(path)
    assert first.status_code == second.status_code == 200
    assert first.text != second.text, "each visitor's own render"
    for response in (first, second):
        assert one_cache_control(response) == cache_control
        assert "etag" not in response.headers and response.headers.get("x-pyisr-cache") != "HIT"
    assert f"{path} {reason}: served uncached" in server.log()


def test_a_shareable_page_sends_only_pyisrs_cache_control(server: Server) -> None:
    first = server.get("/plain")
    second = server.get("/plain")
    assert second.headers["x-pyisr-cache"] == "HIT" and second.text == first.text
    for response in (first, second):
        assert one_cache_control(response) == "s-maxage=60, stale-while-revalidate=31535940"
    head = server.request("HEAD", "/plain")
    assert one_cache_control(head).startswith("s-maxage=60")


def test_only_get_and_head_are_cached(server: Server) -> None:
    posted = server.request("POST", "/plain")
    assert posted.status_code == 405 and "x-pyisr-cache" not in posted.headers
    assert server.get("/plain").headers["x-pyisr-cache"] == "HIT"


def test_a_forged_host_never_reaches_a_shared_render(server: Server) -> None:
    """The route handler's request URL is site_url's, whatever Host the visitor sent."""
    forged = server.get("/origin", headers={"host": "evil.example"})
    assert forged.status_code == 200
    assert forged.json() == {"url": "https://www.example.com/origin", "client": None}
    # A forged Host on a HIT, then an on-demand regeneration: still the canonical host.
    server.get("/origin", headers={"host": "evil.example", "x-forwarded-host": "evil.example"})
    revalidated = server.request(
        "POST", "/_pyisr/revalidate?path=/origin", headers={"authorization": "Bearer s3cret"}
    )
    assert revalidated.status_code == 200, revalidated.text
    again = server.get("/origin", headers={"host": "evil.example"})
    assert again.headers["x-pyisr-cache"] == "HIT"
    assert json.loads(again.text)["url"] == "https://www.example.com/origin"


def test_revalidating_a_page_that_is_not_shareable_says_why(server: Server) -> None:
    answer = server.request(
        "POST", "/_pyisr/revalidate?path=/account", headers={"authorization": "Bearer s3cret"}
    )
    assert answer.status_code == 409
    assert "sets a cookie" in answer.json()["error"]
