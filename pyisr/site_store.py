"""Which store, and which namespace in it, a site's cache is: decided here, once.

The server, ``pyisr build``, the ``pyisr cache`` commands, the integrations and any
script (``pyisr.configure(site=...)``, or ``PYISR_SITE`` in the environment) all ask
:func:`open_site_cache`, so they all read and invalidate the same entries. A cache
shared by several machines (Redis) is scoped to the build: every key carries the build
id, so an old and a new release running side by side never read each other's pages.
A local file-system cache needs no scope: a build replaces it whole.
"""

from __future__ import annotations

import os
from pathlib import Path

from pyisr.cache.handler import CacheHandler
from pyisr.cache.urls import build_handler
from pyisr.config import Config, load_config

#: Where a build writes its id (SPEC: ``SITE/.pyisr/BUILD_ID``).
DOT_DIR = ".pyisr"
BUILD_ID_FILE = "BUILD_ID"
#: The namespace of a shared cache used without a build (``pyisr dev``, scripts of a site
#: never built).
UNBUILT = "dev"

_SHARED_SCHEMES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")


def is_shared_cache(url: str) -> bool:
    """Whether the cache URL names a store other machines share (and so needs a namespace)."""
    return url.startswith(_SHARED_SCHEMES)


def read_build_id(site_dir: str | os.PathLike[str]) -> str | None:
    """The id of the site's current build, or ``None`` when it was never built."""
    path = Path(site_dir) / DOT_DIR / BUILD_ID_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def default_cache_dir(site_dir: str | os.PathLike[str]) -> Path:
    """The file-system cache of a site when ``cache`` is not set."""
    return Path(site_dir).resolve() / DOT_DIR / "cache"


def site_cache_url(site_dir: str | os.PathLike[str], config: Config, build_id: str | None) -> str:
    """The handler URL of the site's cache, scoped to ``build_id`` when the store is shared."""
    url = config.cache or str(default_cache_dir(site_dir))
    if is_shared_cache(url) and "build_id=" not in url:
        url += ("&" if "?" in url else "?") + f"build_id={build_id or UNBUILT}"
    return url


def open_site_cache(
    site_dir: str | os.PathLike[str],
    config: Config | None = None,
    *,
    build_id: str | None = None,
    memory_tier_bytes: int | None = None,
) -> CacheHandler:
    """The handler of the site's cache, as the running server sees it.

    ``config`` defaults to the site's (``pyisr.toml``, then ``PYISR_*``); ``build_id`` to
    the site's current build; ``memory_tier_bytes`` to the configured tier (``0`` for
    none: one-shot commands gain nothing from it).
    """
    config = config if config is not None else load_config(site_dir)
    build_id = build_id if build_id is not None else read_build_id(site_dir)
    tier = config.memory_tier if memory_tier_bytes is None else memory_tier_bytes
    url = site_cache_url(site_dir, config, build_id)
    return build_handler(url, base_dir=Path(site_dir).resolve(), memory_tier_bytes=tier)
