"""The ``pyisr`` command: build errors and summary, config errors, dev, several workers."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
from e2e_support import Server, run_cli

pytestmark = pytest.mark.slow


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


STAMP_PAGE = """
import time
revalidate = 60
tags = ["stamp"]

def generate_static_params():
    return [{"id": str(i)} for i in range(1, 6)]

def page(params):
    return f"<p>{params['id']} at={time.time():.6f}</p>"
"""


def test_build_prints_a_summary_table(tmp_path: Path) -> None:
    site = write(
        tmp_path / "site",
        {"app/p/[id]/page.py": STAMP_PAGE, "app/page.py": "def page(p):\n    return 'home'\n"},
    )
    result = run_cli(["build", str(site)], {})
    assert result.returncode == 0, result.stderr
    assert "/p/[id]" in result.stdout and "ISR 60s" in result.stdout and "static" in result.stdout
    assert "Built 6 pages" in result.stderr
    build_id = (site / ".pyisr" / "BUILD_ID").read_text()
    assert (site / ".pyisr" / "cache" / build_id / "entries" / "p" / "3.html").is_file()


def test_a_page_that_raises_fails_the_build(tmp_path: Path) -> None:
    site = write(
        tmp_path / "site",
        {
            "app/p/[id]/page.py": """
        def generate_static_params():
            return [{"id": "1"}, {"id": "2"}]

        def page(params):
            if params["id"] == "2":
                raise RuntimeError("database unreachable")
            return "ok"
    """
        },
    )
    result = run_cli(["build", str(site)], {})
    assert result.returncode == 1
    assert "/p/2" in result.stderr and "RuntimeError: database unreachable" in result.stderr
    assert not (site / ".pyisr" / "manifest.json").exists()


def test_a_failed_rebuild_keeps_the_previous_build_whole(tmp_path: Path) -> None:
    """The new pages replace the old cache only once the whole build succeeded."""
    page = """
        import os
        revalidate = 60

        def generate_static_params():
            return [{"id": "1"}, {"id": "2"}]

        def page(params):
            if os.environ.get("BREAK") and params["id"] == "2":
                raise RuntimeError("database unreachable")
            return f"<p>{params['id']} build={os.environ.get('BUILD_NO')}</p>"
    """
    site = write(tmp_path / "site", {"app/p/[id]/page.py": page})
    assert run_cli(["build", str(site)], {"BUILD_NO": "1"}).returncode == 0
    dot = site / ".pyisr"
    first_id = (dot / "BUILD_ID").read_text()
    # A build killed midway leaves its private directory behind; the next build removes it.
    (dot / "cache" / ".staging-deadbeef" / "entries").mkdir(parents=True)

    failed = run_cli(["build", str(site)], {"BUILD_NO": "2", "BREAK": "1"})
    assert failed.returncode == 1
    assert (dot / "BUILD_ID").read_text() == first_id
    for n in ("1", "2"):
        assert "build=1" in (dot / "cache" / first_id / "entries" / "p" / f"{n}.html").read_text()

    assert run_cli(["build", str(site)], {"BUILD_NO": "3"}).returncode == 0
    third_id = (dot / "BUILD_ID").read_text()
    assert third_id != first_id
    assert "build=3" in (dot / "cache" / third_id / "entries" / "p" / "2.html").read_text()
    assert sorted(p.name for p in dot.iterdir()) == [
        "BUILD_ID",
        "PREVIOUS_BUILD_ID",
        "build.lock",
        "builds",
        "cache",
        "manifest.json",
    ]
    assert sorted(p.name for p in (dot / "cache").iterdir()) == sorted([first_id, third_id])

    # A second build while one runs would remove its staging directory: it is refused.
    import fcntl
    import os

    fd = os.open(dot / "build.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running build holds it
        busy = run_cli(["build", str(site)], {"BUILD_NO": "4"})
    finally:
        os.close(fd)
    assert busy.returncode == 1 and "another `pyisr build` of this site is running" in busy.stderr
    assert "build=3" in (dot / "cache" / third_id / "entries" / "p" / "2.html").read_text()


def test_S25_invalid_revalidate_fails_the_build(tmp_path: Path) -> None:
    site = write(
        tmp_path / "site",
        {
            "pages/b/[id].py": """
        def get_static_paths():
            return {"paths": ["/b/1"], "fallback": False}

        def get_static_props(params):
            return {"props": {}, "revalidate": 1.5}

        def page(props):
            return "x"
    """
        },
    )
    result = run_cli(["build", str(site)], {})
    assert result.returncode == 1 and "/b/1" in result.stderr and "1.5" in result.stderr


def test_a_site_mistake_fails_the_build_with_file_and_line(tmp_path: Path) -> None:
    site = write(tmp_path / "site", {"app/page.py": "revalidat = 60\ndef page(p):\n    return 'x'\n"})
    result = run_cli(["build", str(site)], {})
    assert result.returncode == 1
    assert "app/page.py:1" in result.stderr.replace("\n", "") and "revalidate" in result.stderr


def test_bad_config_names_the_file_key_and_fix(tmp_path: Path) -> None:
    site = write(
        tmp_path / "site",
        {"app/page.py": "def page(p):\n    return 'x'\n", "pyisr.toml": "render_timeout = -3\n"},
    )
    result = run_cli(["build", str(site)], {})
    assert result.returncode == 2
    err = result.stderr
    assert "pyisr.toml" in err and "render_timeout" in err and "for example" in err
    (site / "pyisr.toml").write_text("render_timeout = 3\n")
    env_result = run_cli(["build", str(site)], {"PYISR_RENDER_CONCURRENCY": "many"})
    assert env_result.returncode == 2 and "PYISR_RENDER_CONCURRENCY" in env_result.stderr


def test_start_flags_override_the_file_and_the_environment(tmp_path: Path) -> None:
    site = write(
        tmp_path / "site",
        {"app/p/[id]/page.py": STAMP_PAGE, "pyisr.toml": "trailing_slash = false\ndebug_cache = false\n"},
    )
    assert run_cli(["build", str(site)], {}).returncode == 0
    env = {"PYISR_TRAILING_SLASH": "false"}
    flags = ("--trailing-slash", "--debug-cache", "--render-timeout", "5")
    server = Server(site, env, extra_args=flags).start()
    try:
        redirect = server.get("/p/1")
        assert redirect.status_code == 308 and redirect.headers["location"] == "/p/1/"
        assert server.get("/p/1/").status_code == 200
        assert "/p/1 HIT" in server.log()
    finally:
        server.stop()
    bad = run_cli(["start", str(site), "--render-concurrency", "0"], {})
    assert bad.returncode == 2 and "option --render-concurrency" in bad.stderr


def test_dev_never_caches_and_reloads_on_change(tmp_path: Path) -> None:
    site = write(
        tmp_path / "site", {"app/page.py": "revalidate = 60\ndef page(p):\n    return 'version one'\n"}
    )
    server = Server(site, {}, command="dev").start()
    try:
        first = server.get("/")
        assert first.text == "version one"
        assert first.headers["cache-control"] == "no-store, must-revalidate"
        assert "x-pyisr-cache" not in first.headers
        (site / "app" / "page.py").write_text("revalidate = 60\ndef page(p):\n    return 'version two'\n")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if server.get("/").text == "version two":
                    break
            except Exception:  # noqa: BLE001 - the server is restarting
                pass
            time.sleep(0.2)
        assert server.get("/").text == "version two"
    finally:
        server.stop()


def test_every_worker_sees_an_invalidation_within_a_second(tmp_path: Path) -> None:
    site = write(tmp_path / "site", {"app/p/[id]/page.py": STAMP_PAGE})
    assert run_cli(["build", str(site)], {}).returncode == 0
    server = Server(site, {"PYISR_REVALIDATE_SECRET": "s"}, workers=2).start()
    try:
        before = {server.get("/p/1").text for _ in range(40)}
        assert len(before) == 1  # both workers serve the build's page
        response = server.request(
            "POST", "/_pyisr/revalidate?tag=stamp", headers={"authorization": "Bearer s"}
        )
        assert response.status_code == 200
        marked = time.monotonic()
        time.sleep(1.0)
        after = [server.get("/p/1") for _ in range(40)]
        assert all(r.text not in before for r in after), "a worker still served the old page after 1 s"
        assert time.monotonic() - marked < 10
    finally:
        server.stop()


def test_middleware_runs_before_pages_but_not_for_on_demand_regeneration(tmp_path: Path) -> None:
    site = write(
        tmp_path / "site",
        {
            "app/plain/page.py": "import time\ndef page(p):\n    return f'plain {time.time()}'\n",
            "app/page.py": "def page(p):\n    return 'home'\n",
            "middleware.py": """
                from starlette.responses import PlainTextResponse

                def middleware(request):
                    if request.url.path == "/old-home":
                        return "/plain"  # a rewrite: serve /plain's page at this URL
                    if request.url.path.startswith("/private"):
                        return PlainTextResponse("members only", status_code=403)
                    if request.url.path == "/plain":
                        return PlainTextResponse("not here", status_code=404)
                    return None
            """,
        },
    )
    assert run_cli(["build", str(site)], {}).returncode == 0
    server = Server(site, {"PYISR_REVALIDATE_SECRET": "s"}).start()
    try:
        rewritten = server.get("/old-home")
        assert rewritten.status_code == 200 and rewritten.text.startswith("plain")
        assert rewritten.headers["x-pyisr-cache"] == "HIT"
        blocked = server.get("/private/x")
        assert blocked.status_code == 403 and blocked.text == "members only"
        assert server.get("/plain").status_code == 404
        assert server.get("/").text == "home"
        # On-demand regeneration of the rewritten-to path does not go through middleware.
        revalidated = server.request(
            "POST", "/_pyisr/revalidate?path=/plain", headers={"authorization": "Bearer s"}
        )
        assert revalidated.status_code == 200
        assert server.get("/old-home").text != rewritten.text
    finally:
        server.stop()
