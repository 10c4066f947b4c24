"""pyisr: Incremental Static Regeneration for Python.

Pages served like static files, regenerated in the background when they go stale,
invalidated on demand by path or tag; a data cache for functions and HTTP fetches.
"""

from pyisr.cache.entry import CacheEntry, EntryKind, FailureRecord
from pyisr.cache.handler import CacheHandler
from pyisr.cache.memory import MemoryCache
from pyisr.cache.tier import MemoryTier
from pyisr.context import is_fallback
from pyisr.data.cached import cached
from pyisr.data.fetch import fetch, fetch_sync
from pyisr.draft import disable_draft_mode, enable_draft_mode, is_draft_request
from pyisr.engine import (
    CacheStatus,
    Engine,
    NotShareable,
    OnMissing,
    Rendered,
    RenderFailed,
    RenderPolicy,
    RenderSlotsExhausted,
    RenderTimeout,
    RevalidationError,
    Served,
)
from pyisr.provenance import invalidated_by
from pyisr.revalidation import (
    arevalidate_path,
    arevalidate_tag,
    revalidate,
    revalidate_path,
    revalidate_sync,
    revalidate_tag,
)
from pyisr.runtime import configure, get_engine, set_engine
from pyisr.site.signals import not_found, redirect
from pyisr.site.templates import render_template

__version__ = "0.1.0"

__all__ = [
    "CacheEntry",
    "CacheHandler",
    "CacheStatus",
    "Engine",
    "EntryKind",
    "FailureRecord",
    "MemoryCache",
    "MemoryTier",
    "OnMissing",
    "RenderFailed",
    "RenderPolicy",
    "RenderSlotsExhausted",
    "RenderTimeout",
    "Rendered",
    "NotShareable",
    "RevalidationError",
    "Served",
    "arevalidate_path",
    "arevalidate_tag",
    "cached",
    "configure",
    "disable_draft_mode",
    "enable_draft_mode",
    "is_draft_request",
    "fetch",
    "fetch_sync",
    "get_engine",
    "invalidated_by",
    "is_fallback",
    "revalidate",
    "revalidate_path",
    "revalidate_sync",
    "revalidate_tag",
    "set_engine",
    "not_found",
    "redirect",
    "render_template",
    "App",
    "FileSystemCache",
]


def __getattr__(name: str) -> object:
    # FileSystemCache is imported lazily so `import pyisr` stays cheap.
    if name == "App":
        from pyisr.server.app import App

        return App
    if name == "FileSystemCache":
        from pyisr.cache.filesystem import FileSystemCache

        return FileSystemCache
    raise AttributeError(f"module 'pyisr' has no attribute {name!r}")
