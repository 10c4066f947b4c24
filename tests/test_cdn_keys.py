"""Tags on the wire: the one mapping from cache tags to edge keys (pyisr.cdn.keys), and the
``Surrogate-Key`` / ``Cache-Tag`` headers every cacheable answer carries, and only those.

The purge side uses the same mapping (tests/test_cdn_purge.py checks that a purge names a
key the page carried); here, the mapping's own promises and the server's answers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from pyisr.cache.memory import MemoryCache
from pyisr.cache.tags import LAYOUT_TAG, PAGE_TAG, PATH_TAG, implicit_tags, stale_tag
from pyisr.cdn.keys import (
    CACHE_TAG,
    MAX_HEADER_BYTES,
    MAX_KEY_LENGTH,
    OVERFLOW_KEY,
    SURROGATE_KEY,
    build_key,
    edge_key,
    edge_keys,
    parse_tag_headers,
    purge_keys,
    tag_headers,
)
from pyisr.config import Config, ConfigError, load_config
from pyisr.draft import COOKIE, draft_cookie_value
from pyisr.engine import Engine
from pyisr.runtime import set_engine
from pyisr.server.app import App

HASHED = re.compile(r"h:[0-9a-f]{32}")


def test_plain_tags_are_sent_as_written() -> None:
    for tag in ("posts", "user:42", "blog/[id]", "a-b_c.d~e", "x" * MAX_KEY_LENGTH):
        assert edge_key(tag) == tag


def test_implicit_tags_have_short_stable_forms() -> None:
    assert edge_key(PATH_TAG + "/blog/1") == "_p/blog/1"
    assert edge_key(PAGE_TAG + "/blog/[id]") == "_r/blog/[id]"
    assert edge_key(LAYOUT_TAG + "/blog") == "_l/blog"
    assert edge_key(LAYOUT_TAG + "/") == "_l/"
    # A stale mark has no key of its own: it purges the tag's.
    assert edge_key(stale_tag("posts")) == "posts"
    assert edge_key(stale_tag(PATH_TAG + "/blog/1")) == "_p/blog/1"


@pytest.mark.parametrize(
    "tag",
    ["x" * (MAX_KEY_LENGTH + 1), "two words", "a,b", 'say "hi"', "back\\slash", "café", "日本", "tab\there"],
)
def test_long_unsafe_and_non_ascii_tags_are_hashed(tag: str) -> None:
    key = edge_key(tag)
    assert HASHED.fullmatch(key), key  # ASCII, no separator, lower case (Cloudflare folds case)
    assert edge_key(tag) == key and edge_key(tag + "!") != key


def test_a_long_path_is_hashed_whole() -> None:
    path = "/docs/" + "a" * 200
    key = edge_key(PATH_TAG + path)
    assert HASHED.fullmatch(key) and key != edge_key(LAYOUT_TAG + path)


def test_keys_are_the_same_in_every_process() -> None:
    tags = ["posts", "café", "x" * 300, PATH_TAG + "/blog/é", PAGE_TAG + "/a b"]
    script = (
        "import sys, json; from pyisr.cdn.keys import edge_key; "
        "print(json.dumps([edge_key(t) for t in json.loads(sys.argv[1])]))"
    )
    seen = set()
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", script, json.dumps(tags)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        seen.add(tuple(json.loads(done.stdout)))
    assert seen == {tuple(edge_key(t) for t in tags)}


def test_purges_name_the_overflow_key_too() -> None:
    assert purge_keys(["posts", stale_tag("posts")]) == ["posts", OVERFLOW_KEY]
    assert purge_keys([]) == []
    assert edge_keys(["a", "b", "a"]) == ["a", "b"]


def test_the_header_is_bounded_and_ends_with_the_overflow_key() -> None:
    many = tuple(f"tag-{i:04d}-" + "x" * 50 for i in range(300))
    tags = (*many, *implicit_tags("/blog/1", "/blog/[id]"))
    [(name, value)] = tag_headers(tags, (SURROGATE_KEY,))
    keys = value.decode().split(" ")
    assert name == b"surrogate-key" and len(value) <= MAX_HEADER_BYTES
    assert keys[-1] == OVERFLOW_KEY
    assert set(keys[:2]) == {"_p/blog/1", "_r/blog/[id]"}  # the page's own keys always fit
    # Every purge names the overflow key: a tag left out still reaches the page.
    left_out = next(t for t in many if t not in keys)
    assert OVERFLOW_KEY in purge_keys([left_out])
    [(_, comma)] = tag_headers(tags, (CACHE_TAG,))
    assert comma.decode().split(",") == keys


def test_few_tags_are_sent_whole_without_the_overflow_key() -> None:
    [(_, value)] = tag_headers(("posts", *implicit_tags("/blog/1", "/blog/[id]")), (SURROGATE_KEY,))
    assert value.decode().split(" ") == [
        "_r/blog/[id]",
        "_p/blog/1",
        "posts",
        "_l/",
        "_l/blog",
        "_l/blog/[id]",
        "_l/blog/1",
    ]


def test_a_builds_key_follows_the_pages_own_keys_and_always_fits() -> None:
    tags = ("posts", *implicit_tags("/blog/1", "/blog/[id]"))
    [(_, value)] = tag_headers(tags, (SURROGATE_KEY,), "b1d")
    assert value.decode().split(" ")[:4] == ["_r/blog/[id]", "_p/blog/1", "_b/b1d", "posts"]
    [(_, unbuilt)] = tag_headers(tags, (SURROGATE_KEY,))  # an integration's: no build
    assert build_key("b1d") == "_b/b1d" and b"_b/" not in unbuilt
    many = tuple(f"tag-{i:04d}-" + "x" * 50 for i in range(300))
    [(_, full)] = tag_headers((*many, *tags), (CACHE_TAG,), "b1d")
    kept = full.decode().split(",")
    assert len(full) <= MAX_HEADER_BYTES and "_b/b1d" in kept[:3] and kept[-1] == OVERFLOW_KEY


def test_cdn_tag_headers_setting() -> None:
    assert parse_tag_headers("none") == ()
    assert parse_tag_headers(["Surrogate-Key"]) == (SURROGATE_KEY,)
    assert parse_tag_headers("Cache-Tag, Surrogate-Key") == (CACHE_TAG, SURROGATE_KEY)
    with pytest.raises(ValueError, match="unknown header 'x-tags'"):
        parse_tag_headers(["X-Tags"])
    assert load_config(None, environ={"PYISR_CDN_TAG_HEADERS": "none"}).cdn_tag_headers == ()
    with pytest.raises(ConfigError, match="PYISR_CDN_TAG_HEADERS"):
        load_config(None, environ={"PYISR_CDN_TAG_HEADERS": "Edge-Tag"})


# -- the server's answers -------------------------------------------------------------------------

PAGES = {
    "app/blog/[id]/page.py": """
        from pyisr import cached

        revalidate = 60
        tags = ["posts"]

        def _author(id):
            return {"name": "ann"}

        author = cached(_author, ["author"], tags=["authors", "author:" + "1"], revalidate=3600)

        def generate_static_params():
            return [{"id": "1"}]

        def page(params):
            return "<p>" + params["id"] + " by " + author(params["id"])["name"] + "</p>"
        """,
    "app/live/page.py": """
        revalidate = 0
        tags = ["live"]

        def page(params):
            return "<p>live</p>"
        """,
    "app/mine/page.py": """
        from starlette.responses import HTMLResponse

        revalidate = 60
        tags = ["mine"]

        def page(params):
            return HTMLResponse("<p>mine</p>", headers={"set-cookie": "session=1"})
        """,
}


def make_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    for rel, text in PAGES.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return site


async def client_for(site: Path, config: Config) -> AsyncIterator[httpx.AsyncClient]:
    app = App(site, config=config, engine=Engine(MemoryCache(), cdn_tag_headers=config.cdn_tag_headers))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        await app.startup()
        try:
            yield client
        finally:
            await app.shutdown()
            await app.engine.close()
            set_engine(None)


@pytest.fixture
async def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.delenv("PYISR_DRAFT_SECRET", raising=False)
    async for found in client_for(make_site(tmp_path), Config(revalidate_secret="s3cret-for-drafts")):
        yield found


async def test_cacheable_answers_carry_their_tags_in_both_headers(client: httpx.AsyncClient) -> None:
    answers = [await client.get("/blog/1") for _ in range(3)]  # MISS, HIT, and the fast path's HIT
    assert [a.headers["x-pyisr-cache"] for a in answers] == ["MISS", "HIT", "HIT"]
    for answer in answers:
        keys = answer.headers["surrogate-key"].split(" ")
        assert answer.headers["cache-tag"].split(",") == keys
        # The page's tag, the ones inherited from its data call, and its implicit keys.
        assert {"posts", "authors", "author:1", "_p/blog/1", "_r/blog/[id]", "_l/blog"} <= set(keys)
        assert OVERFLOW_KEY not in keys
    head = await client.head("/blog/1")
    assert head.headers["surrogate-key"] == answers[0].headers["surrogate-key"]


async def test_answers_no_shared_cache_keeps_carry_no_tags(client: httpx.AsyncClient) -> None:
    live = await client.get("/live")  # revalidate = 0
    mine = await client.get("/mine")  # sets a cookie: private
    draft = await client.get(
        "/blog/1", headers={"cookie": f"{COOKIE}={draft_cookie_value('s3cret-for-drafts')}"}
    )
    assert "no-store" in live.headers["cache-control"] and "no-store" in mine.headers["cache-control"]
    assert draft.headers["x-pyisr-cache"] == "BYPASS"
    for answer in (live, mine, draft):
        assert "surrogate-key" not in answer.headers and "cache-tag" not in answer.headers


@pytest.mark.parametrize(("setting", "sent"), [("none", set()), ("Cache-Tag", {"cache-tag"})])
async def test_the_setting_picks_the_headers(tmp_path: Path, setting: str, sent: set[str]) -> None:
    config = Config(cdn_tag_headers=parse_tag_headers(setting))
    async for client in client_for(make_site(tmp_path), config):
        answers = [await client.get("/blog/1") for _ in range(3)]
        for answer in answers:
            assert {h for h in (SURROGATE_KEY, CACHE_TAG) if h in answer.headers} == sent
