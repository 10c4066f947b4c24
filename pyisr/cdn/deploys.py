"""Deploys at the edge: once a new build is live, no CDN goes on serving the old one.

A page nobody invalidates is sent with ``s-maxage`` of up to a year, so without a purge
an edge would show the previous deploy's templates and code long after the deploy.
Every cacheable answer of a site server therefore carries the key of the build it comes
from (``_b/<build id>``: :func:`pyisr.cdn.keys.build_key`), and two purges follow a
deploy by themselves wherever ``cdn`` is set:

* **at start**: a server of the site's current build purges every other build an edge
  may still hold: those kept in ``.pyisr/builds`` (the previous one, a newer one after a
  rollback) and the last builds whose servers sent pages to an edge, listed in
  ``.pyisr/builds/.edge-builds`` (a build removed by two builds in a row while no server
  ran is purged all the same). The edge fetches the new build's pages from then on;
* **at stop**: a server of a build that is no longer current purges its own build. In a
  rolling deploy, instances still serving the old build answer the edge's refetches
  after the first purge; the last of them to stop purges what they gave it.

This is the site server's. An app (Django, Flask, Starlette) has builds only when its
settings name one (``build_id``), and then :mod:`pyisr.app_builds` does the same from
a record kept in its store.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pyisr.cache.files import atomic_write
from pyisr.cdn.keys import build_key
from pyisr.cdn.queue import PurgeQueue
from pyisr.deploys import BUILDS_DIR, dot_dir, kept_builds, registry_lock
from pyisr.site_store import is_valid_build_id, read_build_id

logger = logging.getLogger("pyisr")


def purge_other_builds(queue: PurgeQueue, site_dir: str | os.PathLike[str], build_id: str) -> list[str]:
    """At a server's start: purge every kept or recently served build but ``build_id``,
    when it is the site's current build (an old build's server restarting purges
    nothing), and record ``build_id`` as served. Returns the builds purged."""
    if read_build_id(site_dir) != build_id:
        return []
    record = _record(site_dir)
    sent: list[str] = []
    try:
        with registry_lock(site_dir):
            sent = record_served(record, build_id)
    except OSError as exc:  # the server starts all the same, and purges what it knows
        logger.warning("pyisr: cannot record build %s as served at the edge: %s", build_id, exc)
    others = [other for other in dict.fromkeys([*sent, *kept_builds(site_dir)]) if other != build_id]
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


#: The builds that served the edge lately, oldest first: each start purges them again, so
#: pages an old instance gave the edge after the first purge go at the next deploy at the
#: latest, even if that instance died without its own purge.
EDGE_RECORD = ".edge-builds"
#: Builds the record keeps (a key each per purge: cheap for every CDN).
RECORD_LENGTH = 10


def _record(site_dir: str | os.PathLike[str]) -> Path:
    return dot_dir(site_dir) / BUILDS_DIR / EDGE_RECORD


def record_served(path: Path, build_id: str) -> list[str]:
    """Put ``build_id`` last in the record at ``path`` (the caller holds its lock), keeping
    :data:`RECORD_LENGTH` builds; returns the record as it was before."""
    before = read_record(path)
    after = [*(other for other in before if other != build_id), build_id][-RECORD_LENGTH:]
    if after != before:
        atomic_write(path, "".join(f"{one}\n" for one in after).encode())
    return before


def read_record(path: Path) -> list[str]:
    """The build ids in the record (an unreadable line is no build: never a key to send,
    nor a path to follow)."""
    try:
        lines = path.read_text(encoding="utf-8").split()
    except OSError:
        return []
    return [line for line in dict.fromkeys(lines) if is_valid_build_id(line)]
