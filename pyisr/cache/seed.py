"""Filling an empty shared cache from a local build, once for all instances.

``pyisr build`` writes the prerendered pages to ``SITE/.pyisr/cache``; when the
instances of a deployment share Redis, the first one to start copies them there.
A marker entry says it was done and the handler's lock makes sure only one instance
copies; entries already in the shared cache are newer and win (``set`` is fenced).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pyisr.cache.entry import CacheEntry, EntryKind
from pyisr.cache.handler import CacheHandler

logger = logging.getLogger("pyisr.cache")

SEED_MARKER = "/_pyisr/seeded"


async def seed_from_local(shared: CacheHandler, local_dir: Path, *, lock_ttl: float = 300.0) -> int:
    """Copy every entry of the local filesystem cache into ``shared`` if not done yet.

    Returns the number of entries copied (0 when already seeded or another instance
    is seeding right now).
    """
    if await shared.reload(SEED_MARKER) is not None:
        return 0
    token = await shared.acquire_lock(SEED_MARKER, lock_ttl)
    if token is None:
        return 0
    from pyisr.cache.filesystem import FileSystemCache

    local = FileSystemCache(local_dir)
    copied = 0
    try:
        if await shared.reload(SEED_MARKER) is not None:
            return 0
        async for key in local.keys():
            entry = await local.get(key)
            if entry is not None and await shared.set(entry):
                copied += 1
        marker = CacheEntry(
            key=SEED_MARKER,
            body=str(copied).encode(),
            created_at=time.time(),
            revalidate=None,
            kind=EntryKind.DATA,
        )
        await shared.set(marker)
    finally:
        await shared.release_lock(SEED_MARKER, token)
        await local.close()
    return copied
