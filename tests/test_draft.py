"""Draft mode's cookie: only the secret makes one, it expires, and a forged one never works."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from e2e_support import run_cli, running

from pyisr.cache.memory import MemoryCache
from pyisr.config import load_config
from pyisr.draft import COOKIE, cookie_from_header, draft_cookie_value, is_draft_request, is_valid
from pyisr.engine import Engine
from pyisr.integrations import BYPASS_HEADERS, is_bypassed
from pyisr.runtime import set_engine
from pyisr.server.app import App


def test_a_cookie_made_with_the_secret_is_valid_until_it_expires() -> None:
    value = draft_cookie_value("s3cret", max_age=60, now=lambda: 1000.0)
    assert is_valid(value, "s3cret", now=lambda: 1059.0)
    assert not is_valid(value, "s3cret", now=lambda: 1060.0)
    assert not is_valid(value, "another secret", now=lambda: 1001.0)


@pytest.mark.parametrize("forged", ["", "1", "abc.def", "9999999999.", "9999999999.00", "x.y.z"])
def test_forged_cookies_never_turn_draft_mode_on(forged: str) -> None:
    assert not is_valid(forged, "s3cret")


def test_an_attacker_cannot_extend_a_stolen_cookie() -> None:
    value = draft_cookie_value("s3cret", max_age=60)
    expiry, signature = value.split(".")
    assert not is_valid(f"{int(expiry) + 3600}.{signature}", "s3cret")


def test_without_any_secret_nothing_is_a_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYISR_DRAFT_SECRET", raising=False)
    monkeypatch.delenv("PYISR_REVALIDATE_SECRET", raising=False)
    assert not is_draft_request({COOKIE: "9999999999.abc"})


def test_requests_carry_it_as_a_header_or_a_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYISR_DRAFT_SECRET", "s3cret")
    value = draft_cookie_value()
    header = f"theme=dark; {COOKIE}={value}; other=1"
    assert cookie_from_header(header) == value
    assert is_draft_request(header) and is_draft_request({COOKIE: value})
    assert is_bypassed(object(), None, header)
    assert not is_bypassed(object(), None, "theme=dark")
    assert is_bypassed(object(), lambda request: True, None)
    assert dict(BYPASS_HEADERS)["x-pyisr-cache"] == "BYPASS"


# -- the site server: /_pyisr/draft and pages in draft mode --------------------------------


SITE_PAGE = """
import itertools
_renders = itertools.count(1)
revalidate = 60

def page(params):
    return f"<p>render {next(_renders)}</p>"
"""


def _site(tmp_path: Path, secret: str | None) -> Path:
    site = tmp_path / "site"
    (site / "app" / "post").mkdir(parents=True)
    (site / "app" / "post" / "page.py").write_text(SITE_PAGE)
    if secret:
        (site / "pyisr.toml").write_text(f'revalidate_secret = "{secret}"\n')
    return site


@contextlib.asynccontextmanager
async def _client(site: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = App(site, config=load_config(site), engine=Engine(MemoryCache()))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        await app.startup()
        try:
            yield client
        finally:
            await app.shutdown()
            await app.engine.close()
            set_engine(None)


async def test_a_draft_visitor_sees_fresh_renders_that_are_never_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYISR_DRAFT_SECRET", raising=False)
    async with _client(_site(tmp_path, "s3cret")) as client:
        cached = await client.get("/post")
        assert (await client.get("/post")).headers["x-pyisr-cache"] == "HIT"  # the fast path holds it now

        refused = await client.get("/_pyisr/draft", params={"secret": "wrong", "path": "/post"})
        assert refused.status_code == 401 and COOKIE not in refused.headers.get("set-cookie", "")
        for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
            bad = await client.get("/_pyisr/draft", params={"secret": "s3cret", "path": target})
            assert bad.status_code == 400, target

        on = await client.get("/_pyisr/draft", params={"secret": "s3cret", "path": "/post"})
        assert on.status_code == 307 and on.headers["location"] == "/post"
        cookie = on.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "samesite=lax" in cookie.lower()
        value = cookie.split(";", 1)[0].split("=", 1)[1]
        client.cookies.clear()  # each request below says which cookie it carries

        drafts = [await client.get("/post", headers={"cookie": f"{COOKIE}={value}"}) for _ in range(2)]
        assert [d.headers["x-pyisr-cache"] for d in drafts] == ["BYPASS", "BYPASS"]
        assert drafts[0].text != drafts[1].text != cached.text, "each draft request renders afresh"
        assert drafts[0].headers["cache-control"].startswith("private, no-cache, no-store")
        anonymous = await client.get("/post")
        assert anonymous.headers["x-pyisr-cache"] == "HIT" and anonymous.text == cached.text

        forged = await client.get("/post", headers={"cookie": f"{COOKIE}=9999999999.00"})
        assert forged.headers["x-pyisr-cache"] == "HIT" and forged.text == cached.text

        off = await client.get("/_pyisr/draft", params={"secret": "s3cret", "path": "/post", "disable": "1"})
        assert off.status_code == 307 and "Max-Age=0" in off.headers["set-cookie"]


async def test_draft_mode_is_off_without_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYISR_DRAFT_SECRET", raising=False)
    monkeypatch.delenv("PYISR_REVALIDATE_SECRET", raising=False)
    async with _client(_site(tmp_path, None)) as client:
        assert (await client.get("/_pyisr/draft", params={"secret": "", "path": "/post"})).status_code == 404


def test_under_granian_a_draft_cookie_goes_past_the_fast_path(tmp_path: Path) -> None:
    """RSGI answers hot pages before the App's full path: a draft request must not be one."""
    site = _site(tmp_path, "s3cret")
    assert run_cli(["build", str(site)], {}).returncode == 0
    with running(site, {}, server="granian") as server:
        cached = server.get("/post")
        assert server.get("/post").headers["x-pyisr-cache"] == "HIT"  # hot now
        value = draft_cookie_value("s3cret")
        draft = server.get("/post", headers={"cookie": f"{COOKIE}={value}"})
        assert draft.headers["x-pyisr-cache"] == "BYPASS"
        assert draft.headers["cache-control"].startswith("private, no-cache, no-store")
        forged = server.get("/post", headers={"cookie": f"{COOKIE}=9999999999.00"})
        assert forged.headers["x-pyisr-cache"] == "HIT" and forged.text == cached.text
