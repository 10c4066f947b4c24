"""One data-cache read, shared by ``cached`` and ``fetch``.

A data entry is an ordinary cache entry of kind DATA, so it gets the engine's
stale-while-revalidate, single-flight and keep-last-good for free. What is special
is its link to the page rendering around it: the read is checked against the page's
implicit tags (so ``revalidate_path`` refreshes the page's data too), a stale value
is refetched in the foreground while the page itself regenerates, and the entry's
tags and revalidate flow up into the page.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pyisr.cache.entry import CacheEntry, EntryKind, Revalidate
from pyisr.context import current_render
from pyisr.engine import CacheStatus, RenderFn, RenderPolicy
from pyisr.runtime import get_engine, run_sync

DATA_KEY_VERSION = "v1"


def data_key(*parts: Any) -> str:
    """A stable key for the data cache: ``data:`` + sha256 of the parts as JSON."""
    raw = json.dumps([DATA_KEY_VERSION, *parts], separators=(",", ":"), default=repr, sort_keys=True)
    return "data:" + hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class DataRequest:
    """What the caller's thread knows about the render it is part of."""

    soft_tags: tuple[str, ...]
    stale_blocks: bool

    @classmethod
    def from_context(cls) -> DataRequest:
        ctx = current_render()
        if ctx is None:
            return cls((), False)
        return cls(ctx.soft_tags, ctx.is_revalidating)


async def read_through(
    key: str,
    compute: RenderFn,
    revalidate: Revalidate,
    tags: tuple[str, ...],
    request: DataRequest,
) -> tuple[CacheEntry, CacheStatus]:
    policy = RenderPolicy(
        kind=EntryKind.DATA,
        revalidate=revalidate,
        tags=tags,
        soft_tags=request.soft_tags,
        stale_blocks=request.stale_blocks,
    )
    served = await get_engine().get(key, compute, policy)
    assert served.entry is not None
    return served.entry, served.status


def record_in_render(entry: CacheEntry) -> None:
    """Let the page being rendered inherit this data's tags and revalidate."""
    ctx = current_render()
    if ctx is not None:
        ctx.record(entry.tags, entry.revalidate)


def read_through_sync(
    key: str,
    compute: RenderFn,
    revalidate: Revalidate,
    tags: tuple[str, ...],
) -> tuple[CacheEntry, CacheStatus]:
    request = DataRequest.from_context()
    return run_sync(read_through(key, compute, revalidate, tags, request))

