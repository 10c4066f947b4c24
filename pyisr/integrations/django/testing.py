"""Tests of a project using ``@isr``: a cache of their own, and data they can see.

A sync view rendered while its test waits (a MISS) runs in the test's thread, on its
database connection, so ``TestCase`` data is visible. What is cached must not outlive
the test (the next test's post 1 is another post), so give each test an empty cache::

    class PostTests(TestCase):
        def setUp(self):
            self.enterContext(isolated_cache())

``TestCase`` never commits, so ``transaction.on_commit`` callbacks (pyisr's automatic
revalidation among them) run only inside ``self.captureOnCommitCallbacks(execute=True)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pyisr.cache.memory import MemoryCache
from pyisr.engine import Engine
from pyisr.integrations.django.resolver import resolve_page
from pyisr.rewarm import stop_rewarm_in_background
from pyisr.runtime import get_engine, run_sync, set_engine


@contextlib.contextmanager
def isolated_cache(engine: Engine | None = None) -> Iterator[Engine]:
    """Make an empty in-memory engine (or ``engine``) the default for the block."""
    previous = get_engine()
    own = engine if engine is not None else Engine(MemoryCache())
    for resolver in previous.resolvers():
        own.add_resolver(resolver)
    own.add_resolver(resolve_page)
    set_engine(own)
    try:
        yield own
    finally:
        try:
            stop_rewarm_in_background(own)
            run_sync(own.drain())
        finally:
            set_engine(previous)
