"""Structured logs (pyisr/log.py): ``log_format = "json"`` makes each cache line one JSON object.

A built site served in-process (httpx's ASGI transport, conftest's fake clock): a MISS and
its render, a regeneration that fails, an invalidation and a store failure each give one
line that parses, with the fields an operator ships (event, key, route, duration_ms,
build_id, reason, time). Per-request decisions stay out of them unless
``PYISR_DEBUG_CACHE`` is on; text stays the default.
"""

from __future__ import annotations

import io
import json
import logging
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FakeClock
from e2e_support import run_cli

from pyisr import log as pyisr_log
from pyisr.cache.memory import MemoryCache
from pyisr.config import Config, ConfigError, load_config
from pyisr.engine import Engine
from pyisr.log import JSON_EVENTS, CacheLog, configure_log_format
from pyisr.server.app import App

PAGE = """
revalidate = 60

def generate_static_params():
    return []

def page(params):
    return f"<p>post {params['id']}</p>"
"""
FAILING = """
revalidate = 1
RENDERS = []

def page(params):
    RENDERS.append(1)
    if len(RENDERS) > 1:
        raise RuntimeError("the database is gone")
    return "<p>once</p>"
"""
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Lines:
    """What pyisr's log handler wrote, one parsed object per line."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def all(self) -> list[dict[str, Any]]:
        text = self.stream.getvalue()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.all() if line["event"] == event]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put pyisr's loggers and log settings back as they were (they are process-wide)."""
    saved = dict(pyisr_log._settings)
    loggers = [pyisr_log.logger, pyisr_log.fetch_logger]
    state = [(log, list(log.handlers), log.level, log.propagate) for log in loggers]
    for log in loggers:
        for handler in [h for h in log.handlers if getattr(h, "_pyisr", False)]:
            log.removeHandler(handler)
    yield
    pyisr_log._settings.clear()
    pyisr_log._settings.update(saved)
    for log, handlers, level, propagate in state:
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate


def capture() -> Lines:
    """Point pyisr's own handler (installed by JSON mode) at a buffer."""
    stream = io.StringIO()
    handlers = [h for h in pyisr_log.logger.handlers if getattr(h, "_pyisr", False)]
    assert handlers, "JSON mode installs pyisr's handler"
    for handler in handlers:
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
    return Lines(stream)


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("json-logs") / "site"
    for route, source in (("blog/[id]", PAGE), ("fail", FAILING)):
        (site / "app" / route).mkdir(parents=True)
        (site / "app" / route / "page.py").write_text(textwrap.dedent(source))
    done = run_cli(["build", str(site)], {"PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return site


@pytest.fixture
def make_app(built_site: Path, restore_logging: None) -> Callable[..., App]:
    def make(debug: bool = False, **settings: Any) -> App:
        config = Config(**settings)
        # A store of its own: the build's pages are left alone, each test starts empty.
        engine = Engine(MemoryCache(), clock=FakeClock(), debug=debug)
        app = App(built_site, config=config, engine=engine)
        found = app.site.match("/fail")
        assert found is not None
        found[0].module.RENDERS.clear()  # (its module may be shared with another test's app)
        return app

    return make


def _build_id(site: Path) -> str:
    return (site / ".pyisr" / "BUILD_ID").read_text().strip()


def client_of(app: App) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def test_a_miss_a_failure_an_invalidation_and_a_store_failure(
    make_app: Callable[..., App], built_site: Path
) -> None:
    app = make_app(log_format="json")
    clock: FakeClock = app.engine.clock  # type: ignore[assignment]
    async with client_of(app) as client:
        await client.get("/blog/1")  # starts the app: JSON from here on
        lines = capture()
        assert (await client.get("/blog/2")).headers["x-pyisr-cache"] == "MISS"
        for _ in range(5):
            assert (await client.get("/blog/2")).headers["x-pyisr-cache"] == "HIT"
        assert (await client.get("/fail")).headers["x-pyisr-cache"] == "MISS"
        clock.advance(2)
        assert (await client.get("/fail")).headers["x-pyisr-cache"] == "STALE"
        await app.engine.drain()  # its regeneration failed
        await app.engine.revalidate_tag("posts")
        failure = OSError(28, "No space left on device")
        app.engine.store_failures.record(failure, "/blog/3", "storing a render")
    await app.shutdown()

    build_id = _build_id(built_site)
    every = lines.all()
    for line in every:
        assert ISO_UTC.match(line["time"]), line
        assert line["build_id"] == build_id, line
        assert line["logger"] == "pyisr.cache"

    (miss,) = [line for line in lines.events("MISS") if line["key"] == "/blog/2"]
    assert miss["route"] == "/blog/[id]" and miss["level"] == "info"
    assert isinstance(miss["duration_ms"], float) and miss["duration_ms"] >= 0
    assert "rendered in" in miss["details"]

    (failed,) = lines.events("FAILED")
    assert failed["key"] == "/fail" and failed["route"] == "/fail" and failed["level"] == "error"
    assert failed["reason"] == "RuntimeError: the database is gone"
    assert isinstance(failed["duration_ms"], float)

    (invalidate,) = lines.events("INVALIDATE")
    assert invalidate["key"] == "posts" and invalidate["kind"] == "tag" and invalidate["by"]

    (store,) = lines.events("STORE_FAILED")
    assert store["key"] == "/blog/3" and store["reason"] == "OSError[ENOSPC]"
    assert store["details"] == "storing a render" and "No space left" in store["message"]

    # Per-request decisions are for debugging: none of the HITs or the STALE is a line.
    assert not lines.events("HIT") and not lines.events("STALE")
    assert {line["event"] for line in every} <= JSON_EVENTS


async def test_debug_adds_the_per_request_decisions(make_app: Callable[..., App]) -> None:
    app = make_app(log_format="json", debug=True)  # what PYISR_DEBUG_CACHE=1 gives an engine
    async with client_of(app) as client:
        await client.get("/blog/1")
        lines = capture()
        await client.get("/blog/4")
        for _ in range(3):
            await client.get("/blog/4")  # the fast path logs its HITs only in debug
    await app.shutdown()
    hits = lines.events("HIT")
    assert len(hits) == 3 and all(hit["key"] == "/blog/4" for hit in hits)
    assert {hit["level"] for hit in hits} == {"debug"}


async def test_text_stays_the_default(make_app: Callable[..., App], caplog: pytest.LogCaptureFixture) -> None:
    app = make_app()
    assert app.config.log_format == "text"
    caplog.set_level(logging.DEBUG, logger="pyisr.cache")
    async with client_of(app) as client:
        await client.get("/fail")
        app.engine.clock.advance(2)  # type: ignore[attr-defined]
        await client.get("/fail")
        await app.engine.drain()
    await app.shutdown()
    assert not any(getattr(h, "_pyisr", False) for h in pyisr_log.logger.handlers)
    messages = [r.getMessage() for r in caplog.records if r.name == "pyisr.cache"]
    # Only the failure, as a line for people: no render or decision without debug.
    assert messages == [
        m for m in messages if m.startswith("/fail FAILED regenerate after") and "RuntimeError" in m
    ]
    assert len(messages) == 1


def test_the_environment_turns_it_on(monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    monkeypatch.setenv("PYISR_LOG_FORMAT", "json")
    log = CacheLog(False)
    lines = capture()
    log.decision("/a", "REGENERATE", "rendered in 3.0ms", route="/[slug]", duration_ms=3.0)
    log.decision("/a", "HIT", "age=1s")  # not without debug
    log.failure("/b", "FAILED", ValueError("bad"), "miss after 2ms", route="/[slug]")
    logging.getLogger("pyisr.cache").warning("a line with no fields")
    regenerate, failed, plain = lines.all()
    assert regenerate["event"] == "REGENERATE" and regenerate["route"] == "/[slug]"
    assert regenerate["duration_ms"] == 3.0 and "reason" not in regenerate  # empty fields left out
    assert failed["reason"] == "ValueError: bad" and failed["details"] == "miss after 2ms"
    assert plain == {**plain, "event": "LOG", "message": "a line with no fields", "level": "warning"}
    assert load_config(None).log_format == "json"


def test_a_bad_format_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"PYISR_LOG_FORMAT: invalid value 'yaml'.*log_format = \"json\""):
        load_config(None, environ={"PYISR_LOG_FORMAT": "yaml"})
    (tmp_path / "pyisr.toml").write_text('log_format = "JSON"\n')
    assert load_config(tmp_path).log_format == "json"


def test_switching_back_to_text(restore_logging: None) -> None:
    engine = Engine(MemoryCache(), clock=FakeClock())
    configure_log_format("json", build_id="b1", cache_log=engine.log)
    lines = capture()
    engine.log.decision("t", "INVALIDATE", "tag revalidated by test", kind="tag")
    assert lines.all()[0]["build_id"] == "b1"
    configure_log_format("text")
    handler = next(h for h in pyisr_log.logger.handlers if getattr(h, "_pyisr", False))
    assert not isinstance(handler.formatter, pyisr_log.JsonFormatter)
