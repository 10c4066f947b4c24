"""SPEC.md cases at the HTTP level, against a real ``pyisr start`` process.

The test site (tests/sites/spec) uses revalidate windows of 2 s (SPEC's 5 s scaled
down) so time-based cases take seconds. Each case uses its own paths, so the cases
share one build and one server.

Cases that only wait for windows to pass (regeneration, failing regeneration and its
back-off, fallback pages, route handlers) are the engine and the App's HTTP contract:
they run in-process on a fake clock in test_http_contract.py, under the same case ids.
Here each SPEC area keeps what a real server proves, under both uvicorn and granian:
one real window passing (S-02), a fallback page rendered after its response was sent
(S-17), concurrent connections, the CLI, restarts, logs, request bodies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from e2e_support import DataServer, Server, copy_site, counts, free_port, run_cli

pytestmark = pytest.mark.slow

SITE = Path(__file__).parent / "sites" / "spec"
SECRET = "spec-secret-123"
N = 2  # the site's revalidate window
ISR2 = f"s-maxage={N}, stale-while-revalidate={31536000 - N}"
FOREVER = "s-maxage=31536000"
NOSTORE = "private, no-cache, no-store, max-age=0, must-revalidate"


def stamp(response: httpx.Response) -> str:
    match = re.search(r"render=(\d+) at=([\d.]+)", response.text)
    assert match, response.text
    return match.group(0)


def until_regenerated(server: Server, path: str, old: httpx.Response) -> httpx.Response:
    """GET ``path`` until its background regeneration has landed; returns that answer.

    Meanwhile every answer must be the old page, STALE (the regeneration is under way).
    """
    deadline = time.monotonic() + 10
    while True:
        response = server.get(path)
        if response.headers["x-pyisr-cache"] != "STALE":
            return response
        assert stamp(response) == stamp(old)
        assert time.monotonic() < deadline, f"{path} was never regenerated"
        time.sleep(0.05)


@pytest.fixture(scope="module", params=["uvicorn", "granian"])
def server_kind(request: pytest.FixtureRequest) -> str:
    """Every case runs under both servers: uvicorn (ASGI) and granian (RSGI)."""
    return str(request.param)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, server_kind: str) -> dict[str, str]:
    root = tmp_path_factory.mktemp(f"spec-{server_kind}")
    data = DataServer().__enter__()
    return {
        "SPEC_COUNTS": str(root / "counts"),
        "SPEC_FLAG": str(root / "flag"),
        "SPEC_DATA_URL": data.url,
        "SPEC_REVALIDATE": str(N),
        "SPEC_FETCH_REVALIDATE": "3",
        "PYISR_REVALIDATE_SECRET": SECRET,
        "PYISR_DEBUG_CACHE": "1",
        "_ROOT": str(root),
    }


@pytest.fixture(scope="module")
def server(env: dict[str, str], server_kind: str) -> Server:
    root = Path(env["_ROOT"])
    site = copy_site(SITE, root / "site")
    (site / "public").mkdir(exist_ok=True)
    (site / "public" / "big.bin").write_bytes(BIG_FILE)
    result = run_cli(["build", str(site)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    srv = Server(site, env, server=server_kind).start()
    yield srv
    srv.stop()


@pytest.fixture
def counts_dir(env: dict[str, str]) -> Path:
    return Path(env["SPEC_COUNTS"])


@pytest.fixture
def flag(env: dict[str, str]) -> Path:
    path = Path(env["SPEC_FLAG"])
    yield path
    path.unlink(missing_ok=True)


def test_build_prints_a_summary_and_writes_the_build_id(server: Server) -> None:
    build_id = (server.site / ".pyisr" / "BUILD_ID").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{16}", build_id)
    manifest = json.loads((server.site / ".pyisr" / "manifest.json").read_text())
    routes = {r["pattern"]: r for r in manifest["routes"]}
    assert routes["/blog/[id]"]["prerendered"] == ["/blog/1"]
    assert routes["/blogf/[id]"]["fallback"] is False
    # Prerendered pages are browsable files.
    assert (server.site / ".pyisr" / "cache" / build_id / "entries" / "blog" / "1.html").is_file()


def test_S01_S07_S09_S10_S28_S02_prerendered_page(server: Server, counts_dir: Path) -> None:
    first = server.get("/blog/1")
    assert first.status_code == 200
    assert first.headers["x-pyisr-cache"] == "HIT"
    assert first.headers["cache-control"] == ISR2
    assert "render=1" in first.text  # S-01: the build's render
    assert first.headers["etag"].startswith('"') and "age" in first.headers
    assert first.headers["cache-status"].startswith("pyisr; hit")
    # S-07: HEAD has the same headers and no body.
    head = server.request("HEAD", "/blog/1")
    assert head.status_code == 200 and head.content == b""
    for name in ("etag", "content-length", "cache-control", "x-pyisr-cache"):
        assert head.headers[name] == first.headers[name]
    # S-09: 304 on If-None-Match.
    not_modified = server.get("/blog/1", headers={"if-none-match": first.headers["etag"]})
    assert not_modified.status_code == 304 and not_modified.content == b""
    for name in ("etag", "cache-control", "x-pyisr-cache"):
        assert not_modified.headers[name] == first.headers[name]
    # S-10: a query string is the same entry.
    query = server.get("/blog/1?foo=bar")
    assert query.text == first.text and query.headers["etag"] == first.headers["etag"]
    # S-28: a client cannot bypass the server cache.
    assert server.get("/blog/1", headers={"cache-control": "no-cache"}).headers["x-pyisr-cache"] == "HIT"
    # S-02: stale after the window: old body once, then the new one. (The one window this
    # file waits for in real time; test_http_contract.py has the rest on a fake clock.)
    time.sleep(N + 0.3)
    stale = server.get("/blog/1")
    assert stale.headers["x-pyisr-cache"] == "STALE" and stamp(stale) == stamp(first)
    fresh = until_regenerated(server, "/blog/1", first)
    assert fresh.headers["x-pyisr-cache"] == "HIT" and stamp(fresh) != stamp(first)
    assert counts(counts_dir, "blog/1") == 2  # the build's render and one regeneration


def test_S04_unknown_path_is_rendered_on_demand_then_cached(server: Server) -> None:
    miss = server.get("/blog/2")
    assert miss.status_code == 200 and miss.headers["x-pyisr-cache"] == "MISS"
    assert miss.headers["cache-control"] == ISR2
    hit = server.get("/blog/2")
    assert hit.headers["x-pyisr-cache"] == "HIT" and hit.text == miss.text


def test_S05_concurrent_misses_render_once(server: Server, counts_dir: Path) -> None:
    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(lambda _: server.get("/blog/3"), range(50)))
    assert {r.status_code for r in responses} == {200}
    # Joiners of the in-flight render say MISS; requests arriving after it was stored say
    # HIT (NEXTJS-REFERENCE 1.3 calls both correct). Either way: one render, one body.
    statuses = [r.headers["x-pyisr-cache"] for r in responses]
    assert "MISS" in statuses and set(statuses) <= {"MISS", "HIT"}
    assert len({r.text for r in responses}) == 1
    assert counts(counts_dir, "blog/3") == 1


def test_S11_S12_trailing_slash_and_methods(server: Server) -> None:
    slash = server.get("/blog/1/")
    assert slash.status_code == 308 and slash.headers["location"] == "/blog/1"
    post = server.request("POST", "/blog/1")
    assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"


def test_S13_page_without_revalidate_never_changes(server: Server) -> None:
    a = server.get("/static")
    assert a.headers["x-pyisr-cache"] == "HIT" and a.headers["cache-control"] == FOREVER
    assert "render=1" in a.text


def test_S14_revalidate_zero_is_dynamic(server: Server) -> None:
    a, b = server.get("/dyn"), server.get("/dyn")
    assert a.status_code == 200 and a.headers["cache-control"] == NOSTORE
    assert "x-pyisr-cache" not in a.headers
    assert stamp(a) != stamp(b)


def test_S15_S16_fallback_false(server: Server) -> None:
    missing = server.get("/blogf/2")
    assert missing.status_code == 404 and missing.headers["cache-control"] == NOSTORE
    assert "x-pyisr-cache" not in missing.headers
    # S-16: the prerendered path is served and revalidated as usual (its regeneration
    # after the window: test_http_contract.py).
    assert server.get("/api/reval?path=/blogf/1").status_code == 200
    old = server.get("/blogf/1")
    assert old.headers["x-pyisr-cache"] == "HIT"


def test_S17_fallback_true_serves_the_shell_then_the_page(server: Server) -> None:
    shell = server.get("/blogt/2")
    assert shell.status_code == 200 and shell.headers["x-pyisr-cache"] == "MISS"
    assert shell.headers["cache-control"] == NOSTORE
    assert "Loading..." in shell.text
    # The page renders in the background after the shell was sent; until it is stored,
    # every request gets the shell and starts no second render.
    deadline = time.monotonic() + 10
    while (real := server.get("/blogt/2")).headers["x-pyisr-cache"] == "MISS":
        assert "Loading..." in real.text and real.headers["cache-control"] == NOSTORE
        assert time.monotonic() < deadline, "the fallback page was never stored"
        time.sleep(0.05)
    assert real.headers["x-pyisr-cache"] == "HIT" and "render=1" in real.text


def test_S18_crawlers_get_the_blocking_render(server: Server) -> None:
    bot = server.get("/blogt/4", headers={"user-agent": "Mozilla/5.0 (compatible; Googlebot/2.1)"})
    assert bot.status_code == 200 and bot.headers["x-pyisr-cache"] == "MISS"
    assert "render=1" in bot.text and bot.headers["cache-control"] == ISR2


def test_S19_S20_not_found_is_cached(server: Server) -> None:
    first = server.get("/nf/nf1")
    assert (first.status_code, first.headers["x-pyisr-cache"]) == (404, "MISS")
    assert first.headers["cache-control"] == "s-maxage=7, stale-while-revalidate=31535993"
    second = server.get("/nf/nf1")
    assert (second.status_code, second.headers["x-pyisr-cache"]) == (404, "HIT")
    forever = server.get("/nf/nonrev1")
    assert forever.status_code == 404 and forever.headers["cache-control"] == FOREVER


def test_S21_redirects_are_cached(server: Server) -> None:
    first = server.get("/r/temp")
    assert (first.status_code, first.headers["x-pyisr-cache"], first.headers["location"]) == (
        307,
        "MISS",
        "/plain",
    )
    assert first.headers["cache-control"] == "s-maxage=9, stale-while-revalidate=31535991"
    assert server.get("/r/temp").headers["x-pyisr-cache"] == "HIT"
    assert server.get("/r/perm").status_code == 308


def test_S24_failure_with_nothing_cached_is_a_500(server: Server, flag: Path, counts_dir: Path) -> None:
    flag.touch()
    for _ in range(2):
        response = server.get("/e/2")
        assert response.status_code == 500 and response.headers["cache-control"] == NOSTORE
    assert counts(counts_dir, "e-fail/2") == 2
    # Each failure is in the server's log, with the exception (S-22's failing
    # regeneration and its back-off: test_http_contract.py).
    assert server.log().count("/e/2 FAILED") == 2
    assert "RuntimeError: flag is on for 2" in server.log()


@pytest.mark.parametrize("value", ["zero", "neg", "frac", "str"])
def test_S25_invalid_revalidate_from_get_static_props(server: Server, value: str) -> None:
    response = server.get(f"/badrev/{value}")
    assert response.status_code == 500
    assert f"/badrev/{value}" in server.log() and "revalidate option" in server.log()


def test_S26_S27_encoding(server: Server) -> None:
    miss = server.get("/blog/%E3%81%82")
    assert miss.headers["x-pyisr-cache"] == "MISS" and "Post あ" in miss.text
    assert server.get("/blog/%E3%81%82").headers["x-pyisr-cache"] == "HIT"
    assert server.get("/blog/%ZZ").status_code == 400


def test_S30_S31_S32_S33_S35_revalidate_from_an_api_route(server: Server) -> None:
    before = server.get("/blog/5")
    call = server.get("/api/reval?path=/blog/5")
    assert call.json() == {"revalidated": True}
    after = server.get("/blog/5")
    assert after.headers["x-pyisr-cache"] == "HIT" and stamp(after) != stamp(before)
    # S-31: never visited, generated by the call.
    assert server.get("/api/reval?path=/blog/77").status_code == 200
    assert server.get("/blog/77").headers["x-pyisr-cache"] == "HIT"
    # S-32 / S-33: not a page that can exist.
    failed = server.get("/api/reval?path=/blogf/5")
    assert failed.status_code == 500 and failed.json()["error"].startswith("Failed to revalidate /blogf/5:")
    missing = server.get("/api/reval?path=/does-not-exist")
    assert missing.json()["error"].startswith("Failed to revalidate /does-not-exist:")
    # S-35: a page that never expires can be revalidated on demand.
    old = server.get("/static")
    server.get("/api/reval?path=/static")
    assert stamp(server.get("/static")) != stamp(old)


def test_S36_on_demand_failure_keeps_the_old_page(server: Server, flag: Path) -> None:
    old = server.get("/e/3")
    flag.touch()
    failed = server.get("/api/reval?path=/e/3")
    assert failed.status_code == 500 and failed.json()["error"].startswith("Failed to revalidate /e/3:")
    assert stamp(server.get("/e/3")) == stamp(old)
    # S-63: the failure is visible through the inspection endpoint.
    info = server.get("/_pyisr/cache?path=/e/3", headers={"authorization": f"Bearer {SECRET}"}).json()
    assert info["last_failure"]["count"] == 1 and info["last_failure"]["type"] == "RuntimeError"


def test_S37_builtin_revalidate_endpoint(server: Server) -> None:
    old = server.get("/blog/6")
    auth = {"authorization": f"Bearer {SECRET}"}
    ok = server.request("POST", "/_pyisr/revalidate?path=/blog/6", headers=auth)
    assert ok.status_code == 200 and ok.json()["revalidated"] is True
    assert abs(ok.json()["now"] - time.time() * 1000) < 60_000
    assert stamp(server.get("/blog/6")) != stamp(old)
    assert (
        server.request(
            "POST", "/_pyisr/revalidate?path=/blog/6", headers={"authorization": "Bearer wrong"}
        ).status_code
        == 401
    )
    assert server.request("POST", "/_pyisr/revalidate?path=/blog/6").status_code == 401
    assert server.request("POST", "/_pyisr/revalidate", headers=auth).status_code == 400
    assert server.request("POST", "/_pyisr/revalidate?path=/nothing/here", headers=auth).status_code == 404
    assert server.request("POST", "/_pyisr/revalidate?tag=posts", headers=auth).status_code == 200


def test_the_revalidate_command_asks_the_running_server(server: Server) -> None:
    with_secret = {"PYISR_REVALIDATE_SECRET": SECRET}
    old = server.get("/blog/8")
    done = run_cli(["revalidate", "--path", "/blog/8", "--url", server.url], with_secret)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["revalidated"] is True
    assert stamp(server.get("/blog/8")) != stamp(old)

    # A route pattern marked stale: every page of it renders afresh on its next request.
    before = server.get("/a/1")
    done = run_cli(["revalidate", "--path", "/a/[id]", "--type", "page", "--url", server.url], with_secret)
    assert done.returncode == 0, done.stderr
    after = server.get("/a/1")
    assert after.headers["x-pyisr-cache"] == "MISS" and stamp(after) != stamp(before)

    wrong = run_cli(["revalidate", "--tag", "t1", "--url", server.url, "--secret", "wrong"], {})
    assert wrong.returncode == 1
    no_target = run_cli(["revalidate", "--url", server.url], with_secret)
    assert no_target.returncode == 2 and "give --path or --tag" in no_target.stderr
    no_secret = run_cli(["revalidate", "--tag", "t1", "--url", server.url], {"PYISR_REVALIDATE_SECRET": ""})
    assert no_secret.returncode == 2 and "PYISR_REVALIDATE_SECRET" in no_secret.stderr
    nobody = run_cli(["revalidate", "--tag", "t1", "--url", f"http://127.0.0.1:{free_port()}"], with_secret)
    assert nobody.returncode == 1 and "Cannot reach" in nobody.stdout + nobody.stderr


def test_S40_S41_S42_S43_app_pages(server: Server) -> None:
    assert server.get("/api/reval?path=/a/1").status_code == 200  # t=0 is now
    first = server.get("/a/1")
    assert first.headers["x-pyisr-cache"] == "HIT" and first.headers["cache-control"] == ISR2
    assert server.get("/a/2").headers["x-pyisr-cache"] == "MISS"
    assert server.get("/a/2").headers["x-pyisr-cache"] == "HIT"
    strict = server.get("/an/2")
    assert strict.status_code == 404 and strict.headers["cache-control"] == NOSTORE
    home = server.get("/")
    assert home.headers["x-pyisr-cache"] == "HIT" and home.headers["cache-control"] == FOREVER
    # /a/1 regenerated after its window: test_http_contract.py.


def test_S44_S45_fetch_revalidate_and_tag(server: Server) -> None:
    assert server.get("/api/reval?path=/af").status_code == 200  # t=0 is now
    first = server.get("/af")
    assert first.headers["cache-control"] == "s-maxage=3, stale-while-revalidate=31535997"
    assert first.headers["x-pyisr-cache"] == "HIT"
    server.get("/api/amark?tag=ft")
    miss = server.get("/af")
    assert miss.headers["x-pyisr-cache"] == "MISS"
    assert re.search(r'"hit": (\d+)', miss.text).group(1) != re.search(r'"hit": (\d+)', first.text).group(1)
    assert server.get("/af").headers["x-pyisr-cache"] == "HIT"
    server.get("/api/mark?tag=ft")  # the sync form works too, and a second time
    assert server.get("/af").headers["x-pyisr-cache"] == "MISS"


def test_S46_S47_S48_S64_revalidate_path(server: Server) -> None:
    server.get("/a/3")
    server.get("/api/mark?path=/a/3")
    assert server.get("/a/3").headers["x-pyisr-cache"] == "MISS"
    server.get("/a/4")
    server.get("/api/amark?path=/a/[id]&type=page")
    assert server.get("/a/3").headers["x-pyisr-cache"] == "MISS"
    assert server.get("/a/4").headers["x-pyisr-cache"] == "MISS"
    server.get("/rh")
    server.get("/static")
    server.get("/api/mark?path=/&type=layout")
    for path in ("/a/3", "/static", "/rh", "/"):
        assert server.get(path).headers["x-pyisr-cache"] == "MISS", path
    # S-64: Pages-style pages too.
    old = server.get("/blog/9")
    server.get("/api/mark?path=/blog/9")
    new = server.get("/blog/9")
    assert new.headers["x-pyisr-cache"] == "MISS" and stamp(new) != stamp(old)


def test_S49_cached_function_recomputed_after_its_tag(server: Server) -> None:
    first = server.get("/at")
    server.get("/api/mark?tag=t1")
    miss = server.get("/at")
    assert miss.headers["x-pyisr-cache"] == "MISS"
    data = re.search(r"id='data'>([^<]+)", miss.text).group(1)
    assert data != re.search(r"id='data'>([^<]+)", first.text).group(1)
    assert server.get("/at").headers["x-pyisr-cache"] == "HIT"


def test_S50_cached_route_handler(server: Server) -> None:
    first = server.get("/rh")
    assert first.headers["content-type"].startswith("application/json")
    assert first.headers["cache-control"] == ISR2 and first.headers["x-pyisr-cache"] in ("HIT", "MISS")
    assert first.json()["stamp"].startswith("rh render=")
    # Its regeneration after the window: test_http_contract.py.


def test_S51_data_route(server: Server) -> None:
    build_id = (server.site / ".pyisr" / "BUILD_ID").read_text().strip()
    data = server.get(f"/_pyisr/data/{build_id}/blog/11.json")
    assert data.status_code == 200 and "stamp" in data.json()["props"]
    page = server.get("/blog/11")
    assert page.headers["x-pyisr-cache"] == "HIT" and data.json()["props"]["stamp"] in page.text
    assert server.get(f"/_pyisr/data/{build_id}/blogf/9.json").status_code == 404
    nf = server.get(f"/_pyisr/data/{build_id}/nf/nf9.json")
    assert nf.status_code == 404 and nf.json() == {"not_found": True}


def test_S62_debug_log_has_one_line_per_decision(server: Server) -> None:
    server.get("/blog/1")
    server.get("/blog/19")
    log = server.log()
    assert re.search(r"^/blog/1 HIT", log, re.M)
    assert re.search(r"^/blog/19 MISS rendered in [\d.]+ms", log, re.M)


def test_S63_cli_inspect_shows_the_entry(server: Server, env: dict[str, str]) -> None:
    server.get("/blog/12")
    result = run_cli(["cache", "inspect", "/blog/12", "--json", "--site", str(server.site)], env)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["key"] == "/blog/12" and info["revalidate"] == N and info["last_failure"] is None


def test_zz_S60_S61_restart_keeps_timing_and_invalidations(server: Server) -> None:
    """Runs last (name): restarts the shared server."""
    assert server.get("/long/1").headers["x-pyisr-cache"] == "MISS"
    server.get("/af")
    server.get("/api/amark?tag=ft")
    server.restart()
    hit = server.get("/long/1")
    assert hit.headers["x-pyisr-cache"] == "HIT"
    assert hit.headers["cache-control"] == "s-maxage=30, stale-while-revalidate=31535970"
    assert server.get("/af").headers["x-pyisr-cache"] == "MISS"


BIG_FILE = bytes(range(256)) * 1200  # 300 KB: sent in several chunks


def test_request_bodies_headers_and_public_files_pass_through(server: Server) -> None:
    body = os.urandom(200_000)
    echo = server.request("POST", "/api/echo?x=1&y=two", content=body, headers=[("x-a", "1"), ("x-a", "2")])
    assert echo.status_code == 200
    assert echo.json() == {
        "method": "POST",
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "query": {"x": "1", "y": "two"},
        "x_a": ["1", "2"],
    }
    big = server.get("/big.bin")
    assert big.status_code == 200 and big.content == BIG_FILE
    assert big.headers["content-length"] == str(len(BIG_FILE))
    head = server.request("HEAD", "/big.bin")
    assert head.status_code == 200 and head.content == b""


def test_start_without_a_build_is_a_clear_error(tmp_path: Path) -> None:
    site = copy_site(SITE, tmp_path / "site")
    result = subprocess.run(
        [sys.executable, "-m", "pyisr.cli", "start", str(site)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "pyisr build" in result.stderr
