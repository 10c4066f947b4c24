"""Which store, and which namespace in it, a site's cache is: decided here, once.

The server, ``pyisr build``, the ``pyisr cache`` commands, the integrations and any
script (``pyisr.configure(site=...)``, or ``PYISR_SITE`` in the environment) all ask
:func:`open_site_cache`, so they all read and invalidate the same entries.

Every store is scoped to one build, so a server of build A never reads or writes the
entries of build B, even while both run side by side during a deploy:

- a local file-system cache (the default ``SITE/.pyisr/cache``, or an explicit
  ``file:///var/cache/site``) keeps each build in a directory of its own,
  ``<root>/<build id>/``;
- a shared store (Redis) carries the build id in every key (``build_id=`` in its URL);
- a site never built (``pyisr dev``, scripts) uses the namespace :data:`UNBUILT`.

Which builds exist, which one is current and which are removed is ``pyisr.deploys``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

from pyisr.cache.fs_layout import ENTRY_DIRS, LOCKS_DIR
from pyisr.cache.handler import CacheHandler
from pyisr.cache.urls import build_handler
from pyisr.config import Config, load_config

#: Where a build writes its id (SPEC: ``SITE/.pyisr/BUILD_ID``).
DOT_DIR = ".pyisr"
BUILD_ID_FILE = "BUILD_ID"
#: The namespace of a cache used without a build (``pyisr dev``, scripts of a site never
#: built).
UNBUILT = "dev"

_SHARED_SCHEMES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")
#: A build id names a directory: letters, digits, ``_`` and ``-`` only (no ``..``, no
#: ``/``), and never a name the file-system cache or the namespaces use themselves.
_BUILD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_RESERVED = frozenset({UNBUILT, *ENTRY_DIRS, LOCKS_DIR})


def is_shared_cache(url: str) -> bool:
    """Whether the cache URL names a store other machines share (and so needs a namespace)."""
    return url.startswith(_SHARED_SCHEMES)


def is_valid_build_id(text: str) -> bool:
    """Whether ``text`` may name a build: it becomes a directory name and part of keys."""
    return bool(_BUILD_ID.fullmatch(text)) and text not in _RESERVED


def read_build_id(site_dir: str | os.PathLike[str]) -> str | None:
    """The id of the site's current build, or ``None`` when it was never built.

    An id that could not have been written by ``pyisr build`` (a hand-edited file
    naming ``../x``) counts as no build rather than a path to follow.
    """
    path = Path(site_dir) / DOT_DIR / BUILD_ID_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text if is_valid_build_id(text) else None


def default_cache_dir(site_dir: str | os.PathLike[str]) -> Path:
    """The root of the site's file-system cache when ``cache`` is not set (one directory per build)."""
    return Path(site_dir).resolve() / DOT_DIR / "cache"


def local_cache_root(site_dir: str | os.PathLike[str], config: Config) -> Path | None:
    """The directory holding the site's per-build cache directories, or ``None``.

    ``None`` when the cache is not a local directory (Redis, ``memory://``). A relative
    ``file:`` path is relative to the site, as the handler URL would be.
    """
    return cache_root(config.cache, site_dir)


def cache_root(url: str | None, base_dir: str | os.PathLike[str]) -> Path | None:
    """The directory a cache URL names (``None``: ``base_dir/.pyisr/cache``), a relative
    one under ``base_dir``; ``None`` when it is no local directory (Redis, memory)."""
    if not url:
        return default_cache_dir(base_dir)
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file"):
        return None
    path = Path((parsed.netloc + parsed.path) if parsed.scheme else url)
    return path if path.is_absolute() else Path(base_dir).resolve() / path


def scoped_cache_url(url: str | None, namespace: str, base_dir: str | os.PathLike[str]) -> str:
    """The handler URL of ``namespace`` (a build id) in the cache ``url`` names: a local
    directory keeps it in ``<root>/<namespace>/``, a shared store carries it in its keys
    (``build_id=``), and ``memory://`` (one process, one build) is left as it is."""
    root = cache_root(url, base_dir)
    if root is not None:
        query = urlparse(url).query if url and url.startswith("file:") else ""
        # The handler's options (``?max_bytes=``) go with every namespace.
        return f"file://{root / namespace}?{query}" if query else str(root / namespace)
    scoped = url or ""
    if is_shared_cache(scoped) and "build_id=" not in scoped:
        scoped += ("&" if "?" in scoped else "?") + f"build_id={namespace}"
    return scoped


def site_cache_url(site_dir: str | os.PathLike[str], config: Config, build_id: str | None) -> str:
    """The handler URL of the site's cache, scoped to ``build_id`` (``None``: :data:`UNBUILT`)."""
    return scoped_cache_url(config.cache, build_id or UNBUILT, site_dir)


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
    return build_handler(
        url, base_dir=Path(site_dir).resolve(), memory_tier_bytes=tier, max_bytes=config.cache_max_bytes
    )
