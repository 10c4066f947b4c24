"""Prometheus metrics (pyisr/metrics.py): who may read ``/_pyisr/metrics``, what it counts.

In-process tests run the site server over httpx's ASGI transport on the fake clock of
conftest.py, and parse what the endpoint answers with prometheus_client's own parser.
The end-to-end test runs ``pyisr start --workers 2`` and checks that the workers' counts
add up in one scrape (prometheus_client's multi-process mode), and that the run's
metrics directory is gone once the server has stopped.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FakeClock
from e2e_support import Server, copy_site, run_cli
from prometheus_client.parser import text_string_to_metric_families
from redis_support import redis_url  # noqa: F401 - a fixture
from starlette.applications import Starlette
from starlette.routing import Mount

from pyisr.cache.memory import MemoryCache
from pyisr.config import Config, ConfigError, as_networks, load_config
from pyisr.engine import Engine
from pyisr.events import Delta, Regeneration
from pyisr.metrics import (
    CONTENT_TYPE,
    MetricsAccess,
    MetricsSink,
    RouteLabels,
    enable,
    exposition,
    metrics_app,
    render_latest,
)
from pyisr.render import Rendered
from pyisr.server.app import App
from pyisr.site_store import open_site_cache

SECRET = "metrics-secret-for-tests"

PAGE = """
revalidate = 1

def page(params):
    return "<p>plain</p>"
"""
POST = """
revalidate = 60
dynamic_params = True

def generate_static_params():
    return []

def page(params):
    return f"<p>post {params['id']}</p>"
"""
#: Renders once, then fails: its regeneration is counted as failed.
FAILING = """
revalidate = 1
RENDERS = []

def page(params):
    RENDERS.append(1)
    if len(RENDERS) > 1:
        raise RuntimeError("the database is gone")
    return "<p>once</p>"
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def write_site(site: Path) -> Path:
    for route, source in (("p", PAGE), ("blog/[id]", POST), ("fail", FAILING)):
        (site / "app" / route).mkdir(parents=True)
        (site / "app" / route / "page.py").write_text(textwrap.dedent(source))
    return site


def samples(text: str) -> Samples:
    """Every sample of an exposition, by name and sorted labels."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over every label set containing ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= set(ls))


@pytest.fixture
def make_app(tmp_path: Path, clock: FakeClock) -> Callable[..., App]:
    site = write_site(tmp_path / "site")

    def make(**settings: Any) -> App:
        # Exact counts: no re-warm renders after the invalidations (pyisr.rewarm).
        config = Config(**{"rewarm_rate": 0.0, **settings})
        return App(site, config=config, engine=Engine(open_site_cache(site, config), clock=clock))

    return make


def client_of(app: App, address: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/_pyisr/metrics", headers={"authorization": f"Bearer {SECRET}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    assert response.headers["cache-control"] == "no-store"
    return samples(response.text)


# -- who may read them --------------------------------------------------------------------------


async def test_metrics_are_off_by_default(make_app: Callable[..., App]) -> None:
    app = make_app()
    async with client_of(app) as client:
        await client.get("/p")
        for headers in ({}, {"authorization": f"Bearer {SECRET}"}):
            response = await client.get("/_pyisr/metrics", headers=headers)
            assert response.status_code == 404
            assert "pyisr_" not in response.text
    assert not app.engine.events.sinks  # nothing counted for metrics nobody can read
    await app.shutdown()


async def test_the_bearer_secret_opens_them_and_nothing_else_does(make_app: Callable[..., App]) -> None:
    app = make_app(metrics_secret=SECRET)
    async with client_of(app) as client:
        await client.get("/p")
        refused = [
            await client.get("/_pyisr/metrics"),
            await client.get("/_pyisr/metrics", headers={"authorization": "Bearer wrong"}),
            await client.get("/_pyisr/metrics", headers={"authorization": f"Basic {SECRET}"}),
            await client.get("/_pyisr/metrics", headers={"authorization": f"Bearer {SECRET}x"}),
            await client.get(f"/_pyisr/metrics?secret={SECRET}"),  # never in a URL
        ]
        for response in refused:
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert "pyisr_requests" not in response.text
        found = await scrape(client)
        assert value(found, "pyisr_requests_total", cache="MISS", route="/p") == 1
        assert (await client.post("/_pyisr/metrics")).status_code == 405
    await app.shutdown()


async def test_an_allowed_address_needs_no_secret(make_app: Callable[..., App]) -> None:
    app = make_app(metrics_allow=as_networks(["10.0.0.0/8", "::1"]))
    async with client_of(app, "10.1.2.3") as inside, client_of(app, "192.168.1.5") as outside:
        allowed = await inside.get("/_pyisr/metrics")
        assert allowed.status_code == 200 and "pyisr_renders_in_flight" in allowed.text
        refused = await outside.get("/_pyisr/metrics")
        assert refused.status_code == 403 and "pyisr_" not in refused.text
        # A secret is no use where none is configured.
        refused = await outside.get("/_pyisr/metrics", headers={"authorization": "Bearer anything"})
        assert refused.status_code == 403
    async with client_of(app, "::1") as local, client_of(app, "::ffff:10.9.9.9") as mapped:
        assert (await local.get("/_pyisr/metrics")).status_code == 200
        assert (await mapped.get("/_pyisr/metrics")).status_code == 200
    await app.shutdown()


def test_access_rules_with_both_a_secret_and_addresses() -> None:
    access = MetricsAccess(SECRET, as_networks("127.0.0.1, 10.0.0.0/8"))
    assert access.status(None, "127.0.0.1") == 200
    assert access.status(f"Bearer {SECRET}", "203.0.113.9") == 200
    assert access.status(f"bearer {SECRET}", None) == 200
    assert access.status("Bearer nope", "203.0.113.9") == 401  # a secret exists: ask for it
    assert access.status(None, "not an address") == 401
    assert MetricsAccess(None, ()).status(f"Bearer {SECRET}", "127.0.0.1") == 404


def test_settings_of_the_metrics_and_their_errors() -> None:
    env = {"PYISR_METRICS_SECRET": SECRET, "PYISR_METRICS_ALLOW": "127.0.0.1, 10.0.0.0/8,::1"}
    config = load_config(None, environ=env)
    assert config.metrics_secret == SECRET
    assert [str(n) for n in config.metrics_allow] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    with pytest.raises(ConfigError) as bad:
        load_config(None, environ={"PYISR_METRICS_ALLOW": "10.0.0.1/8"})
    message = str(bad.value)
    assert "PYISR_METRICS_ALLOW" in message and "write 10.0.0.0/8" in message
    with pytest.raises(ConfigError, match="PYISR_METRICS_ALLOW.*'intranet' is not an IP address"):
        load_config(None, environ={"PYISR_METRICS_ALLOW": "intranet"})


def test_settings_in_the_site_file(tmp_path: Path) -> None:
    (tmp_path / "pyisr.toml").write_text('metrics_allow = ["127.0.0.1", "10.0.0.0/300"]\n')
    with pytest.raises(ConfigError) as bad:
        load_config(tmp_path)
    assert "key 'metrics_allow'" in str(bad.value) and "'10.0.0.0/300'" in str(bad.value)
    (tmp_path / "pyisr.toml").write_text('metrics_allow = "10.0.0.0/8"\nmetrics_secret = ""\n')
    with pytest.raises(ConfigError, match="metrics_secret"):
        load_config(tmp_path)


# -- what they count ----------------------------------------------------------------------------


async def test_known_traffic_gives_known_values(make_app: Callable[..., App], clock: FakeClock) -> None:
    app = make_app(metrics_secret=SECRET)
    engine_calls: list[str] = []
    real_get = app.engine.get

    async def counting_get(key: str, *args: Any, **kwargs: Any) -> Any:
        engine_calls.append(key)
        return await real_get(key, *args, **kwargs)

    app.engine.get = counting_get  # type: ignore[method-assign]
    statuses: dict[str, int] = {}
    async with client_of(app) as client:

        async def get(path: str) -> None:
            response = await client.get(path)
            assert response.status_code == 200, response.text
            status = response.headers["x-pyisr-cache"]
            statuses[status] = statuses.get(status, 0) + 1

        for _ in range(12):
            await get("/p")
        for post in ("1", "2", "2", "3"):
            await get(f"/blog/{post}")
        await get("/fail")
        clock.advance(1.5)
        await get("/fail")  # STALE; its regeneration fails in the background
        await app.engine.drain()
        await app.engine.revalidate_tag("posts")
        await app.engine.revalidate_path("/blog/[id]", "page")
        app.engine.store_failures.record(OSError(28, "No space left on device"), "/p", "storing", op="set")
        assert len(engine_calls) < 12 + 4 + 2  # some of the HITs came from the fast path

        found = await scrape(client)

    assert statuses == {"MISS": 5, "HIT": 12, "STALE": 1}
    assert value(found, "pyisr_requests_total", cache="MISS", route="/p") == 1
    assert value(found, "pyisr_requests_total", cache="HIT", route="/p") == 11
    assert value(found, "pyisr_requests_total", cache="MISS", route="/blog/[id]") == 3
    assert value(found, "pyisr_requests_total", cache="HIT", route="/blog/[id]") == 1
    assert value(found, "pyisr_requests_total", cache="STALE", route="/fail") == 1
    assert total(found, "pyisr_requests_total") == sum(statuses.values())
    routes = {dict(labels).get("route") for (_, labels) in found} - {None}
    assert routes == {"/p", "/blog/[id]", "/fail"}  # patterns, never paths

    assert value(found, "pyisr_regenerations_total", result="ok", route="/blog/[id]") == 3
    assert value(found, "pyisr_regenerations_total", result="failed", route="/fail") == 1
    assert total(found, "pyisr_regenerations_total", result="ok") == 5
    assert total(found, "pyisr_regeneration_seconds_count") == 6  # every render that ran
    assert value(found, "pyisr_regeneration_seconds_count", route="/fail") == 2
    assert value(found, "pyisr_regeneration_seconds_bucket", route="/fail", le="+Inf") == 2

    assert value(found, "pyisr_invalidations_total", kind="tag") == 1
    assert value(found, "pyisr_invalidations_total", kind="page") == 1
    assert value(found, "pyisr_store_errors_total", op="set") == 1
    assert value(found, "pyisr_store_degraded") == 1  # a store failure in the last minute
    assert value(found, "pyisr_renders_in_flight") == 0
    assert value(found, "pyisr_renders_stuck") == 0
    assert value(found, "pyisr_tier_bytes") > 0  # the memory tier holds the pages

    async with client_of(app) as client:
        for _ in range(3):
            await client.get("/p")
        again = await scrape(client)  # counters go on from where they were
    assert total(again, "pyisr_requests_total", route="/p") == 12 + 3
    await app.shutdown()


async def test_a_redis_store_exports_no_entry_count_rather_than_zero(redis_url: str) -> None:  # noqa: F811
    from redis_support import unique_prefix

    from pyisr.cache.urls import build_handler

    engine = Engine(build_handler(f"{redis_url}?prefix={unique_prefix()}", memory_tier_bytes=10**6))

    async def render() -> Rendered:
        return Rendered("<p>x</p>", revalidate=60)

    for key in ("/a", "/b"):
        await engine.get(key, render)
    sink = enable(engine)
    await engine.events.report()
    found = samples(render_body(sink))
    assert "pyisr_entries" not in {name for name, _labels in found}, "unknown, not 0"
    assert value(found, "pyisr_tier_bytes") > 0
    await engine.close()


async def test_entries_and_tier_bytes_of_a_memory_store(clock: FakeClock) -> None:
    engine = Engine(MemoryCache(), clock=clock)
    sink = enable(engine)
    assert enable(engine) is sink and engine.events.sinks == [sink]  # idempotent

    async def render() -> Rendered:
        return Rendered("<p>x</p>", revalidate=60)

    for key in ("/a", "/b", "/c"):
        await engine.get(key, render)
    await engine.events.report()
    found = samples(render_body(sink))
    assert value(found, "pyisr_entries") == 3
    assert value(found, "pyisr_tier_bytes") > 0
    await engine.close()


def render_body(sink: MetricsSink) -> str:
    return exposition(sink).decode()


def test_route_labels_are_capped() -> None:
    labels = RouteLabels(limit=2)
    assert [labels(r) for r in ("/a", "/b", "/c", "/a", "/d")] == ["/a", "/b", "other", "/a", "other"]


def test_a_burst_beyond_the_timings_is_counted_not_timed(clock: FakeClock) -> None:
    engine = Engine(MemoryCache(), clock=clock)
    sink = enable(engine)
    delta = Delta(
        regenerations=[Regeneration("/x", "ok", 0.2), Regeneration("/x", "skipped", 0.0)],
        untimed={("/x", "ok"): 5},
    )
    sink.report(delta)
    found = samples(render_body(sink))
    assert value(found, "pyisr_regenerations_total", result="ok", route="/x") == 6
    assert value(found, "pyisr_regenerations_total", result="skipped", route="/x") == 1
    assert value(found, "pyisr_regeneration_seconds_count", route="/x") == 1  # only the render that ran
    assert value(found, "pyisr_regeneration_seconds_bucket", route="/x", le="0.25") == 1
    assert value(found, "pyisr_regeneration_seconds_bucket", route="/x", le="0.1") == 0


# -- in the integrations ------------------------------------------------------------------------


async def test_metrics_app_mounted_in_starlette(clock: FakeClock) -> None:
    engine = Engine(MemoryCache(), clock=clock)
    outer = Starlette(
        routes=[
            Mount("/metrics", app=metrics_app(engine, secret=SECRET)),
            Mount("/open", app=metrics_app(engine, allow=["127.0.0.0/8"])),
            Mount("/off", app=metrics_app(engine)),
        ]
    )
    engine.events.served("/blog/1", "/blog/[id]", "HIT")
    transport = httpx.ASGITransport(app=outer, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        assert (await client.get("/metrics/")).status_code == 401
        response = await client.get("/metrics/", headers={"authorization": f"Bearer {SECRET}"})
        assert response.status_code == 200 and response.headers["content-type"] == CONTENT_TYPE
        found = samples(response.text)
        assert value(found, "pyisr_requests_total", cache="HIT", route="/blog/[id]") == 1
        assert (await client.get("/open/")).status_code == 200
        assert (await client.get("/off/")).status_code == 404
        assert (await client.post("/open/")).status_code == 405
    await engine.close()


def test_render_latest_for_a_sync_view(sync_engine: Engine) -> None:
    enable()  # the default engine, as a Django or Flask app would at start-up
    sync_engine.events.served("/posts/5", "/posts/<int:pk>", "MISS")
    body, content_type = render_latest()  # reports this process's counts first
    assert content_type == CONTENT_TYPE
    found = samples(body.decode())
    assert value(found, "pyisr_requests_total", cache="MISS", route="/posts/<int:pk>") == 1


# -- end to end: two workers, one scrape ------------------------------------------------------

E2E_POST = """
revalidate = 60
dynamic_params = True

def generate_static_params():
    return [{"id": str(i)} for i in range(1, 6)]

def page(params):
    return f"<html><body>post {params['id']}</body></html>"
"""
E2E_PID = """
import os
from starlette.responses import PlainTextResponse

def GET(request):
    return PlainTextResponse(str(os.getpid()))
"""


@pytest.mark.slow
def test_two_workers_report_together(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "app" / "blog" / "[id]").mkdir(parents=True)
    (site / "app" / "blog" / "[id]" / "page.py").write_text(E2E_POST)
    (site / "app" / "pid").mkdir(parents=True)
    (site / "app" / "pid" / "route.py").write_text(E2E_PID)
    site = copy_site(site, tmp_path / "built")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"TMPDIR": str(temp), "PYISR_METRICS_SECRET": SECRET, "PYTHONDONTWRITEBYTECODE": "1"}
    done = run_cli(["build", str(site)], env)
    assert done.returncode == 0, done.stdout + done.stderr

    server = Server(site, env, workers=2, server="granian").start()
    try:
        sent = {"n": 0}
        pids: set[str] = set()
        lock = threading.Lock()

        def load(index: int) -> None:
            # A new connection for each request: the kernel hands them to either worker.
            for i in range(40):
                with httpx.Client(timeout=10) as once:
                    path = f"/blog/{(index * 40 + i) % 8 + 1}"  # 1-5 prerendered, 6-8 rendered here
                    response = once.get(server.url + path)
                    assert response.status_code == 200, response.text
                    pid = once.get(server.url + "/pid").text
                with lock:
                    sent["n"] += 1
                    pids.add(pid)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(pids) == 2, f"one worker answered everything: {pids}"

        # The worker answering a scrape reports its own counts first; the other's arrive
        # within its report interval: poll until they add up, with a deadline.
        deadline = time.monotonic() + 30
        while True:
            response = server.get("/_pyisr/metrics", headers={"authorization": f"Bearer {SECRET}"})
            assert response.status_code == 200, response.text
            found = samples(response.text)
            counted = total(found, "pyisr_requests_total")
            assert counted <= sent["n"]
            if counted == sent["n"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert counted == sent["n"], server.log()
        assert total(found, "pyisr_requests_total", cache="HIT") >= 5 * 6
        # 6-8 rendered here (requests arriving while one renders are MISSes too).
        misses = total(found, "pyisr_requests_total", cache="MISS")
        assert misses >= 3
        assert total(found, "pyisr_requests_total", cache="HIT") + misses == sent["n"]
        routes = {dict(labels)["route"] for (name, labels) in found if name == "pyisr_requests_total"}
        assert routes == {"/blog/[id]"}  # the pattern, never /blog/1
        assert total(found, "pyisr_regeneration_seconds_count") >= 3
        assert value(found, "pyisr_store_degraded") == 0

        written = list(temp.glob("pyisr-metrics-*/counter_*.db"))
        assert len({path.name for path in written}) == 2  # one file per worker, both counted
        assert (temp.glob("pyisr-metrics-*").__next__().stat().st_mode & 0o777) == 0o700
        refused = server.get("/_pyisr/metrics")
        assert refused.status_code == 401 and "pyisr_" not in refused.text
    finally:
        server.stop()
    assert list(temp.glob("pyisr-metrics-*")) == []  # removed with the server


# -- the dashboard and the alerts name what is exported ----------------------------------------


def exported_names() -> set[str]:
    """Every metric and sample name the sink writes (histograms: their family name too)."""
    engine = Engine(MemoryCache(), clock=FakeClock())
    sink = enable(engine)
    sink.report(
        Delta(
            requests={("HIT", "/x"): 1},
            regenerations=[Regeneration("/x", "ok", 0.1)],
            invalidations={"tag": 1},
            store_errors={"set": 1},
        )
    )
    names: set[str] = set()
    for family in text_string_to_metric_families(render_body(sink)):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_the_dashboard_and_the_readme_name_only_exported_metrics() -> None:
    root = Path(__file__).resolve().parent.parent
    exported = exported_names()
    dashboard = json.loads((root / "deploy" / "grafana" / "pyisr.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
    used = {name for expr in exprs for name in re.findall(r"pyisr_\w+", expr)}
    assert used <= exported, used - exported
    for name in ("pyisr_entries", "pyisr_tier_bytes", "pyisr_store_degraded", "pyisr_renders_stuck"):
        assert name in used
    assert any("histogram_quantile(0.99" in expr for expr in exprs)

    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Metrics") : readme.index("### Structured logs")]
    named = set(re.findall(r"pyisr_[a-z_]+[a-z]", section))
    assert named and named <= exported, named - exported


def test_the_run_directory_of_the_workers_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from pyisr.server.supervisor import (
        METRICS_DIR_ENV,
        OWN_METRICS_DIR_ENV,
        mark_dead,
        prepare_metrics_dir,
    )

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # Set, so that the test's end restores the environment whatever prepare_metrics_dir does.
    monkeypatch.setenv(METRICS_DIR_ENV, "/somewhere/a/user/named")
    monkeypatch.setenv(OWN_METRICS_DIR_ENV, "1:/somewhere/else")
    orphan = tmp_path / "pyisr-metrics-999999999-abc"  # its server is gone (no such PID)
    orphan.mkdir()
    (orphan / "counter_1.db").write_bytes(b"x")
    alive = tmp_path / f"pyisr-metrics-{os.getpid()}-def"  # a server still running
    alive.mkdir()

    path = prepare_metrics_dir()
    assert Path(path).parent == tmp_path and Path(path).stat().st_mode & 0o777 == 0o700
    assert os.environ[METRICS_DIR_ENV] == path  # never the directory the environment named
    assert prepare_metrics_dir() == path  # the same for the whole run (the supervisor finds it)
    assert not orphan.exists() and alive.exists()

    for name in ("gauge_livesum_42.db", "gauge_livemax_42.db", "counter_42.db", "gauge_livesum_7.db"):
        (Path(path) / name).write_bytes(b"")
    mark_dead(42, path)
    assert sorted(p.name for p in Path(path).iterdir()) == ["counter_42.db", "gauge_livesum_7.db"]
