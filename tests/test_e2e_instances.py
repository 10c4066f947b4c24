"""Several ``pyisr start`` instances sharing one Redis: one coherent cache.

Each test starts its own ``redis-server`` on a free port (so it can stop it) and three
pyisr instances on their own ports, and speaks HTTP to them.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from e2e_support import Server, run_cli, running
from redis_support import RedisServer, redis_py, unique_prefix

pytestmark = pytest.mark.slow

SECRET = "instances-secret"

PAGE = """
import os
import time
from pathlib import Path

revalidate = int(os.environ.get("PAGE_REVALIDATE", "2"))
tags = ["posts"]


def generate_static_params():
    return [{"id": "1"}, {"id": "2"}]


def page(params):
    # Every render, in any process, is one line in the counts file.
    with open(os.environ["RENDERS"], "a") as fh:
        fh.write(params["id"] + "\\n")
    time.sleep(0.3)
    return f"<p>post {params['id']} at={time.time():.6f}</p>"
"""


def renders(path: Path, post: str) -> int:
    return path.read_text().split().count(post) if path.exists() else 0


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    redis_py()
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    (root / "app" / "p" / "[id]").mkdir(parents=True)
    (root / "app" / "p" / "[id]" / "page.py").write_text(textwrap.dedent(PAGE))
    return root


def start_instances(site: Path, env: dict[str, str], n: int = 3) -> list[Server]:
    servers: list[Server] = []
    try:
        for _ in range(n):
            servers.append(Server(site, env).start())
    except Exception:
        for server in servers:
            server.stop()
        raise
    return servers


def test_three_instances_share_pages_invalidations_and_renders(
    site: Path, redis: RedisServer, tmp_path: Path
) -> None:
    counts = tmp_path / "renders.txt"
    env = {
        "PYISR_CACHE": f"{redis.url}?prefix={unique_prefix()}",
        "RENDERS": str(counts),
        "PYISR_REVALIDATE_SECRET": SECRET,
    }
    build = run_cli(["build", str(site)], env)
    assert build.returncode == 0, build.stderr
    assert renders(counts, "1") == 1
    servers = start_instances(site, env)
    try:
        # The build's pages are in Redis: every instance serves the same one. (Starting three
        # processes may take longer than the 2 s window: then one of them regenerated it.)
        bodies = {s.get("/p/1").text for s in servers}
        assert len(bodies) == 1 and renders(counts, "1") <= 2
        for s in servers:
            assert s.get("/_pyisr/health").json()["status"] == "ok"

        # A page rendered on demand by one instance is a HIT on the others.
        assert servers[0].get("/p/3").headers["x-pyisr-cache"] == "MISS"
        assert {s.get("/p/3").headers["x-pyisr-cache"] for s in servers[1:]} == {"HIT"}
        assert renders(counts, "3") == 1

        # Revalidating on the first instance: the other two serve the new body within 1 s.
        old = servers[1].get("/p/1").text
        response = servers[0].request(
            "POST", "/_pyisr/revalidate?path=/p/1", headers={"authorization": f"Bearer {SECRET}"}
        )
        assert response.status_code == 200
        time.sleep(1.0)
        new_bodies = {s.get("/p/1").text for s in servers}
        assert len(new_bodies) == 1 and old not in new_bodies

        # revalidate_tag on one instance: the next request anywhere renders fresh.
        servers[2].request(
            "POST", "/_pyisr/revalidate?tag=posts", headers={"authorization": f"Bearer {SECRET}"}
        )
        time.sleep(1.0)
        before = renders(counts, "2")
        after_tag = {s.get("/p/2").text for s in servers}
        assert len(after_tag) == 1
        assert renders(counts, "2") == before + 1  # one render for all three

        # Stale on all three, 300 concurrent requests spread over them: one render.
        time.sleep(2.3)
        before = renders(counts, "2")
        with ThreadPoolExecutor(60) as pool:
            results = list(pool.map(lambda i: servers[i % 3].get("/p/2"), range(300)))
        assert all(r.status_code == 200 for r in results)
        time.sleep(1.0)
        assert renders(counts, "2") == before + 1, "a stale page was regenerated more than once"

        # Restarting an instance keeps the cache. /p/2 is regenerated now first, so that no
        # background regeneration (started by a STALE answer) can replace it meanwhile.
        servers[0].request(
            "POST", "/_pyisr/revalidate?path=/p/2", headers={"authorization": f"Bearer {SECRET}"}
        )
        fresh = servers[0].get("/p/2")
        assert fresh.headers["x-pyisr-cache"] == "HIT"
        last = fresh.text
        servers[1].restart()
        again = servers[1].get("/p/2")
        assert again.headers["x-pyisr-cache"] in ("HIT", "STALE") and again.text == last
    finally:
        for s in servers:
            s.stop()


def test_redis_outage_fails_no_request_and_recovers(site: Path, redis: RedisServer, tmp_path: Path) -> None:
    counts = tmp_path / "renders.txt"
    env = {
        "PYISR_CACHE": f"{redis.url}?prefix={unique_prefix()}",
        "RENDERS": str(counts),
        "PYISR_REVALIDATE_SECRET": SECRET,
    }
    assert run_cli(["build", str(site)], env).returncode == 0
    servers = start_instances(site, env, n=2)
    try:
        for s in servers:
            s.get("/p/1")
        redis.kill()
        failures = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            for s in servers:
                for path in ("/p/1", "/p/2", "/p/7"):
                    if s.get(path).status_code != 200:
                        failures += 1
        assert failures == 0
        health = servers[0].get("/_pyisr/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert health.json()["reasons"] == ["the cache store is unreachable"]
        assert "cache" not in health.json(), "no hosts or paths without the secret"
        log = servers[0].log()
        assert log.count("Redis unreachable") == 1, log[-2000:]

        redis.start()  # same port
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and servers[0].get("/_pyisr/health").json()["status"] != "ok":
            time.sleep(0.2)
        assert servers[0].get("/_pyisr/health").json()["status"] == "ok"
        # Invalidations work across instances again.
        servers[0].get("/p/9")
        time.sleep(0.5)
        old = servers[1].get("/p/9").text
        servers[0].request(
            "POST", "/_pyisr/revalidate?tag=posts", headers={"authorization": f"Bearer {SECRET}"}
        )
        time.sleep(1.0)
        assert servers[1].get("/p/9").text != old
    finally:
        for s in servers:
            s.stop()


def test_start_seeds_an_empty_redis_from_the_local_build_once(
    site: Path, redis: RedisServer, tmp_path: Path
) -> None:
    counts = tmp_path / "renders.txt"
    local = {"RENDERS": str(counts), "PAGE_REVALIDATE": "60"}
    assert run_cli(["build", str(site)], local).returncode == 0  # a local (filesystem) build
    assert renders(counts, "1") == 1
    env = {**local, "PYISR_CACHE": f"{redis.url}?prefix={unique_prefix()}"}
    servers = start_instances(site, env, n=2)
    try:
        assert {s.get("/p/1").headers["x-pyisr-cache"] for s in servers} <= {"HIT", "STALE"}
        assert renders(counts, "1") == 1  # served from the seeded build, not rendered again
        seeded = [s for s in servers if "seeded the shared cache" in s.log()]
        assert len(seeded) == 1
    finally:
        for s in servers:
            s.stop()


SCRIPT = """
import sys

import pyisr

pyisr.configure(site=sys.argv[1])          # or PYISR_SITE: the server's own store and build
pyisr.revalidate_tag("posts")
"""


def test_a_script_and_the_cli_see_exactly_what_the_server_sees(
    site: Path, redis: RedisServer, tmp_path: Path
) -> None:
    """One decision for the namespace: `<prefix>:<build id>` for the server, the CLI and scripts."""
    import os
    import subprocess
    import sys

    counts = tmp_path / "renders.txt"
    env = {"PYISR_CACHE": f"{redis.url}?prefix={unique_prefix()}", "RENDERS": str(counts)}
    env["PAGE_REVALIDATE"] = "3600"
    build = run_cli(["build", str(site)], env)
    assert build.returncode == 0, build.stderr
    with running(site, env) as server:
        assert server.get("/p/1").headers["x-pyisr-cache"] == "HIT"
        assert server.get("/p/9").headers["x-pyisr-cache"] == "MISS"
        listed = run_cli(["cache", "list", "--site", str(site)], env)
        assert listed.returncode == 0, listed.stderr
        assert {"/p/1", "/p/2", "/p/9"} <= set(listed.stdout.split()), listed.stdout
        inspected = run_cli(["cache", "inspect", "/p/9", "--json", "--site", str(site)], env)
        assert inspected.returncode == 0 and '"cached": true' in inspected.stdout

        script = tmp_path / "script.py"
        script.write_text(SCRIPT)
        ran = subprocess.run(
            [sys.executable, str(script), str(site)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 0, ran.stderr
        before = renders(counts, "1")
        time.sleep(1.1)  # the invalidation reaches the server's memory tier within a second
        response = server.get("/p/1")
        assert response.headers["x-pyisr-cache"] == "MISS", "the script's revalidate_tag reached the server"
        assert renders(counts, "1") == before + 1
