"""Looking at and clearing a cache: what ``pyisr cache`` and ``manage.py pyisr cache`` share.

Each command opens its own engine (the site's store, or the Django project's) and
calls these; neither knows how the other found its store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pyisr.cache.tags import key_tag
from pyisr.engine import Engine
from pyisr.paths import normalize_path


def cache_key(path: str) -> str:
    """The key a command line names: a page's path, or a data key as ``cache list`` prints it.

    Raises ``ValueError`` (``pyisr.paths.BadPath``) for a path that cannot be a key.
    """
    if path.startswith("data:"):
        return path
    return normalize_path(path)


async def keys(engine: Engine, prefix: str = "") -> AsyncIterator[str]:
    """Every cached key starting with ``prefix``."""
    async for key in engine.handler.keys(prefix):
        yield key


async def inspect(engine: Engine, key: str, now: float) -> dict[str, Any] | None:
    """What is cached for ``key`` (age, revalidate, tags, last failure), or ``None``."""
    from pyisr.server.endpoints import describe_entry

    entry = await engine.inspect(key)
    return None if entry is None else describe_entry(entry, now)


async def purge(engine: Engine, key: str) -> None:
    """Invalidate ``key`` in every process serving from the store.

    An invalidation, not a delete: processes holding the page in memory learn of it
    through the tag manifest, and the next request renders it afresh. Purging a data
    key also invalidates the pages that read it.
    """
    await engine.revalidate_tags([key_tag(key)])
