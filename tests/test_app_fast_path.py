"""The server's fast path answers exactly what the full path would, and only when it may.

In-process (httpx's ASGI transport, 1 s windows on the fake clock of conftest.py, which
the fast path reads through the engine): which answers skip the engine is observed by
counting ``Engine.get`` calls.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FakeClock

from pyisr.config import Config
from pyisr.engine import Engine
from pyisr.server.app import App
from pyisr.site_store import open_site_cache

PAGE = """
import asyncio

revalidate = 1
RENDERS = []
#: Regenerations wait for this: cleared, a regeneration stays under way (STALE answers
#: meanwhile) until the test sets it.
RELEASE = asyncio.Event()
RELEASE.set()

async def page(params):
    RENDERS.append(1)
    if len(RENDERS) > 1:
        await RELEASE.wait()
    return f"<p>render {len(RENDERS)}</p>"
"""


@pytest.fixture
async def app_and_client(
    tmp_path: Path, clock: FakeClock
) -> AsyncIterator[tuple[App, httpx.AsyncClient, list[str]]]:
    site = tmp_path / "site"
    (site / "app" / "p").mkdir(parents=True)
    (site / "app" / "p" / "page.py").write_text(textwrap.dedent(PAGE))
    config = Config()
    app = App(site, config=config, engine=Engine(open_site_cache(site, config), clock=clock))
    engine_calls: list[str] = []
    real_get = app.engine.get

    async def counting_get(key: str, *args: Any, **kwargs: Any) -> Any:
        engine_calls.append(key)
        return await real_get(key, *args, **kwargs)

    app.engine.get = counting_get  # type: ignore[method-assign]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield app, client, engine_calls
    await app.engine.close()


def without_age(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k != "age"}


def release(app: App) -> asyncio.Event:
    """The page's ``RELEASE`` event (see PAGE)."""
    found = app.site.match("/p")
    assert found is not None
    event: asyncio.Event = found[0].module.RELEASE
    return event


async def test_stale_answers_during_a_regeneration_skip_the_engine(
    app_and_client: tuple[App, httpx.AsyncClient, list[str]], clock: FakeClock
) -> None:
    app, client, engine_calls = app_and_client
    first = await client.get("/p")
    assert first.headers["x-pyisr-cache"] == "MISS" and first.text == "<p>render 1</p>"
    await client.get("/p")  # (the tag state is known from the first tag read on)
    calls = len(engine_calls)
    hit = await client.get("/p")
    assert hit.headers["x-pyisr-cache"] == "HIT"
    assert len(engine_calls) == calls  # the HIT came from the fast path

    release(app).clear()  # a slow regeneration: STALE answers meanwhile
    clock.advance(1.05)
    stale = await client.get("/p")  # full path: the engine says STALE and starts the render
    assert stale.headers["x-pyisr-cache"] == "STALE" and stale.text == "<p>render 1</p>"
    calls += 1
    assert len(engine_calls) == calls
    assert app.engine.regenerating("/p")

    during = await asyncio.gather(*(client.get("/p") for _ in range(20)))
    assert len(engine_calls) == calls  # all answered by the fast path
    for response in during:
        assert response.status_code == 200 and response.text == "<p>render 1</p>"
        assert without_age(response) == without_age(stale)  # the same answer, headers included

    conditional = await client.get("/p", headers={"if-none-match": stale.headers["etag"]})
    assert conditional.status_code == 304 and conditional.headers["x-pyisr-cache"] == "STALE"
    assert len(engine_calls) == calls
    assert app.engine.regenerating("/p")  # still under way: the answers above were all STALE

    release(app).set()
    await app.engine.drain()
    fresh = await client.get("/p")  # full path once more: the new entry, then HITs
    assert fresh.headers["x-pyisr-cache"] == "HIT" and fresh.text == "<p>render 2</p>"
    again = await client.get("/p")
    assert without_age(again) == without_age(fresh)
    assert len(engine_calls) == calls + 1


async def test_a_stale_page_with_no_regeneration_running_goes_to_the_engine(
    app_and_client: tuple[App, httpx.AsyncClient, list[str]], clock: FakeClock
) -> None:
    app, client, engine_calls = app_and_client
    await client.get("/p")
    await client.get("/p")
    clock.advance(1.05)
    await client.get("/p")
    await app.engine.drain()
    # Stale again and nothing regenerating: the fast path must not answer from memory.
    clock.advance(1.05)
    assert not app.engine.regenerating("/p")
    calls = len(engine_calls)
    response = await client.get("/p")
    assert response.headers["x-pyisr-cache"] == "STALE"
    assert len(engine_calls) == calls + 1
    await app.engine.drain()


async def test_a_tag_revalidation_turns_the_fast_path_off_for_that_page(
    app_and_client: tuple[App, httpx.AsyncClient, list[str]], clock: FakeClock
) -> None:
    app, client, engine_calls = app_and_client
    await client.get("/p")
    await client.get("/p")
    calls = len(engine_calls)
    started = clock.now
    await app.engine.revalidate_path("/p")
    response = await client.get("/p")
    assert len(engine_calls) == calls + 1
    assert response.headers["x-pyisr-cache"] == "MISS"  # SPEC S-45: blocking, fresh
    assert response.text == "<p>render 2</p>"
    assert clock.now == started  # not merely the window running out: the clock never moved


async def test_the_fast_path_index_stays_within_its_own_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It holds pages the memory tier may have evicted, so it has its own bound."""
    import pyisr.server.fast_path as fast_path_module

    site = tmp_path / "site"
    (site / "app" / "m" / "[id]").mkdir(parents=True)
    (site / "app" / "m" / "[id]" / "page.py").write_text(
        "revalidate = 60\n\ndef page(params):\n    return 'x' * 2000 + params['id']\n"
    )
    budget = 5 * (2001 + 1024)
    monkeypatch.setattr(fast_path_module, "HOT_BYTES", budget)
    # Bodies alone (stored encodings count too: tests/test_compression.py).
    app = App(site, config=Config(compress=False))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for _ in range(2):
            for n in range(30):
                response = await client.get(f"/m/{n}")
                assert response.status_code == 200 and response.text.endswith(str(n))
                assert app.fast.bytes <= budget and len(app.fast.by_raw_path) <= 5
        # The same page remembered again is counted once.
        for _ in range(5):
            await client.get("/m/29")
        assert app.fast.bytes == len(app.fast.by_raw_path) * (2002 + 1024)
    await app.engine.close()
