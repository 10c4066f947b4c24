"""A real Varnish running ``deploy/varnish/pyisr.vcl`` in front of ``pyisr start``.

Everything on 127.0.0.1: ``varnishd`` (its own work directory, stopped by its PID) in
front of a ``pyisr start`` of ``tests/sites/edge``, whose pages show counters the tests
change on disk. A page is cached for an hour, so a new value seen through Varnish
proves that an invalidation reached the edge: from the revalidate endpoint, from a
script, from the app's own code. pyisr purges Varnish through a :class:`Link` the tests
can cut, to show a purge that cannot get through is retried, counted and delivered.
The VCL's rules for answers the site server never gives (a Django view's ``Vary:
Cookie``, an origin failing during a background refresh) run against a scripted origin.

Without Varnish and its xkey vmod the module installs them (root with apt-get) or is
skipped with the reason; under ``CI=true`` it fails instead.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from e2e_support import Server, copy_site, free_port, run_cli
from varnish_support import SECRET_ENV, Link, Varnish, compile_vcl, require_varnish

from pyisr.draft import COOKIE, draft_cookie_value

pytestmark = pytest.mark.slow

SITE = Path(__file__).parent / "sites" / "edge"
REVALIDATE_SECRET = "s3cret"
PURGE_SECRET = "purge-s3cret"
#: How long an invalidation may take to reach a visitor of Varnish (the issue: 1 s at p99).
WITHIN = 3.0


class Edge:
    """The running pair and the test's view of it (a visitor with no cookie jar)."""

    def __init__(self, site: Path, data: Path, server: Server, varnish: Varnish, link: Link) -> None:
        self.site = site
        self.data = data
        self.server = server
        self.varnish = varnish
        self.link = link
        self.client = httpx.Client(timeout=10)

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """A visitor's GET through Varnish (cookies only when given: none are kept)."""
        response = self.client.get(self.varnish.url + path, headers=headers)
        self.client.cookies.clear()
        return response

    def purge(self, headers: dict[str, str], *, source: str = "127.0.0.1") -> httpx.Response:
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(transport=transport, timeout=10) as client:
            return client.request("PURGE", self.varnish.url + "/", headers=headers)

    def revalidate(self, **params: str) -> httpx.Response:
        """``POST /_pyisr/revalidate`` to pyisr, as an operator's job would."""
        response = self.server.request(
            "POST",
            "/_pyisr/revalidate",
            params=params,
            headers={"authorization": f"Bearer {REVALIDATE_SECRET}"},
        )
        assert response.status_code == 200, response.text
        return response

    def health(self) -> dict[str, object]:
        body = self.server.get("/_pyisr/health").json()
        assert isinstance(body, dict)
        return body

    def bump(self, name: str) -> int:
        """Change a counter on disk, as an editor changes a post (no render sees it yet)."""
        path = self.data / f"value-{name}"
        new = (int(path.read_text()) if path.exists() else 0) + 1
        path.write_text(str(new))
        return new

    def renders(self, name: str) -> int:
        path = self.data / f"renders-{name}"
        return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    require_varnish()
    root = tmp_path_factory.mktemp("edge")
    site = copy_site(SITE, root / "site")
    data = root / "data"
    data.mkdir()
    link = Link(target=0)  # pointed at Varnish once it has a port
    env = {
        "PYISR_REVALIDATE_SECRET": REVALIDATE_SECRET,
        "EDGE_DATA": str(data),
        "PYISR_CDN": f"varnish://127.0.0.1:{link.port}",
        SECRET_ENV: PURGE_SECRET,
    }
    built = run_cli(["build", str(site)], env)
    assert built.returncode == 0, built.stdout + built.stderr
    server = Server(site, env).start()
    varnish = pair = None
    try:
        varnish = Varnish(server.port, root / "varnish", env={SECRET_ENV: PURGE_SECRET}).start()
        link.target = varnish.port
        link.up()
        pair = Edge(site, data, server, varnish, link)
        yield pair
    finally:
        if pair is not None:
            pair.client.close()
        link.cut()
        if varnish is not None:
            varnish.stop()
        server.stop()


def value(response: httpx.Response) -> int:
    assert response.status_code == 200, (response.status_code, response.text[:300])
    match = re.search(r'<h1 id="value">(\d+)</h1>', response.text)
    assert match, response.text[:300]
    return int(match.group(1))


def edge_status(response: httpx.Response) -> str:
    """Varnish's part of ``Cache-Status`` (``hit``, ``hit; fwd=stale``, ``fwd=miss``...)."""
    entries = [e.strip() for e in response.headers.get("cache-status", "").split(",")]
    ours = [e for e in entries if e.startswith("varnish")]
    assert ours, response.headers
    return ours[-1].removeprefix("varnish").lstrip("; ")


def is_varnish_hit(response: httpx.Response) -> bool:
    """``X-Varnish`` names two transactions (this one, and the one that stored the object)."""
    return len(response.headers.get("x-varnish", "").split()) == 2 and edge_status(response).startswith("hit")


def fetched(edge: Edge) -> int:
    """Requests Varnish has sent pyisr, once its counters have settled.

    A worker thread adds its counts to varnishstat's after it has answered (and in
    batches): read until two reads 0.1 s apart agree.
    """
    count = edge.varnish.backend_requests()
    while True:
        time.sleep(0.1)
        again = edge.varnish.backend_requests()
        if again == count:
            return count
        count = again


def fetched_since(edge: Edge, before: int, expected: int) -> int:
    """Requests Varnish sent pyisr since ``before`` (waiting up to 2 s for ``expected``)."""
    deadline = time.monotonic() + 2
    while edge.varnish.backend_requests() - before < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return fetched(edge) - before


def until(check: Callable[[], bool], within: float = WITHIN, every: float = 0.02) -> float:
    """Poll ``check`` until it holds; the seconds it took (fails after ``within``)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            pytest.fail(f"not within {within}s")
        time.sleep(every)
    return time.monotonic() - started


def cached_at_varnish(edge: Edge, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """Ask twice: the second answer must come from Varnish's cache."""
    edge.get(path, headers)
    second = edge.get(path, headers)
    assert is_varnish_hit(second), second.headers
    return second


def test_the_shipped_vcl_compiles() -> None:
    require_varnish()
    done = compile_vcl()
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_page_is_cached_at_varnish(edge: Edge) -> None:
    before = fetched(edge)
    first = edge.get("/c/cached")
    second = edge.get("/c/cached")
    assert edge_status(first) == "fwd=miss"
    assert is_varnish_hit(second), second.headers
    assert int(second.headers["age"]) >= 0
    assert second.text == first.text
    assert fetched_since(edge, before, 1) == 1, "pyisr saw one request"
    assert edge.renders("cached") == 1
    # pyisr's own word stays first in Cache-Status (RFC 9211: the origin's side first).
    assert second.headers["cache-status"].startswith("pyisr;")
    # The tags are not shown to visitors, only to a purger who asks for them.
    assert "surrogate-key" not in second.headers and "cache-tag" not in second.headers
    debug = edge.get("/c/cached", {"x-pyisr-debug": "1"})
    assert "counter-cached" in debug.headers["surrogate-key"].split()
    assert "xkey" not in debug.headers


def test_revalidate_tag_through_the_endpoint_reaches_varnish(edge: Edge) -> None:
    assert value(cached_at_varnish(edge, "/c/endpoint")) == 0
    edge.bump("endpoint")
    edge.revalidate(tag="counter-endpoint")
    until(lambda: value(edge.get("/c/endpoint")) == 1)
    again = edge.get("/c/endpoint")
    assert value(again) == 1 and is_varnish_hit(again), "the new page is cached at the edge again"
    assert edge.renders("endpoint") == 2


def test_revalidate_tag_from_a_script_reaches_varnish(edge: Edge) -> None:
    assert value(cached_at_varnish(edge, "/c/script")) == 0
    edge.bump("script")
    script = "import sys, pyisr\npyisr.configure(site=sys.argv[1])\npyisr.revalidate_tag('counter-script')\n"
    env = {
        **os.environ,
        "PYISR_CDN": f"varnish://127.0.0.1:{edge.varnish.port}",
        SECRET_ENV: PURGE_SECRET,
        "EDGE_DATA": str(edge.data),
    }
    done = subprocess.run(
        [sys.executable, "-c", script, str(edge.site)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The script has ended: its purge was sent before it exited.
    until(lambda: value(edge.get("/c/script")) == 1)


def test_revalidate_tag_from_the_app_reaches_varnish(edge: Edge) -> None:
    assert value(cached_at_varnish(edge, "/c/api")) == 0
    # A POST passes Varnish: the route handler changes the counter and revalidates its tag.
    answer = edge.client.post(edge.varnish.url + "/api/bump", params={"name": "api"})
    assert answer.status_code == 200 and answer.json()["value"] == 1
    assert edge_status(answer) == "bypass; detail=method"
    until(lambda: value(edge.get("/c/api")) == 1)


def test_a_stale_mark_is_served_stale_then_fresh(edge: Edge) -> None:
    assert value(cached_at_varnish(edge, "/c/stale")) == 0
    edge.bump("stale")
    edge.revalidate(tag="counter-stale", stale="true")
    seen: list[tuple[int, str]] = []

    def fresh() -> bool:
        response = edge.get("/c/stale")
        seen.append((value(response), edge_status(response)))
        return seen[-1][0] == 1

    until(fresh)
    old = [status for number, status in seen if number == 0]
    assert any(status == "hit; fwd=stale" for status in old), f"never served stale at the edge: {seen}"
    # Fresh from now on, and cached.
    until(lambda: is_varnish_hit(edge.get("/c/stale")))
    assert value(edge.get("/c/stale")) == 1


def cdn_health(edge: Edge) -> dict[str, object]:
    body = edge.health()
    lanes = body.get("cdn")
    assert isinstance(lanes, list) and len(lanes) == 1, body
    lane = lanes[0]
    assert isinstance(lane, dict) and lane["cdn"] == "varnish", lane
    return {**lane, "status": body["status"]}


def test_a_purge_that_cannot_reach_varnish_is_retried_counted_and_delivered(edge: Edge) -> None:
    assert value(cached_at_varnish(edge, "/c/outage")) == 0
    before = cdn_health(edge)
    edge.link.cut()
    try:
        edge.bump("outage")
        edge.revalidate(tag="counter-outage")
        until(lambda: int(cdn_health(edge)["retried"]) > int(before["retried"]))
        failing = cdn_health(edge)
        assert failing["status"] == "degraded" and int(failing["pending"]) > 0, failing
        # Varnish never heard of it: it still serves its copy.
        stale = edge.get("/c/outage")
        assert value(stale) == 0 and is_varnish_hit(stale)
    finally:
        edge.link.up()
    # Retried with back-off (0.5 s, then 1 s...): delivered once Varnish is reachable again.
    until(lambda: value(edge.get("/c/outage")) == 1, within=10, every=0.05)
    after = cdn_health(edge)
    assert after["status"] == "ok" and after["pending"] == 0, after
    assert int(after["sent"]) > int(before["sent"])


def test_draft_mode_and_logged_in_visitors_pass(edge: Edge) -> None:
    cached_at_varnish(edge, "/c/draft")
    renders = edge.renders("draft")
    before = fetched(edge)
    cookie = f"{COOKIE}={draft_cookie_value(REVALIDATE_SECRET)}"
    for _ in range(2):
        draft = edge.get("/c/draft", {"cookie": cookie})
        assert draft.headers["x-pyisr-cache"] == "BYPASS"
        assert edge_status(draft) == "bypass; detail=draft"
    assert edge.renders("draft") == renders + 2, "draft mode renders fresh, every time"
    session = edge.get("/c/draft", {"cookie": "sessionid=abc"})
    assert edge_status(session) == "bypass; detail=session"
    assert fetched_since(edge, before, 3) == 3
    # A cookie that is nobody's login (analytics) does not split or bypass the cache.
    tracked = edge.get("/c/draft", {"cookie": "_ga=GA1.1.1; theme=dark"})
    assert is_varnish_hit(tracked)
    assert fetched_since(edge, before, 3) == 3


def test_post_and_pyisr_endpoints_pass(edge: Edge) -> None:
    before = fetched(edge)
    for _ in range(2):
        health = edge.get("/_pyisr/health")
        assert health.status_code == 200 and edge_status(health) == "bypass; detail=pyisr-endpoint"
    answer = edge.client.post(edge.varnish.url + "/api/bump", params={"name": "post"})
    assert answer.status_code == 200 and edge_status(answer) == "bypass; detail=method"
    assert fetched_since(edge, before, 3) == 3


@pytest.mark.parametrize("path", ["/cookie", "/private"])
def test_a_page_for_one_visitor_is_never_kept_at_the_edge(edge: Edge, path: str) -> None:
    name = path.strip("/")
    renders = edge.renders(name)
    before = fetched(edge)
    answers = [edge.get(path) for _ in range(3)]
    assert fetched_since(edge, before, 3) == 3, "every visitor reached pyisr"
    assert edge.renders(name) == renders + 3
    assert not any(is_varnish_hit(a) for a in answers)
    if path == "/cookie":
        cookies = [a.headers["set-cookie"] for a in answers]
        assert len(set(cookies)) == 3, "each visitor got a cookie of their own"
        assert len({a.text for a in answers}) == 3


def test_an_unauthorised_purge_is_refused_and_purges_nothing(edge: Edge) -> None:
    cached_at_varnish(edge, "/c/guard")
    keys = {"xkey-purge": "counter-guard"}
    secret = {"x-pyisr-purge-secret": PURGE_SECRET}
    # From an address outside the ACL (the loopback's 127.0.0.2), even with the secret.
    assert edge.purge({**keys, **secret}, source="127.0.0.2").status_code == 403
    # From an allowed address without the secret, or with a wrong one.
    assert edge.purge(keys).status_code == 403
    assert edge.purge({**keys, "x-pyisr-purge-secret": "guess"}).status_code == 403
    assert edge.purge({"xkey-softpurge": "counter-guard", "x-pyisr-purge-secret": "guess"}).status_code == 403
    assert is_varnish_hit(edge.get("/c/guard")), "nothing was purged"
    done = edge.purge({**keys, **secret})
    assert done.status_code == 200 and int(done.headers["x-pyisr-purged"]) >= 1
    assert edge_status(edge.get("/c/guard")) == "fwd=miss"
    # A purge that names no keys is a mistake, said so.
    assert edge.purge(secret).status_code == 400


def test_each_encoding_is_cached_apart_and_purged_together(edge: Edge) -> None:
    path = "/c/encodings"
    encodings = {"br": "br", "gzip": "gzip", "identity": None}
    before = fetched(edge)
    for asked, expected in encodings.items():
        second = cached_at_varnish(edge, path, {"accept-encoding": asked})
        assert second.headers.get("content-encoding") == expected, (asked, second.headers)
        assert second.headers["vary"] == "Accept-Encoding", "visitors' caches see the real Vary"
        assert value(second) == 0
    assert fetched_since(edge, before, 3) == 3, "one fetch per encoding"
    # What browsers send lands on the same three copies.
    for header in ("gzip, deflate, br, zstd", "br;q=1.0, gzip;q=0.8", "deflate", "gzip;q=0, br;q=0"):
        assert is_varnish_hit(edge.get(path, {"accept-encoding": header})), header
    assert fetched_since(edge, before, 3) == 3
    edge.bump("encodings")
    edge.revalidate(tag="counter-encodings")
    for asked, expected in encodings.items():
        until(lambda asked=asked: value(edge.get(path, {"accept-encoding": asked})) == 1)
        fresh = edge.get(path, {"accept-encoding": asked})
        assert fresh.headers.get("content-encoding") == expected
    done = edge.purge({"xkey-purge": "counter-encodings", "x-pyisr-purge-secret": PURGE_SECRET})
    assert int(done.headers["x-pyisr-purged"]) == 3, "one key names every encoding's copy"


# -- the VCL's rules for answers pyisr's site server never gives ---------------------------------
#
# A Django view's `Vary: Cookie`, an origin that fails while Varnish refreshes a page, an
# answer without caching headers: a scripted origin on 127.0.0.1 stands in for the app.


class Origin:
    """An HTTP origin whose answers the test sets per path; counts the requests it gets."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.hits: dict[str, int] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                owner.hits[path] = owner.hits.get(path, 0) + 1
                status, headers, body = owner.answers.get(path, (404, {}, b"not here"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, path: str, body: str, status: int = 200, **headers: str) -> None:
        self.answers[path] = (status, {k.replace("_", "-"): v for k, v in headers.items()}, body.encode())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Origin, Varnish]]:
    require_varnish()
    origin = Origin()
    varnish = None
    try:
        varnish = Varnish(origin.port, tmp_path_factory.mktemp("scripted-varnish")).start()
        yield origin, varnish
    finally:
        if varnish is not None:
            varnish.stop()
        origin.close()


def fetch(varnish: Varnish, path: str, **headers: str) -> httpx.Response:
    return httpx.get(varnish.url + path, headers={k.replace("_", "-"): v for k, v in headers.items()})


def test_a_pages_vary_cookie_does_not_split_the_edge_cache(scripted: tuple[Origin, Varnish]) -> None:
    """Django's session middleware says `Vary: Cookie` on a page pyisr cached (it read the
    session to see who asks); session holders are passed, so for everyone else the page is
    one: a visitor's analytics cookie must not make a copy of its own."""
    origin, varnish = scripted
    shared = {"cache_control": "s-maxage=60", "x_pyisr_cache": "HIT", "vary": "Cookie, Accept-Encoding"}
    origin.answer("/django-page", "the page", **shared)
    fetch(varnish, "/django-page", cookie="_ga=1")
    other = fetch(varnish, "/django-page", cookie="_ga=2; csrftoken=x")
    assert is_varnish_hit(other) and origin.hits["/django-page"] == 1
    assert other.headers["vary"] == "Accept-Encoding"
    # An answer pyisr did not cache keeps its Vary: Cookie (the app means it).
    origin.answer("/app-page", "per cookie", cache_control="s-maxage=60", vary="Cookie")
    fetch(varnish, "/app-page", cookie="theme=dark")
    fetch(varnish, "/app-page", cookie="theme=light")
    assert origin.hits["/app-page"] == 2
    assert is_varnish_hit(fetch(varnish, "/app-page", cookie="theme=light"))


def test_an_answer_without_caching_headers_is_not_kept(scripted: tuple[Origin, Varnish]) -> None:
    origin, varnish = scripted
    origin.answer("/plain", "no headers", content_type="text/plain")
    for _ in range(3):
        assert edge_status(fetch(varnish, "/plain")) == "fwd=miss"
    assert origin.hits["/plain"] == 3


def test_a_stale_answer_from_pyisr_is_kept_only_as_stale(scripted: tuple[Origin, Varnish]) -> None:
    """pyisr answers STALE while it regenerates: with `s-maxage` still ahead (a stale mark),
    Varnish must not keep that old page as fresh for the rest of it."""
    origin, varnish = scripted
    origin.answer(
        "/regenerating",
        "old",
        cache_control="s-maxage=3600, stale-while-revalidate=60",
        x_pyisr_cache="STALE",
    )
    fetch(varnish, "/regenerating")
    origin.answer(
        "/regenerating", "new", cache_control="s-maxage=3600, stale-while-revalidate=60", x_pyisr_cache="MISS"
    )
    stale = fetch(varnish, "/regenerating")  # served at once, refreshed in the background
    assert stale.text == "old" and edge_status(stale) == "hit; fwd=stale"
    until(lambda: fetch(varnish, "/regenerating").text == "new")
    assert is_varnish_hit(fetch(varnish, "/regenerating"))


def test_a_failed_background_refresh_keeps_the_stale_copy(scripted: tuple[Origin, Varnish]) -> None:
    origin, varnish = scripted
    origin.answer(
        "/flaky", "good", cache_control="s-maxage=1, stale-while-revalidate=60", x_pyisr_cache="MISS"
    )
    fetch(varnish, "/flaky")
    origin.answer("/flaky", "broken", status=500, cache_control="private, no-store")
    time.sleep(1.1)  # past s-maxage: within grace
    for _ in range(3):
        answer = fetch(varnish, "/flaky")
        assert answer.status_code == 200 and answer.text == "good"
        time.sleep(0.05)
    assert origin.hits["/flaky"] >= 2, "Varnish did ask again"


# -- a deploy purges the build it replaces ---------------------------------------------------------


def test_a_deploy_purges_the_previous_builds_pages_at_varnish(tmp_path: Path) -> None:
    """A page cached for an hour at the edge shows the new build as soon as it is live.

    Build A's page is cached at Varnish. Build B goes live while A is still served, and A's
    server dies without a word (SIGKILL): B's server purges A's pages as it starts. Then
    build C goes live, and B's server, stopped as a deploy stops it, purges its own.
    """
    require_varnish()
    site = copy_site(SITE, tmp_path / "site")
    data = tmp_path / "data"
    data.mkdir()
    backend = free_port()
    varnish = Varnish(backend, tmp_path / "varnish", env={SECRET_ENV: PURGE_SECRET}).start()
    env = {
        "PYISR_REVALIDATE_SECRET": REVALIDATE_SECRET,
        "EDGE_DATA": str(data),
        "PYISR_CDN": f"varnish://127.0.0.1:{varnish.port}",
        SECRET_ENV: PURGE_SECRET,
    }
    client = httpx.Client(timeout=10)
    servers: list[Server] = []

    def build() -> str:
        built = run_cli(["build", str(site)], env)
        assert built.returncode == 0, built.stdout + built.stderr
        return (site / ".pyisr" / "BUILD_ID").read_text().strip()

    def serve() -> Server:
        servers.append(Server(site, env, port=backend).start())
        return servers[-1]

    def at_edge() -> httpx.Response:
        return client.get(varnish.url + "/c/deploy")

    try:
        build_a = build()
        server_a = serve()
        direct = server_a.get("/c/deploy")
        assert f"_b/{build_a}" in direct.headers["surrogate-key"].split()
        assert value(at_edge()) == 0 and is_varnish_hit(at_edge())

        (data / "value-deploy").write_text("1")  # what build B renders
        build_b = build()
        assert server_a.proc is not None
        os.killpg(server_a.proc.pid, signal.SIGKILL)  # no shutdown, no purge of its own
        server_a.proc.wait()
        server_a.proc = None
        assert value(at_edge()) == 0, "still A's page: nothing has purged it"

        server_b = serve()
        until(lambda: value(at_edge()) == 1)  # B's start purged A's pages
        assert f"_b/{build_b}" in server_b.get("/c/deploy").headers["surrogate-key"].split()
        assert is_varnish_hit(at_edge())

        build()  # C is current; B's server is still up, and still B's
        assert value(at_edge()) == 1 and is_varnish_hit(at_edge())
        server_b.stop()  # as a deploy stops it: it purges B's pages on its way out
        until(lambda: at_edge().status_code == 503)  # nothing cached, nobody to ask
    finally:
        client.close()
        for server in servers:
            server.stop()
        varnish.stop()
