"""What an operator and a stranger can do to a running site: limits, endpoints, tools.

In-process (httpx's ASGI transport against :class:`pyisr.server.app.App`) for the HTTP
answers; a real ``pyisr start`` for ``pyisr cache purge`` reaching a running server.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from e2e_support import run_cli, running

from pyisr.config import ConfigError, load_config
from pyisr.engine import Engine
from pyisr.server.app import App
from pyisr.site_store import open_site_cache

SECRET = "ops-secret-123"

PAGE = """
revalidate = False


def generate_static_params():
    return [{"id": "1"}]


def page(params):
    return f"<p>post {params['id']}</p>"
"""

DATA_PAGE = """
import os
from pathlib import Path

from pyisr import cached

revalidate = False


def load_posts():
    counts = Path(os.environ["DATA_CALLS"])
    with counts.open("a") as fh:
        fh.write("x")
    return {"calls": len(counts.read_text())}


get_posts = cached(load_posts, ["posts"])


def page(params):
    return f"<p>data {get_posts()['calls']}</p>"
"""


def make_site(root: Path) -> Path:
    (root / "app" / "blog" / "[id]").mkdir(parents=True)
    (root / "app" / "blog" / "[id]" / "page.py").write_text(PAGE)
    (root / "app" / "data").mkdir(parents=True)
    (root / "app" / "data" / "page.py").write_text(DATA_PAGE)
    (root / "public").mkdir()
    (root / "public" / "robots.txt").write_text("User-agent: *\n")
    return root


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DATA_CALLS", str(tmp_path / "data-calls"))
    monkeypatch.setenv("PYISR_REVALIDATE_SECRET", SECRET)
    return make_site(tmp_path / "site")


def client(app: App) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def test_limits_and_methods(site: Path) -> None:
    app = App(site, engine=Engine(open_site_cache(site, load_config(site))))
    async with client(app) as http:
        assert (await http.get("/robots.txt")).status_code == 200
        for method in ("POST", "PUT", "DELETE"):
            refused = await http.request(method, "/robots.txt")
            assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"
        long = await http.get("/blog/" + "x" * 10_000)
        assert long.status_code == 414
        assert not (site / ".pyisr" / "cache").exists() or not any(
            "xxxx" in p.name for p in (site / ".pyisr" / "cache").rglob("*")
        ), "nothing was written for it"
        assert (await http.get("/blog/" + "y" * 1000)).status_code == 200, "a long but valid key is a page"
    await app.shutdown()


async def test_the_revalidate_endpoint_refuses_what_it_cannot_mean(site: Path) -> None:
    app = App(site, engine=Engine(open_site_cache(site, load_config(site))))
    auth = {"authorization": f"Bearer {SECRET}", "content-type": "application/json"}
    async with client(app) as http:
        for body in (b"[1, 2]", b'"path"', b"3", b"{"):
            answer = await http.post("/_pyisr/revalidate", content=body, headers=auth)
            assert answer.status_code == 400 and "JSON object" in answer.json()["error"], body
        big = json.dumps({"path": "/blog/1", "pad": "x" * 70_000}).encode()
        assert (await http.post("/_pyisr/revalidate", content=big, headers=auth)).status_code == 413
        pattern = await http.post("/_pyisr/revalidate?path=/blog/[id]", headers=auth)
        assert pattern.status_code == 400 and "type=page" in pattern.json()["error"]
        assert not (site / ".pyisr" / "cache" / "dev" / "entries" / "blog" / "[id].html").exists()
        ok = await http.post(
            "/_pyisr/revalidate", content=b'{"path": "/blog/[id]", "type": "page"}', headers=auth
        )
        assert ok.status_code == 200
        missing = await http.post("/_pyisr/revalidate?path=/nothing", headers=auth)
        assert missing.status_code == 404
    await app.shutdown()


async def test_health_tells_strangers_only_ok_or_degraded(site: Path) -> None:
    app = App(site, engine=Engine(open_site_cache(site, load_config(site))))
    async with client(app) as http:
        anonymous = await http.get("/_pyisr/health")
        assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
        detailed = (await http.get("/_pyisr/health", headers={"authorization": f"Bearer {SECRET}"})).json()
        assert detailed["status"] == "ok" and "cache" in detailed and "build_id" in detailed
        assert "engine" in detailed
    await app.shutdown()


def test_no_cache_url_is_ever_shown_with_its_password(tmp_path: Path) -> None:
    from pyisr.cache.urls import handler_from_url, redact_url

    assert redact_url("redis://user:s3cr3t@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://:s3cr3t@host:notaport/0") == "redis://:***@host:notaport/0"
    assert redact_url("file:///var/cache") == "file:///var/cache"
    with pytest.raises(ValueError) as raised:
        handler_from_url("rediss+nope://:s3cr3t@host/0")
    assert "s3cr3t" not in str(raised.value)
    with pytest.raises(ConfigError) as bad:
        load_config(None, environ={"PYISR_SITE_URL": "https://admin:s3cr3t@www.example.com/x"})
    assert "s3cr3t" not in str(bad.value) and "PYISR_SITE_URL" in str(bad.value)
    result = run_cli(["build", str(tmp_path / "nosite")], {"PYISR_CACHE": "redis://:s3cr3t@127.0.0.1:1/0"})
    assert "s3cr3t" not in result.stdout + result.stderr


@pytest.mark.slow
def test_cache_purge_reaches_a_running_server_and_every_listed_key_can_be_inspected(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path / "site")
    env = {"DATA_CALLS": str(tmp_path / "data-calls"), "PYISR_REVALIDATE_SECRET": SECRET}
    built = run_cli(["build", str(site)], env)
    assert built.returncode == 0, built.stderr
    with running(site, env) as server:
        assert server.get("/blog/1").headers["x-pyisr-cache"] == "HIT"
        assert server.get("/data").text == "<p>data 1</p>"
        listed = run_cli(["cache", "list", "--json", "--site", str(site)], env)
        keys = [row["key"] for row in json.loads(listed.stdout)]
        assert "/blog/1" in keys and any(k.startswith("data:") for k in keys), keys
        for key in keys:
            inspected = run_cli(["cache", "inspect", key, "--json", "--site", str(site)], env)
            assert inspected.returncode == 0 and json.loads(inspected.stdout)["cached"], key

        purged = run_cli(["cache", "purge", "/blog/1", "--site", str(site)], env)
        assert purged.returncode == 0, purged.stderr
        time.sleep(1.1)  # invalidations reach every server's memory within a second
        assert server.get("/blog/1").headers["x-pyisr-cache"] == "MISS", "the running server re-rendered"
        assert server.get("/blog/1").headers["x-pyisr-cache"] == "HIT"

        data_key = next(k for k in keys if k.startswith("data:"))
        assert run_cli(["cache", "purge", data_key, "--site", str(site)], env).returncode == 0
        time.sleep(1.1)
        again = server.get("/data")
        assert again.headers["x-pyisr-cache"] == "MISS" and again.text == "<p>data 2</p>", (
            "purging the data re-rendered the page that read it, with fresh data"
        )
    assert os.path.exists(tmp_path / "data-calls")
