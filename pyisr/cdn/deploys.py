"""Deploys at the edge: once a new build is live, no CDN goes on serving the old one.

A page nobody invalidates is sent with ``s-maxage`` of up to a year, so without a purge
an edge would show the previous deploy's templates and code long after the deploy.
Every cacheable answer of a site server therefore carries the key of the build it comes
from (``_b/<build id>``: :func:`pyisr.cdn.keys.build_key`), and two purges follow a
deploy by themselves wherever ``cdn`` is set:

* **at start**: a server of the site's current build purges every other build kept in
  ``.pyisr/builds`` (the previous one, and a newer one after a rollback), so the edge
  fetches the new build's pages from then on;
* **at stop**: a server of a build that is no longer current purges its own build. In a
  rolling deploy, instances still serving the old build answer the edge's refetches
  after the first purge; the last of them to stop purges what they gave it.

Only the site server does this: a Django or Flask deploy has no build ids, and its pages
are purged by the invalidations that change them.
"""

from __future__ import annotations

import logging
import os

from pyisr.cdn.keys import build_key
from pyisr.cdn.queue import PurgeQueue
from pyisr.deploys import kept_builds
from pyisr.site_store import read_build_id

logger = logging.getLogger("pyisr")


def purge_other_builds(queue: PurgeQueue, site_dir: str | os.PathLike[str], build_id: str) -> list[str]:
    """At a server's start: purge every kept build but ``build_id``, when it is the
    site's current build (an old build's server restarting purges nothing). Returns the
    builds purged."""
    if read_build_id(site_dir) != build_id:
        return []
    others = [other for other in kept_builds(site_dir) if other != build_id]
    if others:
        queue.add([build_key(other) for other in others])
        named = ", ".join(others)
        logger.info("purging the edge's pages of build(s) %s: build %s is current", named, build_id)
    return others


def purge_if_superseded(queue: PurgeQueue, site_dir: str | os.PathLike[str], build_id: str) -> bool:
    """At a server's stop: purge ``build_id`` if another build is current now. Returns
    whether it did."""
    current = read_build_id(site_dir)
    if current is None or current == build_id:
        return False
    queue.add([build_key(build_id)])
    logger.info("purging the edge's pages of build %s: build %s is current", build_id, current)
    return True
