"""Precompressed pages: stored on build and regeneration, negotiated, served without compressing.

In-process tests use httpx's ASGI transport and the fake clock of conftest.py; the raw
bytes of an answer are read with ``aiter_raw`` (httpx would decode them). That a HIT
compresses nothing is observed with the counter of ``pyisr.compression`` (every body
compressed goes through ``encode``). The last test runs a real ``pyisr build`` and
``pyisr start``.
"""

from __future__ import annotations

import gzip
import json
import os
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import brotli
import httpx
import pytest
from conftest import FakeClock
from e2e_support import run_cli, running
from redis_support import redis_py, redis_url, unique_prefix  # noqa: F401

from pyisr.cache.entry import CacheEntry, EntryKind
from pyisr.cache.filesystem import FileSystemCache
from pyisr.cache.memory import MemoryCache
from pyisr.cache.tier import MemoryTier
from pyisr.compression import COUNTS, compressible, encode, negotiate
from pyisr.config import Config
from pyisr.engine import CacheStatus, Engine, Rendered, RenderPolicy
from pyisr.http import coding_etag
from pyisr.server.app import App
from pyisr.server.fast_path import ACCEPT_MEMO, hot_size
from pyisr.site_store import open_site_cache


def html(n: int = 300, mark: str = "") -> str:
    """A page of about 25 KB that compresses like real HTML."""
    rows = "".join(
        f'<li class="post"><a href="/blog/{i}">Post {i}</a> <span>by Ada, {i % 28 + 1} March</span></li>'
        for i in range(n)
    )
    return f"<!DOCTYPE html><html><head><title>{mark}</title></head><body><ul>{rows}</ul></body></html>"


def decode(coding: str | None, data: bytes) -> bytes:
    if coding == "br":
        return brotli.decompress(data)
    if coding == "gzip":
        return gzip.decompress(data)
    assert coding is None, coding
    return data


def page_entry(key: str = "/p", body: bytes | None = None, **kw: Any) -> CacheEntry:
    body = html().encode() if body is None else body
    kw.setdefault("revalidate", 60)
    return CacheEntry(key=key, body=body, created_at=kw.pop("created_at", 1000.0), **kw)


def compressed(entry: CacheEntry) -> CacheEntry:
    return replace(entry, encodings=encode(entry.body))


# -- what is compressed, and how --------------------------------------------------------------


def test_each_encoding_decodes_to_the_body_and_is_kept_only_when_smaller() -> None:
    body = html().encode()
    encodings = encode(body)
    assert list(encodings) == ["br", "gzip"]
    for coding, data in encodings.items():
        assert decode(coding, data) == body and len(data) < len(body) / 3
    assert encode(body) == encodings  # deterministic: every process stores the same bytes
    assert encode(os.urandom(4096)) == {}  # nothing smaller: nothing stored


@pytest.mark.parametrize(
    ("headers", "kind", "size", "expected"),
    [
        ({"content-type": "text/html; charset=utf-8"}, EntryKind.PAGE, 2000, True),
        ({}, EntryKind.PAGE, 2000, True),  # served as HTML
        ({"content-type": "application/json"}, EntryKind.ROUTE, 2000, True),
        ({"content-type": "application/ld+json"}, EntryKind.ROUTE, 2000, True),
        ({"content-type": "application/atom+xml"}, EntryKind.ROUTE, 2000, True),
        ({"content-type": "image/svg+xml"}, EntryKind.ROUTE, 2000, True),
        ({"content-type": "TEXT/CSS"}, EntryKind.ROUTE, 2000, True),
        ({"content-type": "text/javascript"}, EntryKind.ROUTE, 2000, True),
        ({"content-type": "text/html"}, EntryKind.PAGE, 1000, False),  # too small
        ({"content-type": "image/png"}, EntryKind.ROUTE, 2000, False),
        ({"content-type": "application/octet-stream"}, EntryKind.ROUTE, 2000, False),
        ({"content-type": "text/html", "content-encoding": "gzip"}, EntryKind.PAGE, 2000, False),
        ({"content-type": "application/json"}, EntryKind.DATA, 2000, False),  # data: never
    ],
)
def test_which_entries_are_compressed(
    headers: dict[str, str], kind: EntryKind, size: int, expected: bool
) -> None:
    entry = page_entry(body=b"a" * size, headers=headers, kind=kind)
    assert compressible(entry) is expected


BOTH = ("br", "gzip")


@pytest.mark.parametrize(
    ("accept", "offered", "expected"),
    [
        (None, BOTH, None),
        ("", BOTH, None),
        ("gzip, deflate, br, zstd", BOTH, "br"),  # a browser's: the preferred one
        ("gzip, deflate", BOTH, "gzip"),
        ("GZIP", BOTH, "gzip"),  # case-insensitive
        ("x-gzip", BOTH, "gzip"),
        ("br;q=0.5, gzip;q=0.8", BOTH, "gzip"),  # the client's q-values first
        ("br;q=0.8, gzip;q=0.8", BOTH, "br"),  # a tie: ours
        ("gzip, br;q=0", BOTH, "gzip"),
        ("br;q=0, gzip;q=0", BOTH, None),
        ("*", BOTH, "br"),
        ("*;q=0.5, gzip", BOTH, "gzip"),
        ("*, br;q=0", BOTH, "gzip"),
        ("*;q=0", BOTH, None),
        ("identity", BOTH, None),
        ("identity;q=0", BOTH, None),  # nothing acceptable: the identity body all the same
        ("identity;q=0, gzip", BOTH, "gzip"),
        ("identity, gzip;q=0.5", BOTH, None),  # the client prefers identity
        ("deflate, zstd", BOTH, None),
        ("br", ("gzip",), None),  # only what is stored
        ("gzip;q=abc, br", BOTH, "br"),  # an unreadable q-value accepts nothing
        ("gzip ; q=0.3 , br ; q=0.2", BOTH, "gzip"),
        ("br", (), None),
    ],
)
def test_negotiation(accept: str | None, offered: tuple[str, ...], expected: str | None) -> None:
    assert negotiate(accept, offered) == expected


def test_a_long_accept_encoding_is_parsed_not_remembered() -> None:
    long_header = ", ".join(f"x-coding-{i}" for i in range(60)) + ", gzip"
    assert negotiate(long_header, BOTH) == "gzip"


def test_the_etag_of_each_encoding_is_distinct_strong_and_derived() -> None:
    entry = page_entry()
    tags = {coding_etag(entry.etag, c) for c in (None, "br", "gzip")}
    assert len(tags) == 3 and all(t.startswith('"') and t.endswith('"') for t in tags)
    assert coding_etag(entry.etag, "br") == entry.etag[:-1] + '-br"'


# -- stored on a render, on a regeneration, never for data; compress = false ----------------


@pytest.fixture(params=["memory", "filesystem", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Any, Any]]:
    """A handler the engine writes to, and another instance of it that reads (what another
    process sees)."""
    if request.param == "memory":
        memory = MemoryCache()
        yield memory, memory
    elif request.param == "filesystem":
        writer, reader = FileSystemCache(tmp_path / "c"), FileSystemCache(tmp_path / "c")
        yield writer, reader
        for handler in (writer, reader):
            await handler.close()
    else:
        url = request.getfixturevalue("redis_url")
        module = redis_py()
        writer = module.RedisCache.from_url(url, prefix=unique_prefix())
        reader = module.RedisCache.from_url(url, prefix=writer.prefix)
        yield writer, reader
        await writer.clear()
        for handler in (writer, reader):
            await handler.close()


async def test_a_render_and_a_regeneration_store_the_encodings(
    clock: FakeClock, store: tuple[Any, Any]
) -> None:
    writer, handler = store
    engine = Engine(writer, clock=clock)
    renders = []

    async def render() -> Rendered:
        renders.append(1)
        return Rendered(html(mark=str(len(renders))))

    policy = RenderPolicy(revalidate=10)
    served = await engine.get("/p", render, policy)
    assert served.status is CacheStatus.MISS and served.entry is not None
    first = await handler.get("/p")
    assert first is not None and list(first.encodings) == ["br", "gzip"]
    for coding, data in first.encodings.items():
        assert decode(coding, data) == first.body
    clock.advance(11)
    assert (await engine.get("/p", render, policy)).status is CacheStatus.STALE
    await engine.drain()
    second = await handler.get("/p")
    assert second is not None and second.created_at > first.created_at and b"<title>2<" in second.body
    assert {c: decode(c, d) for c, d in second.encodings.items()} == {c: second.body for c in BOTH}
    await engine.drain()


async def test_data_entries_small_bodies_and_compress_false_store_none(clock: FakeClock) -> None:
    handler = MemoryCache()
    engine = Engine(handler, clock=clock)

    async def big() -> Rendered:
        return Rendered(json.dumps({"rows": [html()]}), headers={"content-type": "application/json"})

    async def small() -> Rendered:
        return Rendered("<p>hi</p>")

    await engine.get("data:x", big, RenderPolicy(kind=EntryKind.DATA, revalidate=10))
    await engine.get("/small", small, RenderPolicy(revalidate=10))
    await engine.get("/json", big, RenderPolicy(kind=EntryKind.ROUTE, revalidate=10))
    assert (await handler.get("data:x")).encodings == {}  # type: ignore[union-attr]
    assert (await handler.get("/small")).encodings == {}  # type: ignore[union-attr]
    assert list((await handler.get("/json")).encodings) == ["br", "gzip"]  # type: ignore[union-attr]

    off = Engine(MemoryCache(), clock=clock, compress=False)
    served = await off.get("/json", big, RenderPolicy(kind=EntryKind.ROUTE, revalidate=10))
    assert served.entry is not None and served.entry.encodings == {}


# -- every store keeps them, and counts them ----------------------------------------------------


async def test_the_file_system_cache_keeps_them_in_the_body_file(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = FileSystemCache(root)
    entry = compressed(page_entry("/blog/1"))
    assert await cache.set(entry)
    loaded = await FileSystemCache(root).get("/blog/1")  # another process's view
    assert loaded == entry and list(loaded.encodings) == ["br", "gzip"]
    body_file = root / "entries/blog/1.html"
    assert body_file.read_bytes() == entry.body + entry.encodings["br"] + entry.encodings["gzip"]
    meta = json.loads((root / "entries/blog/1.json").read_text())
    assert meta["size"] == len(entry.body)
    assert meta["encodings"] == {c: len(d) for c, d in entry.encodings.items()}
    assert body_file.stat().st_size == len(entry.body) + sum(len(d) for d in entry.encodings.values())
    # A staged write (a build) lays out the same file.
    staged = FileSystemCache(tmp_path / "staged", staging=True)
    assert await staged.set(entry)
    assert await FileSystemCache(tmp_path / "staged").get("/blog/1") == entry
    await staged.close()
    await cache.close()


def disk_bytes(root: Path) -> int:
    return sum(os.stat(Path(d, f)).st_blocks * 512 for d, _dirs, names in os.walk(root) for f in names)


async def test_the_disk_cap_counts_the_encodings(tmp_path: Path) -> None:
    """Entries whose encodings are larger than their bodies: a cap that counted bodies alone
    would let the directory grow to several times its size."""
    root = tmp_path / "cache"
    cap = 600 * 1024
    cache = FileSystemCache(root, max_bytes=cap, fsync=False)
    for i in range(20):
        body = os.urandom(16 * 1024)
        entry = replace(
            page_entry(f"/e/{i}", body=body), encodings={"br": b"b" * 48_000, "gzip": b"g" * 48_000}
        )
        assert await cache.set(entry)
        assert cache.budget.total <= cap
    await cache.evict()
    assert disk_bytes(root) <= cap
    kept = [key async for key in cache.keys()]
    assert 2 <= len(kept) < 6  # about 116 kB each: five at most under 600 kB
    await cache.close()


async def test_an_old_format_entry_still_reads(tmp_path: Path) -> None:
    """Files as the version before encodings wrote them: a body file, metadata without
    ``encodings`` (and, from older versions still, without the stamp)."""
    root = tmp_path / "cache"
    FileSystemCache(root)
    entry = page_entry("/old")
    (root / "entries").mkdir(parents=True, exist_ok=True)
    (root / "entries/old.html").write_bytes(entry.body)
    meta = entry.meta_json()
    assert "encodings" not in meta
    (root / "entries/old.json").write_text(json.dumps(meta))
    loaded = await FileSystemCache(root).get("/old")
    assert loaded == entry and loaded.encodings == {}


async def test_torn_or_garbled_encoding_bytes_on_disk_are_caught(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cache"
    cache = FileSystemCache(root)
    entry = compressed(page_entry("/t"))
    body_file = root / "entries/t.html"
    # One byte of the gzip encoding changed in place (same size: the stamp's mtime sends
    # the read to the digest of the whole file).
    await cache.set(entry)
    data = bytearray(body_file.read_bytes())
    data[-5] ^= 0xFF
    body_file.write_bytes(bytes(data))
    assert await FileSystemCache(root).get("/t") is None
    assert "inconsistent" in caplog.text
    # Cut short (a torn file): the size says so.
    await cache.set(replace(entry, created_at=2000.0))
    body_file.write_bytes(body_file.read_bytes()[:-10])
    assert await FileSystemCache(root).get("/t") is None
    # Metadata that lists an encoding the file does not hold.
    await cache.set(replace(entry, created_at=3000.0))
    meta_file = root / "entries/t.json"
    meta = json.loads(meta_file.read_text())
    meta["encodings"]["br"] += 1
    meta_file.write_text(json.dumps(meta))
    assert await FileSystemCache(root).get("/t") is None
    # A new write replaces what could not be read.
    assert await cache.set(replace(entry, created_at=4000.0))
    assert await FileSystemCache(root).get("/t") == replace(entry, created_at=4000.0)
    await cache.close()


def test_a_writer_killed_between_renames_is_completed_with_its_encodings(tmp_path: Path) -> None:
    import asyncio
    import multiprocessing
    import signal

    import _fs_worker

    root = tmp_path / "cache"
    asyncio.run(FileSystemCache(root).set(compressed(page_entry("/crash", created_at=100.0))))
    new = compressed(page_entry("/crash", body=html(mark="new").encode(), created_at=200.0))
    ctx = multiprocessing.get_context("forkserver")
    args = (str(root), "/crash", new.body, 200.0, dict(new.encodings))
    proc = ctx.Process(target=_fs_worker.die_between_renames, args=args)  # type: ignore[attr-defined]
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    # The new body file (body and encodings) is in place, the old metadata still is: the
    # pair is torn, and the reader completes the write from the fsynced temporary metadata.
    assert (root / "entries/crash.html").read_bytes().startswith(new.body)
    loaded = asyncio.run(FileSystemCache(root).get("/crash"))
    assert loaded is not None and loaded.created_at == 200.0
    assert loaded.body == new.body and loaded.encodings == new.encodings


def test_entries_with_and_without_encodings_pickle_and_compare() -> None:
    """A custom handler may pickle entries; most entries share one empty mapping."""
    import pickle

    plain, encoded = page_entry(), compressed(page_entry())
    assert pickle.loads(pickle.dumps(plain)) == plain and plain.encodings == {}
    assert pickle.loads(pickle.dumps(encoded)) == encoded != plain
    assert page_entry().encodings is plain.encodings  # no dict per entry


async def test_memory_budgets_count_every_encoding() -> None:
    entry = compressed(page_entry())
    extra = sum(len(d) for d in entry.encodings.values())
    assert entry.size() - replace(entry, encodings={}).size() >= extra
    memory = MemoryCache(max_bytes=10 * 1024 * 1024)
    await memory.set(entry)
    assert memory.describe()["bytes"] == entry.size()
    tier = MemoryTier(MemoryCache(), max_bytes=10 * 1024 * 1024)
    await tier.set(entry)
    assert tier.describe()["memory_tier"]["bytes"] == entry.size()
    # A budget that holds the bodies but not their encodings keeps fewer entries.
    small = MemoryCache(max_bytes=4 * replace(entry, key="/p/0").size())
    for i in range(10):
        await small.set(replace(entry, key=f"/p/{i}"))
    assert small.describe()["entries"] == 4
    assert hot_size(entry) == len(entry.body) + extra + 3 * 1024


async def test_redis_keeps_them_in_the_same_atomic_write(redis_url: str) -> None:  # noqa: F811
    module = redis_py()
    from redis.asyncio import Redis

    cache = module.RedisCache.from_url(redis_url, prefix=unique_prefix())
    other = module.RedisCache.from_url(redis_url, prefix=cache.prefix)
    raw = Redis.from_url(redis_url)
    try:
        entry = compressed(page_entry("/r"))
        assert await cache.set(entry)
        assert await other.get("/r") == entry
        fields = await raw.hgetall(cache.entry_key("/r"))
        assert fields[b"enc:br"] == entry.encodings["br"] and fields[b"enc:gzip"] == entry.encodings["gzip"]
        # A later entry without encodings leaves none of the older ones behind.
        plain = page_entry("/r", body=b"<p>short</p>", created_at=2000.0)
        assert await cache.set(plain)
        assert not any(f.startswith(b"enc:") for f in await raw.hgetall(cache.entry_key("/r")))
        assert await other.get("/r") == plain
        # An entry written the old way (no encodings, the old script's four fields) reads.
        old = page_entry("/old")
        await raw.hset(
            cache.entry_key("/old"),
            mapping={"key": "/old", "created_at": "1000.0", "meta": old.meta_bytes(), "body": old.body},
        )
        assert await other.get("/old") == old
        # An encoding the metadata lists but the hash lacks (or of another length): unreadable.
        await cache.set(replace(entry, created_at=3000.0))
        await raw.hset(cache.entry_key("/r"), "enc:br", b"short")
        assert await other.get("/r") is None
    finally:
        await raw.aclose()
        await cache.clear()
        for handler in (cache, other):
            await handler.close()


async def test_seeding_a_shared_cache_copies_the_encodings(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    module = redis_py()
    from pyisr.cache.seed import seed_from_local

    local = FileSystemCache(tmp_path / "local")
    entry = compressed(page_entry("/seeded"))
    await local.set(entry)
    await local.close()
    shared = module.RedisCache.from_url(redis_url, prefix=unique_prefix())
    try:
        assert await seed_from_local(shared, tmp_path / "local") == 1
        assert await shared.get("/seeded") == entry
    finally:
        await shared.clear()
        await shared.close()


# -- answers: the server (fast path, full path, RSGI) -------------------------------------------

PAGES = {
    "app/big/page.py": """
        revalidate = 60
        RENDERS = []

        def page(params):
            RENDERS.append(1)
            rows = "".join(f"<li>Post {i}: a line of text about post {i}</li>" for i in range(400))
            return f"<html><body><h1>render {len(RENDERS)}</h1><ul>{rows}</ul></body></html>"
        """,
    "app/small/page.py": """
        revalidate = 60

        def page(params):
            return "<p>small</p>"
        """,
    "app/img/route.py": """
        import random
        from starlette.responses import Response

        revalidate = 60
        PNG = bytes(random.Random(1).randrange(256) for _ in range(8000))

        def GET(request):
            return Response(PNG, media_type="image/png")
        """,
    "app/api/route.py": """
        revalidate = 60

        def GET(request):
            return {"rows": [{"id": i, "title": f"Post {i}", "body": "text " * 10} for i in range(200)]}
        """,
    "app/dyn/page.py": """
        revalidate = 0

        def page(params):
            return "<html><body>" + "dynamic text " * 500 + "</body></html>"
        """,
    "app/cookie/route.py": """
        from starlette.responses import Response

        revalidate = 60

        def GET(request):
            response = Response("<html><body>" + "yours " * 500 + "</body></html>", media_type="text/html")
            response.set_cookie("session", "abc")
            return response
        """,
}


def make_site(root: Path) -> Path:
    site = root / "site"
    for name, source in PAGES.items():
        path = site / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return site


@pytest.fixture
async def served(tmp_path: Path, clock: FakeClock) -> AsyncIterator[tuple[App, httpx.AsyncClient]]:
    site = make_site(tmp_path)
    config = Config()
    app = App(site, config=config, engine=Engine(open_site_cache(site, config), clock=clock))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        await app.startup()
        yield app, client
        await app.shutdown()


async def fetch(
    client: httpx.AsyncClient, path: str, accept: str | None = None, method: str = "GET", **headers: str
) -> tuple[httpx.Response, bytes]:
    """An answer and its bytes as sent (``Accept-Encoding`` only when given)."""
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    sent["accept-encoding"] = accept if accept is not None else ""
    async with client.stream(method, path, headers=sent) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    return response, raw


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "full path"])
async def test_answers_carry_the_negotiated_encoding(
    served: tuple[App, httpx.AsyncClient], fast: bool
) -> None:
    app, client = served
    app.fast.enabled = fast
    identity, page = await fetch(client, "/big")  # the MISS: rendered, compressed, stored
    assert identity.headers["x-pyisr-cache"] == "MISS"
    assert "content-encoding" not in identity.headers
    assert identity.headers["vary"] == "Accept-Encoding"  # the identity variant says so too
    assert int(identity.headers["content-length"]) == len(page)
    etags = {None: identity.headers["etag"]}
    for accept, coding in (("gzip, deflate, br", "br"), ("gzip", "gzip"), ("br;q=0, gzip", "gzip")):
        for _ in range(2):  # the second one from the fast path when it is on
            response, raw = await fetch(client, "/big", accept)
            assert response.status_code == 200 and response.headers["x-pyisr-cache"] == "HIT"
            assert response.headers["content-encoding"] == coding
            assert response.headers["vary"] == "Accept-Encoding"
            assert int(response.headers["content-length"]) == len(raw) < len(page) / 3
            assert decode(coding, raw) == page
            etags[coding] = response.headers["etag"]
    assert len(set(etags.values())) == 3
    assert etags["br"] == coding_etag(etags[None], "br")
    # 304 per encoding: only the ETag of the representation this request would get.
    for accept, coding in ((None, None), ("br", "br"), ("gzip", "gzip")):
        for held, tag in etags.items():
            response, raw = await fetch(client, "/big", accept, if_none_match=tag)
            if held == coding:
                assert response.status_code == 304 and raw == b""
                assert response.headers["etag"] == tag and response.headers["vary"] == "Accept-Encoding"
                assert "content-encoding" not in response.headers
                assert "content-type" not in response.headers
            else:
                assert response.status_code == 200
                assert response.headers.get("content-encoding") == coding
    # HEAD: the encoded representation's headers, no body.
    head, raw = await fetch(client, "/big", "br", method="HEAD")
    assert head.status_code == 200 and raw == b""
    assert head.headers["content-encoding"] == "br" and head.headers["etag"] == etags["br"]
    assert int(head.headers["content-length"]) == len(brotli.compress(page, quality=5, mode=brotli.MODE_TEXT))
    assert (app.fast.by_raw_path.get(b"/big") is not None) is fast


async def test_small_binary_json_dynamic_and_private_answers(served: tuple[App, httpx.AsyncClient]) -> None:
    app, client = served
    for _ in range(2):
        small, raw = await fetch(client, "/small", "br, gzip")
        assert (
            raw == b"<p>small</p>" and "content-encoding" not in small.headers and "vary" not in small.headers
        )
        img, raw = await fetch(client, "/img", "br, gzip")
        assert img.headers["content-type"] == "image/png" and "content-encoding" not in img.headers
        assert len(raw) == 8000
        api, raw = await fetch(client, "/api", "gzip")
        assert api.headers["content-encoding"] == "gzip"
        assert json.loads(decode("gzip", raw))["rows"][199]["id"] == 199
        # revalidate = 0 (never stored) and a render that sets a cookie (PRIVATE): their
        # own identity bodies, never stored bytes.
        dyn, raw = await fetch(client, "/dyn", "br, gzip")
        assert "content-encoding" not in dyn.headers and raw.startswith(b"<html>")
        private, raw = await fetch(client, "/cookie", "br, gzip")
        assert "set-cookie" in private.headers and "content-encoding" not in private.headers
        assert raw.startswith(b"<html>")
    assert await app.engine.handler.get("/cookie") is None


async def test_compress_false_stores_and_serves_none(tmp_path: Path, clock: FakeClock) -> None:
    site = make_site(tmp_path)
    config = Config(compress=False)
    app = App(site, config=config)
    assert app.engine.compress is False
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for _ in range(2):
            response, raw = await fetch(client, "/big", "br, gzip")
            assert "content-encoding" not in response.headers and raw.startswith(b"<html>")
        entry = await app.engine.handler.get("/big")
        assert entry is not None and entry.encodings == {}
        await app.shutdown()


class _RSGIHeaders:
    def __init__(self, items: dict[str, str]) -> None:
        self._items = items

    def get(self, key: str, default: Any = None) -> Any:
        return self._items.get(key, default)

    def items(self) -> list[tuple[str, str]]:
        return list(self._items.items())


class _RSGIScope:
    proto = "http"
    method = "GET"
    query_string = ""
    http_version = "1.1"
    scheme = "http"
    client = "127.0.0.1:50000"
    server = "127.0.0.1:3000"
    authority = None

    def __init__(self, path: str, headers: dict[str, str]) -> None:
        self.path = path
        self.headers = _RSGIHeaders({"host": "127.0.0.1:3000", **headers})


class _RSGIProto:
    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str], bytes]] = []

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.answers.append((status, dict(headers), body))


async def test_a_hit_compresses_nothing_on_any_path(served: tuple[App, httpx.AsyncClient]) -> None:
    app, client = served
    first, raw = await fetch(client, "/big", "br")  # the MISS compresses, once
    assert first.headers["content-encoding"] == "br"
    page = decode("br", raw)
    await fetch(client, "/big", "br")  # a HIT makes it hot
    assert app.fast.by_raw_path.get(b"/big") is not None
    before = COUNTS.bodies
    accepts = ["br", "gzip", "gzip, deflate, br, zstd", "", "identity", "*"]
    for i in range(60):  # the ASGI fast path
        response, raw = await fetch(client, "/big", accepts[i % len(accepts)])
        assert response.headers["x-pyisr-cache"] == "HIT"
        assert decode(response.headers.get("content-encoding"), raw) == page
    proto = _RSGIProto()
    for i in range(60):  # the RSGI fast path, inline in App.__rsgi__
        await app.__rsgi__(_RSGIScope("/big", {"accept-encoding": accepts[i % len(accepts)]}), proto)
    assert len(proto.answers) == 60
    for status, headers, body in proto.answers:
        assert status == 200 and decode(headers.get("content-encoding"), body) == page
    app.fast.enabled = False
    app.fast.forget_all()
    for i in range(30):  # the full path
        response, raw = await fetch(client, "/big", accepts[i % len(accepts)])
        assert response.headers["x-pyisr-cache"] == "HIT"
        assert decode(response.headers.get("content-encoding"), raw) == page
    assert COUNTS.bodies == before
    # Odd Accept-Encoding values are answered, and do not grow the fast path's memo.
    app.fast.enabled = True
    for i in range(40):
        response, raw = await fetch(client, "/big", f"gzip;q=0.{i % 9 + 1}, x-odd-{i}")
        assert response.headers["content-encoding"] == "gzip"
    hot = app.fast.by_raw_path[b"/big"]
    assert hot.by_accept is not None and len(hot.by_accept) <= ACCEPT_MEMO


# -- answers: the integrations ---------------------------------------------------------------------


def _starlette_app(engine: Engine, *, gzip_outside: bool, bypass: bool = False) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.gzip import GZipMiddleware
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    from pyisr.integrations.asgi import ISRMiddleware

    async def blog(request: Any) -> Any:
        return HTMLResponse(html(mark=request.path_params["id"]))

    middleware = [Middleware(GZipMiddleware, minimum_size=500)] if gzip_outside else []
    middleware.append(
        Middleware(
            ISRMiddleware,
            routes={"/blog/{id}": 60},
            engine=engine,
            site_url="http://testserver",
            bypass=(lambda request: True) if bypass else None,
        )
    )
    return Starlette(routes=[Route("/blog/{id}", blog)], middleware=middleware)


async def test_starlette_answers_are_encoded_once_and_hits_compress_nothing(clock: FakeClock) -> None:
    engine = Engine(MemoryCache(), clock=clock)
    app = _starlette_app(engine, gzip_outside=True)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        page = html(mark="1").encode()
        for coding in ("br", "gzip", "br", "gzip"):
            response, raw = await fetch(client, "/blog/1", coding)
            # Starlette's GZipMiddleware sees our Content-Encoding and leaves the answer be.
            assert response.headers["content-encoding"] == coding
            assert decode(coding, raw) == page  # one layer of encoding, not two
            assert int(response.headers["content-length"]) == len(raw)
            assert response.headers["vary"] == "Accept-Encoding"
        before = COUNTS.bodies
        for i in range(30):
            response, raw = await fetch(client, "/blog/1", ("br", "gzip", "")[i % 3])
            assert response.headers["x-pyisr-cache"] == "HIT"
            assert decode(response.headers.get("content-encoding"), raw) == page
        assert COUNTS.bodies == before
        tag = (await fetch(client, "/blog/1", "br"))[0].headers["etag"]
        not_modified, raw = await fetch(client, "/blog/1", "br", if_none_match=tag)
        assert not_modified.status_code == 304 and raw == b""
        assert (await fetch(client, "/blog/1", "gzip", if_none_match=tag))[0].status_code == 200
    await engine.drain()


async def test_a_bypassed_starlette_answer_is_never_a_stored_encoding(clock: FakeClock) -> None:
    engine = Engine(MemoryCache(), clock=clock)
    cached = _starlette_app(engine, gzip_outside=False)
    transport = httpx.ASGITransport(app=cached)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        assert (await fetch(client, "/blog/1", "br"))[0].headers["content-encoding"] == "br"
    bypassed = _starlette_app(engine, gzip_outside=False, bypass=True)  # same engine, same entry
    transport = httpx.ASGITransport(app=bypassed)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response, raw = await fetch(client, "/blog/1", "br")
        assert response.headers["x-pyisr-cache"] == "BYPASS"
        assert "content-encoding" not in response.headers and raw == html(mark="1").encode()
    await engine.drain()


@pytest.fixture
def django_client() -> Iterator[Any]:
    pytest.importorskip("django")
    # The suite's Django settings (configured once per process, first caller wins).
    from test_django_integration import configure_django

    configure_django()
    from django.http import HttpResponse
    from django.test import Client, override_settings
    from django.urls import path

    from pyisr.integrations.django import isr
    from pyisr.integrations.django.testing import isolated_cache

    @isr(revalidate=60)
    def post(request: Any, id: int) -> Any:
        return HttpResponse(html(mark=str(id)))

    class URLs:
        urlpatterns = [path("p/<int:id>/", post)]

    from django.conf import settings

    gzip = ["django.middleware.gzip.GZipMiddleware", *settings.MIDDLEWARE]
    with isolated_cache(), override_settings(ROOT_URLCONF=URLs, MIDDLEWARE=gzip):
        yield Client()


def test_django_gzip_middleware_never_encodes_again(django_client: Any) -> None:
    page = html(mark="7").encode()
    for coding in ("gzip", "br", "gzip"):
        response = django_client.get("/p/7/", headers={"accept-encoding": coding})
        assert response["content-encoding"] == coding
        assert decode(coding, response.content) == page  # exactly one layer
        assert int(response["content-length"]) == len(response.content)
        assert "Accept-Encoding" in response["vary"]
    before = COUNTS.bodies
    for _ in range(10):
        response = django_client.get("/p/7/", headers={"accept-encoding": "gzip, br"})
        assert response["x-pyisr-cache"] == "HIT" and decode("br", response.content) == page
    assert COUNTS.bodies == before
    # No Accept-Encoding: the identity body (GZipMiddleware has nothing to do either).
    plain = django_client.get("/p/7/", headers={"accept-encoding": ""})
    assert plain.content == page and "content-encoding" not in plain


def test_flask_serves_the_stored_encoding(sync_engine: Engine) -> None:
    pytest.importorskip("flask")
    from flask import Flask

    from pyisr.integrations.flask import isr

    app = Flask("pyisr_compression_test")

    @app.get("/p/<int:id>")
    @isr(revalidate=60)
    def post(id: int) -> Any:
        return html(mark=str(id))

    client = app.test_client()
    page = html(mark="3").encode()
    for coding in ("br", "gzip", None):
        response = client.get("/p/3", headers={"accept-encoding": coding or ""})
        assert response.headers.get("content-encoding") == coding
        assert decode(coding, response.get_data()) == page
        assert response.headers["vary"] == "Accept-Encoding"


# -- inspect ---------------------------------------------------------------------------------------


async def test_cache_inspect_shows_the_encodings(clock: FakeClock) -> None:
    from pyisr.cache_tools import entry_block, inspect, render_text
    from pyisr.explain import explain

    engine = Engine(MemoryCache(), clock=clock)

    async def render() -> Rendered:
        return Rendered(html())

    await engine.get("/i", render, RenderPolicy(revalidate=60))
    info = await inspect(engine, "/i", clock())
    assert info is not None
    entry = await engine.handler.get("/i")
    assert entry is not None
    assert info["encodings"] == {"br": len(entry.encodings["br"]), "gzip": len(entry.encodings["gzip"])}
    explained = await explain(engine.handler, "/i", clock())
    text = render_text(entry_block(explained, info, clock()), width=120)
    assert "encodings" in text and "br " in text and "gzip " in text
    # The size listed (and sorted by) is what the entry takes: the body and each encoding.
    assert explained.row is not None
    assert explained.row.size == len(entry.body) + len(entry.encodings["br"]) + len(entry.encodings["gzip"])


# -- end to end: pyisr build, pyisr start -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("server_kind", ["uvicorn", "granian"])
def test_a_real_server_serves_the_built_encodings(tmp_path: Path, server_kind: str) -> None:
    site = make_site(tmp_path)
    built = run_cli(["build", str(site)], {})
    assert built.returncode == 0, built.stdout + built.stderr
    with running(site, {}, server=server_kind) as server:
        bodies = {}
        for accept in ("identity", "br", "gzip", "br", "gzip;q=0.5, br;q=0.1", "identity"):
            with server.client.stream("GET", server.url + "/big", headers={"accept-encoding": accept}) as r:
                raw = b"".join(r.iter_raw())
                coding = r.headers.get("content-encoding")
                assert r.headers["x-pyisr-cache"] == "HIT"  # the build's render, and its encodings
                assert coding == {"identity": None, "gzip;q=0.5, br;q=0.1": "gzip"}.get(accept, accept)
                assert int(r.headers["content-length"]) == len(raw)
                assert r.headers["vary"] == "Accept-Encoding"
                bodies[accept] = decode(coding, raw)
        assert len(set(bodies.values())) == 1 and b"<h1>render 1</h1>" in bodies["br"]
        head = server.request("HEAD", "/big", headers={"accept-encoding": "br"})
        assert head.headers["content-encoding"] == "br" and head.content == b""
