"""Shared fixtures: a fake clock and engines over each built-in handler."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from pyisr import Engine, MemoryCache, Rendered, set_engine
from pyisr.runtime import run_sync


class FakeClock:
    """Wall-clock seconds the test moves by hand."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def engine(clock: FakeClock) -> AsyncIterator[Engine]:
    eng = Engine(MemoryCache(), clock=clock, render_timeout=2.0, debug=True)
    set_engine(eng)
    yield eng
    await eng.drain()
    set_engine(None)


@pytest.fixture
def sync_engine(clock: FakeClock) -> Iterator[Engine]:
    """The process engine for tests with no event loop of their own (scripts, sync views)."""
    eng = Engine(MemoryCache(), clock=clock, render_timeout=5.0)
    set_engine(eng)
    yield eng
    run_sync(eng.drain())
    set_engine(None)


class Counter:
    """A data source: each call returns the next number."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def next(self) -> int:
        with self.lock:
            self.calls += 1
            return self.calls


@pytest.fixture
def counter() -> Counter:
    return Counter()


class Page:
    """A render callable that counts its calls and returns its version in the body."""

    def __init__(self, revalidate: Any = None, *, delay: float = 0.0) -> None:
        self.calls = 0
        self.revalidate = revalidate
        self.delay = delay
        self.fail: BaseException | None = None
        self.status = 200

    async def __call__(self) -> Rendered:
        self.calls += 1
        n = self.calls
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        kwargs: dict[str, Any] = {}
        if self.revalidate is not None:
            kwargs["revalidate"] = self.revalidate
        return Rendered(f"render {n}", status=self.status, **kwargs)


@pytest.fixture
def page_factory() -> Callable[..., Page]:
    return Page
