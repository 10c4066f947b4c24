"""The edge: CDNs and reverse proxies told of every invalidation pyisr makes.

Every cacheable answer carries its entry's tags as edge keys (``Surrogate-Key``,
``Cache-Tag``: :mod:`pyisr.cdn.keys`); every invalidation purges the same keys at each
CDN named in ``cdn`` / ``PYISR_CDN`` (:mod:`pyisr.cdn.urls`: Varnish, Fastly, Cloudflare,
a webhook), through a queue that batches, retries and never blocks its caller
(:mod:`pyisr.cdn.queue`).

:func:`attach_cdn` is the one place an engine gets its purges: the site server, ``pyisr
cache purge``, ``pyisr.configure`` (scripts, the ASGI middleware, Flask) and Django's app
all call it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pyisr.cache.activity import Invalidation
from pyisr.cache.tags import key_tag
from pyisr.cdn.base import EdgePurger, PurgeFailed
from pyisr.cdn.keys import purge_keys
from pyisr.cdn.queue import PurgeQueue
from pyisr.cdn.urls import parse_cdn_urls, purger_from_url

if TYPE_CHECKING:
    from pyisr.engine import Engine

__all__ = [
    "EdgePurger",
    "PurgeFailed",
    "PurgeQueue",
    "attach_cdn",
    "edge_purge",
    "parse_cdn_urls",
    "purger_from_url",
]


def attach_cdn(
    engine: Engine,
    urls: Iterable[str],
    *,
    environ: Mapping[str, str] | None = None,
    **queue_options: Any,
) -> PurgeQueue | None:
    """Purge the CDNs ``urls`` name after each invalidation ``engine`` makes.

    Returns the engine's queue (``engine.cdn``), or ``None`` when ``urls`` is empty.
    Raises ``ValueError`` for a bad URL or a missing token (naming the variable to set):
    a process that should purge and cannot must say so when it starts, not at its first
    invalidation. Idempotent for the same URLs; ``queue_options`` go to
    :class:`PurgeQueue` (tests shorten its timings).
    """
    urls = tuple(dict.fromkeys(u.strip() for u in urls if u.strip()))
    if not urls:
        return None
    purgers = list({p.name: p for p in (purger_from_url(u, environ) for u in urls)}.values())
    if engine.cdn is not None:
        if engine.cdn.names == [p.name for p in purgers]:
            return engine.cdn
        raise ValueError(f"this engine already purges {', '.join(engine.cdn.names)}")
    queue = PurgeQueue(purgers, on_count=engine.events.cdn_purged, **queue_options)
    engine.cdn = queue
    engine.on_invalidation(functools.partial(_on_invalidation, queue))
    engine.on_stale_replaced(functools.partial(_on_stale_replaced, queue))
    return queue


def edge_purge(invalidation: Invalidation) -> tuple[list[str], bool]:
    """The keys an invalidation purges at the edge, and whether softly.

    A tag, path, route or layout purges its tags' keys, softly for a stale mark (the edge
    may serve its copy while it refetches, as pyisr does); ``revalidate(path)`` purges the
    page's own key, hard: the new page is stored already.
    """
    return purge_keys(invalidation.tags), invalidation.stale and invalidation.kind != "regenerate"


def _on_invalidation(queue: PurgeQueue, invalidation: Invalidation) -> None:
    keys, soft = edge_purge(invalidation)
    queue.add(keys, soft=soft)


def _on_stale_replaced(queue: PurgeQueue, key: str) -> None:
    """A page marked stale was regenerated: the edge may hold the stale answer it fetched
    meanwhile, fresh for a whole ``s-maxage``; purge it (softly) so it fetches the new one."""
    queue.add(purge_keys([key_tag(key)]), soft=True)
