"""``fetch``: HTTP through the data cache, against a real origin server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pyisr import (
    CacheStatus,
    Engine,
    MemoryCache,
    Rendered,
    RenderPolicy,
    arevalidate_tag,
    fetch,
    fetch_sync,
    revalidate_tag,
    set_engine,
)
from pyisr.cache.tags import implicit_tags


class Origin:
    """A tiny origin server: counts hits per path (with query) and answers chosen statuses."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.status = 200  # what every path answers
        self.lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                with origin.lock:
                    origin.hits[self.path] += 1
                    n = origin.hits[self.path]
                    status = origin.status
                payload = json.dumps(
                    {
                        "path": self.path,
                        "n": n,
                        "method": self.command,
                        "x_key": self.headers.get("x-key"),
                        "cookie": self.headers.get("cookie"),
                        "body": body.decode(),
                    }
                ).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("x-origin", "yes")
                if self.path.startswith("/set-cookie"):
                    self.send_header("set-cookie", "session=secret; Path=/")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), name="origin", daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    def reset(self) -> None:
        with self.lock:
            self.hits.clear()
            self.status = 200

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def _origin_server() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


@pytest.fixture
def origin(_origin_server: Origin, monkeypatch) -> Origin:
    # Never route the test's requests through a proxy from the environment.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PYISR_LOG_FETCHES", raising=False)
    monkeypatch.delenv("PYISR_LOG_FETCHES_FULL_URL", raising=False)
    monkeypatch.delenv("PYISR_DEBUG_CACHE", raising=False)
    _origin_server.reset()
    return _origin_server


@pytest.fixture
async def engine(clock) -> AsyncIterator[Engine]:
    """conftest's ``engine``, with the default render timeout.

    The 2 s of conftest's engine is too tight here: a local origin on a loaded machine can take seconds.
    """
    eng = Engine(MemoryCache(), clock=clock, debug=True)
    set_engine(eng)
    yield eng
    await eng.drain()
    set_engine(None)


def page_policy(path: str, revalidate: int | None = None) -> RenderPolicy:
    return RenderPolicy(revalidate=revalidate, tags=implicit_tags(path, path))


# -- what is cached ---------------------------------------------------------------------


async def test_a_2xx_response_is_cached(engine, origin):
    url = origin.url("/data")
    first = await fetch(url, revalidate=60)
    second = await fetch(url, revalidate=60)
    assert first.status_code == second.status_code == 200
    assert first.json()["n"] == second.json()["n"] == 1
    assert origin.hits["/data"] == 1
    # The cached response is a full response: headers, URL, method, text.
    assert second.headers["x-origin"] == "yes" and second.headers["content-type"] == "application/json"
    assert str(second.url) == url and second.request.method == "GET"
    assert json.loads(second.text) == second.json()


@pytest.mark.parametrize("status", [201, 299])
async def test_other_2xx_statuses_are_cached(engine, origin, status):
    origin.status = status
    url = origin.url(f"/s{status}")
    assert (await fetch(url, revalidate=60)).status_code == status
    assert (await fetch(url, revalidate=60)).status_code == status
    assert origin.hits[f"/s{status}"] == 1


@pytest.mark.parametrize("status", [404, 500, 503, 302])
async def test_a_non_2xx_response_is_returned_and_not_cached(engine, origin, status):
    origin.status = status
    url = origin.url(f"/bad{status}")
    for n in (1, 2):
        response = await fetch(url, revalidate=60, tags=["bad"])
        assert response.status_code == status
        assert response.json()["n"] == n  # the origin was asked again
    origin.status = 200
    assert (await fetch(url, revalidate=60)).status_code == 200
    assert (await fetch(url, revalidate=60)).json()["n"] == 3
    assert origin.hits[f"/bad{status}"] == 3


async def test_a_stale_200_keeps_being_served_while_the_origin_fails(engine, clock, origin):
    url = origin.url("/flaky")
    assert (await fetch(url, revalidate=5)).json()["n"] == 1
    origin.status = 500
    clock.advance(6)
    stale = await fetch(url, revalidate=5)
    assert stale.status_code == 200 and stale.json()["n"] == 1
    await engine.drain()  # the background refetch got a 500: nothing replaced
    assert origin.hits["/flaky"] == 2
    kept = await fetch(url, revalidate=5)
    assert kept.status_code == 200 and kept.json()["n"] == 1
    # Once the origin recovers (and the back-off has passed) the value is refreshed.
    origin.status = 200
    clock.advance(6)
    assert (await fetch(url, revalidate=5)).json()["n"] == 1
    await engine.drain()
    assert (await fetch(url, revalidate=5)).json()["n"] == 3


async def test_an_invalidated_fetch_returns_the_last_good_response_while_the_origin_fails(
    engine, clock, origin
):
    url = origin.url("/inv")
    assert (await fetch(url, tags=["inv"])).json()["n"] == 1
    origin.status = 503
    clock.advance(1)
    await arevalidate_tag("inv")
    clock.advance(0.001)
    response = await fetch(url, tags=["inv"])
    assert response.status_code == 200 and response.json()["n"] == 1


async def test_revalidate_seconds(engine, clock, origin):
    url = origin.url("/timed")
    assert (await fetch(url, revalidate=8)).json()["n"] == 1
    clock.advance(7.9)
    assert (await fetch(url, revalidate=8)).json()["n"] == 1
    clock.advance(0.1)
    assert (await fetch(url, revalidate=8)).json()["n"] == 1  # stale, refetching behind
    await engine.drain()
    assert (await fetch(url, revalidate=8)).json()["n"] == 2


async def test_no_store_is_never_cached(engine, origin):
    url = origin.url("/nostore")
    assert [(await fetch(url, cache="no-store")).json()["n"] for _ in range(3)] == [1, 2, 3]
    assert [(await fetch(url, revalidate=0)).json()["n"] for _ in range(2)] == [4, 5]
    assert [(await fetch(url, cache="no-cache")).json()["n"] for _ in range(2)] == [6, 7]


async def test_force_cache_is_kept_until_its_tag(engine, clock, origin):
    url = origin.url("/forever")
    assert (await fetch(url, cache="force-cache", tags=["f"])).json()["n"] == 1
    clock.advance(10**8)
    assert (await fetch(url, cache="force-cache", tags=["f"])).json()["n"] == 1
    await arevalidate_tag("f")
    clock.advance(0.001)
    assert (await fetch(url, cache="force-cache", tags=["f"])).json()["n"] == 2


async def test_plain_fetch_outside_a_page_is_not_cached_and_tags_keep_it(engine, clock, origin):
    url = origin.url("/plain")
    assert [(await fetch(url)).json()["n"] for _ in range(2)] == [1, 2]
    assert [(await fetch(url, tags=["p"])).json()["n"] for _ in range(2)] == [3, 3]
    clock.advance(10**6)
    assert (await fetch(url, tags=["p"])).json()["n"] == 3


@pytest.mark.parametrize("cache,revalidate", [("force-cache", 0), ("no-store", 8), ("no-store", False)])
async def test_conflicting_cache_and_revalidate_warn_and_both_are_ignored(engine, origin, cache, revalidate):
    url = origin.url(f"/conflict-{cache}-{revalidate}")
    with pytest.warns(UserWarning, match=f"cache={cache!r} and revalidate={revalidate!r}; only one"):
        first = await fetch(url, cache=cache, revalidate=revalidate)
    with pytest.warns(UserWarning):
        second = await fetch(url, cache=cache, revalidate=revalidate)
    # Outside a page the default for a fetch without options is "not cached".
    assert (first.json()["n"], second.json()["n"]) == (1, 2)


@pytest.mark.parametrize("cache,revalidate", [("force-cache", 60), ("no-store", 0), ("force-cache", None)])
async def test_agreeing_cache_and_revalidate_do_not_warn(engine, origin, cache, revalidate):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await fetch(origin.url("/agree"), cache=cache, revalidate=revalidate)


async def test_bad_options_are_refused(engine, origin):
    with pytest.raises(ValueError, match="cache='sometimes' is not one of"):
        await fetch(origin.url("/x"), cache="sometimes")
    with pytest.raises(ValueError, match="Invalid revalidate value -5"):
        await fetch(origin.url("/x"), revalidate=-5)
    with pytest.raises(ValueError, match="single string"):
        await fetch(origin.url("/x"), tags="posts")  # type: ignore[arg-type]
    assert origin.hits["/x"] == 0


# -- keys -------------------------------------------------------------------------------


async def test_query_params_are_part_of_the_key(engine, origin):
    url = origin.url("/q")
    a1 = await fetch(url, params={"page": 1}, revalidate=60)
    b1 = await fetch(url, params={"page": 2}, revalidate=60)
    a2 = await fetch(url, params={"page": 1}, revalidate=60)
    a3 = await fetch(url + "?page=1", revalidate=60)  # the same URL spelled inline
    assert a1.json() == a2.json() == a3.json() and a1.json()["path"] == "/q?page=1"
    assert b1.json()["path"] == "/q?page=2"
    assert origin.hits == Counter({"/q?page=1": 1, "/q?page=2": 1})


async def test_headers_are_part_of_the_key_except_tracing(engine, origin):
    url = origin.url("/h")
    one = await fetch(url, headers={"x-key": "1"}, revalidate=60)
    two = await fetch(url, headers={"x-key": "2"}, revalidate=60)
    again = await fetch(url, headers={"X-Key": "1", "traceparent": "00-abc-def-01"}, revalidate=60)
    assert (one.json()["x_key"], two.json()["x_key"], again.json()["x_key"]) == ("1", "2", "1")
    assert origin.hits["/h"] == 2


async def test_cookies_set_by_one_response_are_never_sent_with_another(engine, origin):
    """A server's fetches serve every visitor: a cookie one origin response sets must not
    ride along on later requests (nor change what the cache key does not record)."""
    assert (await fetch(origin.url("/set-cookie"), cache="no-store")).headers["set-cookie"]
    assert (await fetch(origin.url("/who"), cache="no-store")).json()["cookie"] is None
    assert (await fetch(origin.url("/who"), revalidate=60)).json()["cookie"] is None


async def test_method_and_body_are_part_of_the_key(engine, origin):
    url = origin.url("/m")
    get = await fetch(url, revalidate=60)
    post_a = await fetch(url, method="POST", content=b"a", revalidate=60)
    post_b = await fetch(url, method="POST", json={"b": 1}, revalidate=60)
    post_a2 = await fetch(url, method="POST", content=b"a", revalidate=60)
    assert get.json()["method"] == "GET" and post_a.json()["body"] == "a"
    assert post_b.json()["body"] == '{"b":1}' or json.loads(post_b.json()["body"]) == {"b": 1}
    assert post_a2.json() == post_a.json()
    assert origin.hits["/m"] == 3


# -- inside pages -----------------------------------------------------------------------


def af8(origin: Origin):
    """S-44's AF8: an app page with no revalidate calling fetch(url, revalidate=8, tags=["ft"])."""

    async def render() -> Rendered:
        data = (await fetch(origin.url("/af8"), revalidate=8, tags=["ft"])).json()
        return Rendered(f"n={data['n']}")

    return render


async def test_S44_page_takes_the_fetch_revalidate(engine, clock, origin):
    render, policy = af8(origin), page_policy("/af8")
    first = await engine.get("/af8", render, policy)
    assert first.status is CacheStatus.MISS and first.entry.revalidate == 8 and "ft" in first.entry.tags
    clock.advance(1)
    assert (await engine.get("/af8", render, policy)).status is CacheStatus.HIT
    clock.advance(8)  # t=9
    stale = await engine.get("/af8", render, policy)
    assert stale.status is CacheStatus.STALE and stale.entry.body == b"n=1"
    await engine.drain()
    clock.advance(1)  # t=10
    fresh = await engine.get("/af8", render, policy)
    assert fresh.status is CacheStatus.HIT and fresh.entry.body == b"n=2"  # refetched, not stale data
    assert fresh.entry.revalidate == 8


async def test_S45_revalidate_tag_refetches_for_the_next_render(engine, clock, origin):
    render, policy = af8(origin), page_policy("/af8")
    await engine.get("/af8", render, policy)
    assert (await engine.get("/af8", render, policy)).status is CacheStatus.HIT
    for n in (2, 3):  # a second revalidate_tag("ft") works again
        clock.advance(1)
        revalidate_tag("ft")
        clock.advance(0.001)
        served = await engine.get("/af8", render, policy)
        assert served.status is CacheStatus.MISS and served.entry.body == f"n={n}".encode()
        assert (await engine.get("/af8", render, policy)).status is CacheStatus.HIT
    assert origin.hits["/af8"] == 3


async def test_no_store_fetch_makes_the_page_dynamic(engine, origin):
    async def render() -> Rendered:
        data = (await fetch(origin.url("/live"), cache="no-store")).json()
        return Rendered(f"n={data['n']}")

    policy = page_policy("/live", revalidate=60)
    first = await engine.get("/live", render, policy)
    second = await engine.get("/live", render, policy)
    assert first.status is second.status is CacheStatus.BYPASS
    assert (first.entry.body, second.entry.body) == (b"n=1", b"n=2")
    assert first.entry.revalidate == 0
    assert await engine.handler.get("/live") is None


async def test_fetch_without_options_in_a_page_takes_the_page_revalidate(engine, clock, origin):
    async def render() -> Rendered:
        return Rendered(str((await fetch(origin.url("/auto"))).json()["n"]))

    policy = page_policy("/auto", revalidate=30)
    served = await engine.get("/auto", render, policy)
    assert served.entry.revalidate == 30
    # The data entry itself is kept for the page's revalidate: another page reads it cached.
    other = await engine.get("/auto2", render, page_policy("/auto2", revalidate=30))
    assert other.entry.body == b"1" and origin.hits["/auto"] == 1


async def test_tagged_fetch_in_a_timed_page_is_refreshed_with_the_page(engine, clock, origin):
    """``revalidate = 60`` plus ``fetch(url, tags=[...])``: the page still shows new data hourly.

    The tags add on-demand invalidation; they must not turn the fetch into a value kept
    for ever, or every regeneration would re-render the same old data.
    """

    async def render() -> Rendered:
        return Rendered(str((await fetch(origin.url("/tagged"), tags=["posts"])).json()["n"]))

    policy = page_policy("/tagged", revalidate=60)
    first = await engine.get("/tagged", render, policy)
    assert first.entry.body == b"1" and first.entry.revalidate == 60 and "posts" in first.entry.tags
    clock.advance(61)
    assert (await engine.get("/tagged", render, policy)).status is CacheStatus.STALE
    await engine.drain()
    served = await engine.get("/tagged", render, policy)
    assert served.status is CacheStatus.HIT and served.entry.body == b"2"
    clock.advance(1)
    await arevalidate_tag("posts")
    clock.advance(0.001)
    assert (await engine.get("/tagged", render, policy)).entry.body == b"3"


async def test_non_2xx_in_a_page_is_seen_by_the_page(engine, origin):
    origin.status = 404

    async def render() -> Rendered:
        response = await fetch(origin.url("/missing"), revalidate=60)
        return Rendered(f"status {response.status_code}", status=404 if response.status_code == 404 else 200)

    served = await engine.get("/missing-page", render, page_policy("/missing-page", revalidate=60))
    assert served.entry.body == b"status 404" and served.entry.status == 404


# -- sync code --------------------------------------------------------------------------


def test_fetch_sync_from_a_script(sync_engine, origin):
    url = origin.url("/sync")
    assert fetch_sync(url, revalidate=60).json()["n"] == 1
    assert fetch_sync(url, revalidate=60).json()["n"] == 1
    assert fetch_sync(url).json()["n"] == 2  # no options, no page: not cached


async def test_fetch_sync_in_a_sync_page_passes_tags_and_revalidate(engine, clock, origin):
    def render() -> Rendered:
        return Rendered(f"n={fetch_sync(origin.url('/sp'), revalidate=12, tags=['sp']).json()['n']}")

    policy = page_policy("/sp")
    served = await engine.get("/sp", render, policy)
    assert served.entry.body == b"n=1" and served.entry.revalidate == 12 and "sp" in served.entry.tags
    clock.advance(1)
    await arevalidate_tag("sp")
    clock.advance(0.001)
    served = await engine.get("/sp", render, policy)
    assert served.status is CacheStatus.MISS and served.entry.body == b"n=2"


async def test_concurrent_fetches_of_one_url_hit_the_origin_once(engine, origin):
    url = origin.url("/burst")
    responses = await asyncio.gather(*(fetch(url, revalidate=60) for _ in range(50)))
    assert {r.json()["n"] for r in responses} == {1}
    assert origin.hits["/burst"] == 1


# -- logging ----------------------------------------------------------------------------


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def fetch_log() -> Iterator[list[str]]:
    handler = Lines()
    log = logging.getLogger("pyisr.fetch")
    log.addHandler(handler)
    yield handler.lines
    log.removeHandler(handler)


async def test_fetch_log_lines(engine, origin, monkeypatch, fetch_log):
    url = origin.url("/logged")
    await fetch(url, revalidate=60)
    assert fetch_log == []  # off by default
    monkeypatch.setenv("PYISR_LOG_FETCHES", "1")
    await fetch(url, revalidate=60)
    await fetch(origin.url("/logged-miss"), revalidate=60)
    await fetch(url, cache="no-store")
    origin.status = 500
    await fetch(origin.url("/logged-500"), revalidate=60)
    hit, miss, skip, failed = fetch_log
    assert hit.startswith(f"GET {url} 200 in ") and hit.endswith("ms (cache hit)")
    assert miss.startswith(f"GET {origin.url('/logged-miss')} 200 in ") and miss.endswith("(cache miss)")
    assert skip.startswith(f"GET {url} 200 in ") and skip.endswith("(cache skip)")
    assert failed.startswith(f"GET {origin.url('/logged-500')} 500 in ")


async def test_fetch_log_truncates_long_urls(engine, origin, monkeypatch, fetch_log):
    url = origin.url("/" + "long-path/" * 8 + "?q=" + "v" * 40)
    monkeypatch.setenv("PYISR_LOG_FETCHES", "1")
    await fetch(url, revalidate=60)
    assert url not in fetch_log[0] and url[:30] in fetch_log[0]
    monkeypatch.setenv("PYISR_LOG_FETCHES_FULL_URL", "1")
    await fetch(url, revalidate=60)
    assert f"GET {url} 200 in " in fetch_log[1] and fetch_log[1].endswith("(cache hit)")
