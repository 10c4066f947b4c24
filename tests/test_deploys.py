"""Deploys never mix: each build has its own cache namespace and manifest.

A server serves the build that was current when it started, whatever is built while it
runs; a fresh server serves only the new build; old builds are removed once nobody
serves them, the previous one kept for rollback. Real ``pyisr start`` processes on
127.0.0.1 where a server matters.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from e2e_support import PYISR, Server, run_cli, running
from redis_support import redis_url  # noqa: F401 - a fixture

from pyisr.config import load_config
from pyisr.deploys import BuildLease, BuildRemoved, remove_unused_builds
from pyisr.site_store import UNBUILT, is_valid_build_id, local_cache_root, site_cache_url

pytestmark = pytest.mark.slow

SECRET = "deploys-secret"
#: Fresh bytecode for each edit: two versions of a page written within one second would
#: otherwise share a stale .pyc (the source's mtime and size are all Python checks).
ENV = {"PYISR_REVALIDATE_SECRET": SECRET, "PYTHONDONTWRITEBYTECODE": "1"}

PAGE = """
import os
import time
from pathlib import Path

from pyisr import render_template

CODE = {code!r}
revalidate = 1


def generate_static_params():
    return [{{"id": "1"}}, {{"id": "2"}}]


def page(params):
    started = os.environ.get("RENDER_STARTED")
    if started:
        Path(started).touch()
        time.sleep(float(os.environ.get("RENDER_SLEEP", "0")))
    return render_template("post.html", id=params["id"], code=CODE, at=f"{{time.time():.6f}}")
"""

TEMPLATE = "<p>code={{{{ code }}}} tpl={tpl} id={{{{ id }}}} at={{{{ at }}}}</p>\n"


def release(site: Path, version: str) -> None:
    """Put version ``version`` of the site's code and template on disk (a deploy's checkout)."""
    page = site / "app" / "p" / "[id]" / "page.py"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(textwrap.dedent(PAGE.format(code=f"code-{version}")))
    (site / "templates").mkdir(exist_ok=True)
    (site / "templates" / "post.html").write_text(TEMPLATE.format(tpl=f"tpl-{version}"))


def build(site: Path, env: dict[str, str] | None = None) -> str:
    result = run_cli(["build", str(site)], {**ENV, **(env or {})})
    assert result.returncode == 0, result.stderr
    return (site / ".pyisr" / "BUILD_ID").read_text().strip()


def version_of(response: httpx.Response) -> tuple[str, str]:
    match = re.search(r"code=(\S+) tpl=(\S+)", response.text)
    assert match, response.text[:300]
    return match.group(1), match.group(2)


def stamp(response: httpx.Response) -> str:
    match = re.search(r"at=(\S+)</p>", response.text)
    assert match, response.text[:300]
    return match.group(1)


def wait_for(condition: Callable[[], object], timeout: float = 6.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def health(server: Server) -> dict[str, object]:
    answer = server.get("/_pyisr/health", headers={"authorization": f"Bearer {SECRET}"})
    body: dict[str, object] = answer.json()
    return body


def dirs(path: Path) -> set[str]:
    """The namespaces (or build records) in ``path``: its directories but hidden ones."""
    if not path.is_dir():
        return set()
    return {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    release(root, "A")
    return root


def test_a_running_server_keeps_its_build_and_old_builds_go_once_unused(site: Path) -> None:
    dot = site / ".pyisr"
    build_a = build(site)
    with running(site, ENV) as server_a:
        first = server_a.get("/p/1")
        # HIT, or STALE when the machine took over its 1 s to start the server.
        assert first.headers["x-pyisr-cache"] in ("HIT", "STALE") and version_of(first) == ("code-A", "tpl-A")

        release(site, "B")  # new code and a new template on disk...
        build_b = build(site)  # ...and their build, while build A is served
        b_page = dot / "cache" / build_b / "entries" / "p" / "1.html"
        b_bytes = b_page.read_bytes()
        assert "code=code-B tpl=tpl-B" in b_bytes.decode()

        # A's pages (HIT, or STALE past their 1 s); a page never rendered before is rendered
        # by A's code and templates.
        again = server_a.get("/p/1")
        assert again.headers["x-pyisr-cache"] in ("HIT", "STALE") and version_of(again) == ("code-A", "tpl-A")
        new_page = server_a.get("/p/7")
        assert new_page.status_code == 200 and version_of(new_page) == ("code-A", "tpl-A")
        # Regenerations go on with A's code, into A's namespace.
        wait_for(lambda: stamp(server_a.get("/p/1")) != stamp(first))
        regenerated = server_a.get("/p/1")
        assert regenerated.headers["x-pyisr-cache"] in ("HIT", "STALE")
        assert version_of(regenerated) == ("code-A", "tpl-A")
        assert "code=code-A" in (dot / "cache" / build_a / "entries" / "p" / "1.html").read_text()
        assert b_page.read_bytes() == b_bytes  # B's entries untouched
        assert not (dot / "cache" / build_b / "entries" / "p" / "7.html").exists()

        # It says, once, that B exists and how to switch; its health shows both ids.
        wait_for(lambda: f"build {build_b} is now the current build" in server_a.log())
        assert server_a.proc is not None and f"kill -HUP {server_a.proc.pid}" in server_a.log()
        assert server_a.log().count("is now the current build") == 1
        assert health(server_a)["build_id"] == build_a and health(server_a)["newest_build_id"] == build_b

        # A server started now serves B only: never one of A's pages as a HIT.
        with running(site, ENV) as server_b:
            page = server_b.get("/p/1")  # B's prerendered page (STALE once past its 1 s)
            assert page.headers["x-pyisr-cache"] in ("HIT", "STALE")
            assert version_of(page) == ("code-B", "tpl-B")
            fresh = server_b.get("/p/7")
            assert fresh.headers["x-pyisr-cache"] != "HIT" and version_of(fresh) == ("code-B", "tpl-B")
            assert health(server_b)["build_id"] == build_b

            # The cache commands address the current build: B's keys; a purge reaches B only.
            listing = run_cli(["cache", "list", "--json", "--site", str(site)], ENV).stdout
            listed = [row["key"] for row in json.loads(listing)]
            assert "/p/1" in listed and "/p/7" in listed  # B's /p/7, rendered just now
            inspected = json.loads(
                run_cli(["cache", "inspect", "/p/1", "--json", "--site", str(site)], ENV).stdout
            )
            assert inspected["key"] == "/p/1"
            assert run_cli(["cache", "purge", "/p/1", "--site", str(site)], ENV).returncode == 0
            wait_for(lambda: server_b.get("/p/1").headers["x-pyisr-cache"] != "HIT")

            # Builds C and D: A (served by server_a) and B (served by server_b) stay.
            build_c = build(site)
            assert dirs(dot / "cache") == {build_a, build_b, build_c}
        build_d = build(site)  # server_b has stopped: B goes; A is still served
        assert dirs(dot / "cache") == {build_a, build_c, build_d}
        assert dirs(dot / "builds") == {build_a, build_c, build_d}
        assert version_of(server_a.get("/p/1")) == ("code-A", "tpl-A")
    # Nobody serves A any more: the next server's start-up removes it (C is kept: previous).
    with running(site, ENV) as server_d:
        assert version_of(server_d.get("/p/1")) == ("code-B", "tpl-B")
        wait_for(lambda: dirs(dot / "cache") == {build_c, build_d})
    assert dirs(dot / "builds") == {build_c, build_d}


def test_rollback_serves_the_previous_build_again(site: Path) -> None:
    build_a = build(site)
    body_a = (site / ".pyisr" / "cache" / build_a / "entries" / "p" / "1.html").read_text()
    release(site, "B")
    build_b = build(site)
    release(site, "A")  # the code goes back first (a checkout), then the build
    result = run_cli(["build", str(site), "--rollback"], ENV)
    assert result.returncode == 0, result.stderr
    assert (site / ".pyisr" / "BUILD_ID").read_text() == build_a
    assert (site / ".pyisr" / "PREVIOUS_BUILD_ID").read_text() == build_b
    with running(site, ENV) as server:
        page = server.get("/p/1")  # A's own prerendered page (STALE: built over a second ago)
        assert page.headers["x-pyisr-cache"] in ("HIT", "STALE") and page.text == body_a
        assert health(server)["build_id"] == build_a
    # Twice rolls forward; with one build only there is nothing to roll back to.
    assert run_cli(["build", str(site), "--rollback"], ENV).returncode == 0
    assert (site / ".pyisr" / "BUILD_ID").read_text() == build_b
    lone = site.parent / "lone"
    release(lone, "A")
    build(lone)
    refused = run_cli(["build", str(lone), "--rollback"], ENV)
    assert refused.returncode == 1 and "no previous build" in refused.stderr


def test_a_killed_build_leaves_nothing_served(site: Path, tmp_path: Path) -> None:
    build_a = build(site)
    release(site, "B")
    started = tmp_path / "render-started"
    env = {**os.environ, **ENV, "RENDER_STARTED": str(started), "RENDER_SLEEP": "30"}
    proc = subprocess.Popen(
        [*PYISR, "build", str(site)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(started.exists, timeout=15)
    finally:
        proc.kill()
        proc.wait()
    dot = site / ".pyisr"
    assert (dot / "BUILD_ID").read_text() == build_a
    assert dirs(dot / "builds") == {build_a} and dirs(dot / "cache") == {build_a}
    assert [p.name for p in (dot / "cache").iterdir() if p.name.startswith(".staging-")]
    with running(site, ENV) as server:
        assert health(server)["build_id"] == build_a
        assert version_of(server.get("/p/1")) == ("code-A", "tpl-A")
    build_b = build(site)  # removes what the killed one left
    assert sorted(p.name for p in (dot / "cache").iterdir()) == sorted([build_a, build_b])


def test_the_layout_before_namespaces_is_never_served_and_is_removed(site: Path) -> None:
    dot = site / ".pyisr"
    old_page = dot / "cache" / "entries" / "p" / "1.html"
    old_page.parent.mkdir(parents=True)
    old_page.write_text("<p>code=old tpl=old</p>")
    (dot / "cache" / "locks").mkdir()
    (dot / "cache" / "tags.log").write_text('{"t":[],"at":0,"log":"0123456789abcdef"}\n')
    (dot / "cache.old-1234" / "entries").mkdir(parents=True)
    (dot / "manifest.json").write_text(json.dumps({"build_id": "0ld", "routes": []}))
    (dot / "BUILD_ID").write_text("0ld")
    refused = run_cli(["start", str(site), "--port", "1"], ENV)
    assert refused.returncode == 1 and "No build found" in refused.stderr
    build_a = build(site)
    assert sorted(p.name for p in dot.iterdir()) == sorted(
        ["BUILD_ID", "build.lock", "builds", "cache", "manifest.json"]
    )
    assert [p.name for p in (dot / "cache").iterdir()] == [build_a]
    assert json.loads((dot / "manifest.json").read_text())["build_id"] == build_a


def test_namespaces_are_decided_in_one_place(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "pyisr.toml").write_text('cache = "file:///var/cache/site"\n')
    config = load_config(site)
    assert local_cache_root(site, config) == Path("/var/cache/site")
    assert site_cache_url(site, config, "b1") == "/var/cache/site/b1"
    assert site_cache_url(site, config, None) == f"/var/cache/site/{UNBUILT}"
    (site / "pyisr.toml").write_text('cache = "file:///var/cache/site?max_bytes=2GB"\n')
    assert site_cache_url(site, load_config(site), "b1") == "file:///var/cache/site/b1?max_bytes=2GB"
    (site / "pyisr.toml").write_text('cache = "file://shared/cache"\n')
    assert site_cache_url(site, load_config(site), "b1") == str(site.resolve() / "shared" / "cache" / "b1")
    (site / "pyisr.toml").write_text('cache = "redis://127.0.0.1:6379/0?prefix=x"\n')
    assert site_cache_url(site, load_config(site), "b1").endswith("?prefix=x&build_id=b1")
    assert local_cache_root(site, load_config(site)) is None
    (site / "pyisr.toml").write_text("")
    assert site_cache_url(site, load_config(site), None) == str(site.resolve() / ".pyisr" / "cache" / UNBUILT)
    for bad in ("", "../x", "a/b", "dev", "entries", "-x", "x" * 65):
        assert not is_valid_build_id(bad)


def test_an_explicit_local_cache_is_namespaced_and_held_builds_are_kept(site: Path, tmp_path: Path) -> None:
    shared = tmp_path / "var-cache"
    (site / "pyisr.toml").write_text(f'cache = "file://{shared}"\n')
    (shared / "another-site-build").mkdir(parents=True)  # not this site's: never touched
    (shared / "data").mkdir()  # nor is what is no old-layout cache (it has no tag log)
    ids = [build(site)]
    lease = BuildLease(site, ids[0])  # as a server of the first build holds it
    try:
        ids += [build(site), build(site), build(site)]
        assert dirs(shared) == {ids[0], ids[2], ids[3], "another-site-build", "data"}
        assert not (site / ".pyisr" / "cache").exists() or not dirs(site / ".pyisr" / "cache")
    finally:
        lease.release()
    assert remove_unused_builds(site, load_config(site)) == [ids[0]]
    assert dirs(shared) == {ids[2], ids[3], "another-site-build", "data"}
    with pytest.raises(BuildRemoved):
        BuildLease(site, ids[0])


def test_the_redis_path_is_scoped_by_build_too(site: Path, redis_url: str) -> None:  # noqa: F811
    from redis_support import unique_prefix

    env = {**ENV, "PYISR_CACHE": f"{redis_url}?prefix={unique_prefix()}"}
    build(site, env)
    assert not (site / ".pyisr" / "cache").exists() or not dirs(site / ".pyisr" / "cache")
    with running(site, env) as server_a:
        # HIT, or STALE when the machine took over the page's 1 s to start the server.
        assert server_a.get("/p/1").headers["x-pyisr-cache"] in ("HIT", "STALE")
        release(site, "B")
        build_b = build(site, env)
        with running(site, env) as server_b:
            page = server_b.get("/p/1")  # B's prerendered page, never A's
            assert page.headers["x-pyisr-cache"] in ("HIT", "STALE")
            assert version_of(page) == ("code-B", "tpl-B")
        assert version_of(server_a.get("/p/1")) == ("code-A", "tpl-A")
        assert health(server_a)["newest_build_id"] == build_b


def test_templates_are_read_once_outside_dev(tmp_path: Path) -> None:
    from pyisr.site.site import Site

    root = tmp_path / "site"
    release(root, "A")
    site, dev = Site.load(root), Site.load(root, dev=True)
    (root / "templates" / "post.html").write_text(TEMPLATE.format(tpl="tpl-B"))
    (root / "templates" / "late.html").write_text("late")
    assert "tpl-A" in site.templates.get_template("post.html").render(id=1, code="x", at=0)
    assert "tpl-B" in dev.templates.get_template("post.html").render(id=1, code="x", at=0)
    assert "late.html" not in site.templates.list_templates()
