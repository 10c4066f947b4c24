"""An app's deploys (``build_id``): its own cache, its key at the edge, the purges of the
builds it replaces, and old cache directories removed once nobody serves them.

The deploy flow runs real Flask processes (the ``atexit`` purge needs a process that
ends) against a local recording webhook; the records run against the file system and
a real Redis.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cdn_support import PurgeServer, check_webhook
from redis_support import redis_py, redis_url, unique_prefix  # noqa: F401

import pyisr
from pyisr.app_builds import FileRecord, RedisRecord, scope_cache
from pyisr.cache.memory import MemoryCache
from pyisr.runtime import get_engine, run_sync, set_engine

TOKEN = "app-builds-token-0123456789"


@pytest.fixture
def webhook() -> Iterator[PurgeServer]:
    with PurgeServer(check_webhook(TOKEN)) as server:
        yield server


@pytest.fixture
def restore_engine() -> Iterator[None]:
    before = get_engine()
    yield
    set_engine(before)


# -- where a build's pages live ---------------------------------------------------------------


def test_a_build_id_scopes_the_cache_it_names(tmp_path: Path) -> None:
    assert scope_cache(str(tmp_path / "c"), "v1", ".") == str(tmp_path / "c" / "v1")
    assert scope_cache(None, "v1", tmp_path) == str(tmp_path / ".pyisr" / "cache" / "v1")
    assert scope_cache("file:///srv/c?max_bytes=1GB", "v1", ".") == "file:///srv/c/v1?max_bytes=1GB"
    assert scope_cache("redis://127.0.0.1:6379/0?prefix=blog", "v1", ".").endswith("prefix=blog&build_id=v1")
    assert scope_cache("memory://", "v1", ".") == "memory://"
    with pytest.raises(ValueError, match="name the build in one place"):
        scope_cache("redis://127.0.0.1:6379/0?build_id=x", "v1", ".")


@pytest.mark.usefixtures("restore_engine")
def test_configure_checks_the_build_id_and_where_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for bad in ("../x", "a/b", "dev", "", "x" * 65):
        with pytest.raises(ValueError, match=r"configure\(build_id=...\) must be"):
            pyisr.configure(str(tmp_path), build_id=bad)
    with pytest.raises(ValueError, match="scope your own handler"):
        pyisr.configure(MemoryCache(), build_id="v1")
    with pytest.raises(ValueError, match="a site has builds of its own"):
        pyisr.configure(site=tmp_path, build_id="v1")
    monkeypatch.setenv("PYISR_BUILD_ID", "not/valid")
    with pytest.raises(ValueError, match="PYISR_BUILD_ID must be"):
        pyisr.configure(str(tmp_path))
    monkeypatch.setenv("PYISR_BUILD_ID", "abc123")
    engine = pyisr.configure(str(tmp_path / "cache"), memory_tier_bytes=0)
    assert engine.edge_build == "abc123" and engine.app_build is not None
    pyisr.revalidate_tag("posts")  # the store is written where the build's pages live
    assert (tmp_path / "cache" / "abc123").is_dir()
    monkeypatch.delenv("PYISR_BUILD_ID")
    plain = pyisr.configure(str(tmp_path / "cache"))
    assert plain.edge_build is None and plain.app_build is None, "no build id: nothing changes"


# -- the records ------------------------------------------------------------------------------


def test_the_file_record_keeps_the_newest_last_and_ignores_what_is_no_build_id(tmp_path: Path) -> None:
    record = FileRecord(tmp_path)
    assert run_sync(record.started("a")) == ([], True)
    assert run_sync(record.started("a")) == (["a"], False), "a second process of a: nothing new"
    assert run_sync(record.started("b")) == (["a"], True)
    assert run_sync(record.started("a")) == (["a", "b"], True), "a rollback is newer again"
    assert run_sync(record.newest()) == "a"
    # Whoever can write the directory could name paths: lines that are no build id are none.
    (tmp_path / ".builds" / "record").write_text("../../etc\nb\n/tmp/x\na\n")
    assert run_sync(record.started("c")) == (["b", "a"], True)


HOLD = """
import sys
from pathlib import Path
from pyisr.app_builds import FileRecord
FileRecord(Path(sys.argv[1])).hold(sys.argv[2])
print("held", flush=True)
sys.stdin.read()
"""


def serving_process(root: Path, build: str) -> subprocess.Popen[str]:
    """A process serving ``build`` from the file cache at ``root`` until its stdin closes."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), build],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def end(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.close()
    process.wait(timeout=10)


def test_old_build_directories_go_once_no_process_serves_them(tmp_path: Path) -> None:
    for build in ("a", "b", "c", "d"):
        (tmp_path / build / "entries").mkdir(parents=True)
        run_sync(FileRecord(tmp_path).started(build))
    (tmp_path / "not-a-build").mkdir()  # the directory may hold anything else too
    processes = {build: serving_process(tmp_path, build) for build in ("a", "b", "c", "d")}
    try:
        assert FileRecord(tmp_path).remove_unused("d") == [], "every build is still served"
        end(processes.pop("a"))
        end(processes.pop("b"))
        assert FileRecord(tmp_path).remove_unused("d") == ["a", "b"]
        assert sorted(p.name for p in tmp_path.iterdir()) == [".builds", "c", "d", "not-a-build"]
        end(processes.pop("c"))
        assert FileRecord(tmp_path).remove_unused("d") == [], "the previous build is kept for a rollback"
    finally:
        for process in processes.values():
            end(process)
    assert (tmp_path / "c" / "entries").is_dir() and (tmp_path / "not-a-build").is_dir()


def test_the_redis_record_is_shared_by_the_builds_of_a_prefix(redis_url: str) -> None:  # noqa: F811
    module = redis_py()
    prefix = unique_prefix()
    caches = {b: module.RedisCache.from_url(redis_url, prefix=prefix, build_id=b) for b in ("a", "b")}

    async def scenario() -> None:
        a, b = RedisRecord(caches["a"]), RedisRecord(caches["b"])
        try:
            assert await a.started("a") == ([], True)
            assert await a.started("a") == (["a"], False)
            assert await b.started("b") == (["a"], True)
            assert await a.newest() == "b"
            other = module.RedisCache.from_url(redis_url, prefix=unique_prefix(), build_id="a")
            assert await RedisRecord(other).newest() is None, "another prefix, another app"
            await other.close()
        finally:
            async with caches["a"]._state().client as client:  # noqa: SLF001
                await client.delete(caches["a"]._builds_key)  # noqa: SLF001
            for cache in caches.values():
                await cache.close()

    run_sync(scenario())


# -- a deploy, process by process ---------------------------------------------------------------

APP = """
import sys
from flask import Flask
from pyisr.integrations.flask import isr

app = Flask(__name__)

@app.get("/")
@isr(revalidate=False)
def home():
    return "home of build " + sys.argv[1]

answer = app.test_client().get("/")
print(answer.headers.get("x-pyisr-cache"), answer.headers.get("surrogate-key"), answer.get_data(as_text=True),
      sep="|", flush=True)
sys.stdin.read()
"""


class AppProcess:
    """A Flask app of one build, alive until :meth:`stop`; its first answer is read."""

    def __init__(self, build: str, cache: Path, cdn: str) -> None:
        import os

        env = {
            **os.environ,
            "PYISR_BUILD_ID": build,
            "PYISR_CACHE": str(cache),
            "PYISR_CDN": cdn,
            "PYISR_CDN_WEBHOOK_TOKEN": TOKEN,
            "PYISR_REWARM_RATE": "0",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-c", APP, build],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        assert line, self.process.stderr.read() if self.process.stderr else ""
        self.status, keys, self.body = line.split("|")
        self.keys = keys.split(" ")

    def stop(self) -> str:
        assert self.process.stdin is not None and self.process.stderr is not None
        self.process.stdin.close()
        self.process.wait(timeout=20)
        return self.process.stderr.read()


def quiet(webhook: PurgeServer, count: int) -> None:
    """Nothing more arrives (longer than the purge queue's window)."""
    time.sleep(1.0)
    assert len(webhook.requests) == count, [r.keys for r in webhook.requests]


def test_a_deploy_serves_its_own_pages_and_purges_the_build_it_replaces(
    tmp_path: Path, webhook: PurgeServer
) -> None:
    cache, cdn = tmp_path / "cache", f"{webhook.url}/purge"
    a = AppProcess("a1", cache, cdn)
    assert (a.status, a.body) == ("MISS", "home of build a1") and "_b/a1" in a.keys
    quiet(webhook, 0)  # the first build replaces nothing
    b = AppProcess("b2", cache, cdn)
    assert (b.status, b.body) == ("MISS", "home of build b2"), "never a1's page, cached forever"
    assert "_b/b2" in b.keys and "_b/a1" not in b.keys
    [started] = webhook.wait_for(1)
    assert started.problems == [] and started.keys == ["_b/a1"], "b2's first request purges a1"
    again = AppProcess("b2", cache, cdn)  # another worker of b2
    assert again.status == "HIT" and again.body == "home of build b2"
    again.stop()
    quiet(webhook, 1)  # b2 was the newest already: no purge of its own
    a.stop()  # a rolling deploy's last old instance: it gave the edge pages meanwhile
    [_, stopped] = webhook.wait_for(2)
    assert stopped.keys == ["_b/a1"], "a1, superseded, purges itself on its way out"
    b.stop()
    quiet(webhook, 2)  # b2 is still the newest: it purges nothing
    rollback = AppProcess("a1", cache, cdn)
    assert (rollback.status, rollback.body) == ("HIT", "home of build a1"), "a1's pages were kept"
    [*_, purged] = webhook.wait_for(3)
    assert purged.keys == ["_b/b2"], "a rollback purges the build rolled back from"
    rollback.stop()


@pytest.mark.usefixtures("restore_engine")
def test_a_forked_worker_begins_serving_on_its_own(tmp_path: Path) -> None:
    """gunicorn ``--preload`` forks workers from a process that may have served: each
    worker records and holds its build itself (after its own first request)."""
    import os

    from pyisr.app_builds import begin_serving

    engine = pyisr.configure(str(tmp_path / "cache"), build_id="v1", rewarm_rate=0)
    assert engine.app_build is not None
    begin_serving(engine)
    assert engine.app_build._begun  # noqa: SLF001
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's answer is its exit code
        os._exit(1 if engine.app_build._begun else 0)  # noqa: SLF001
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child has not begun: its first request does it"
    assert engine.app_build._begun, "the parent still has"  # noqa: SLF001
