"""An app's deploys (Django, Flask, Starlette): what ``build_id`` does for them.

A site served by ``pyisr start`` has builds of its own (:mod:`pyisr.deploys`). An app's
deploy is its code, which pyisr cannot see change: a template edited in a deploy would
go on being served from pages the previous deploy rendered, until each is invalidated
(forever, for a page cached with ``revalidate=False``), and an edge would keep them for
their whole ``s-maxage``. ``build_id`` (``PYISR["build_id"]``, ``configure(build_id=)``
or ``PYISR_BUILD_ID``: a commit hash, a release number) names the deploy, and then:

* **the cache is the deploy's own**: ``<cache dir>/<build id>/``, or ``build_id=`` in a
  Redis URL (:func:`scope_cache`). The new deploy starts with an empty cache and renders
  each page once, at its first request, with the usual single flight; two deploys
  running side by side never read each other's pages;
* **the edge follows**: every cacheable answer carries the key ``_b/<build id>``; the
  first process of a new build to serve an ``@isr`` request records the build in the
  store, newest last (:class:`FileRecord`, :class:`RedisRecord`), and purges the keys of
  the builds recorded before it; a process whose build is no longer the newest when it
  exits purges its own build, which old instances may have given the edge during a
  rolling deploy;
* **old cache directories go**: a file cache keeps the directories of the newest two
  builds and of any build a process on the machine still serves (each holds a shared
  flock on ``.builds/<build id>.in-use``); the others are removed when a new build
  starts serving. (Redis keys expire by themselves.)

Nothing of it reads a request: build ids come from the app's settings, checked by
:func:`~pyisr.site_store.is_valid_build_id`, and ids read back from a store are checked
again before they name a key or a directory.
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import logging
import os
import shutil
import threading
import weakref
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

from pyisr.cache.files import exclusive_lock
from pyisr.cdn.deploys import RECORD_LENGTH, read_record, record_served
from pyisr.cdn.keys import build_key
from pyisr.deploys import if_unused
from pyisr.rewarm import rewarm_in_background
from pyisr.site_store import cache_root, is_shared_cache, is_valid_build_id, scoped_cache_url

if TYPE_CHECKING:
    from pyisr.cache.handler import CacheHandler
    from pyisr.engine import Engine

logger = logging.getLogger("pyisr")

#: Where a file cache keeps its record of builds and their in-use locks (a build id never
#: starts with a dot, so no build's directory can be named so).
BUILDS_DIR = ".builds"
#: Build directories kept whoever serves them: the newest and the one before (a rolling
#: deploy's two).
KEEP_NEWEST = 2


def check_build_id(build_id: object, where: str) -> str:
    """``build_id`` if it may name a deploy, else a ``ValueError`` that says ``where``."""
    if isinstance(build_id, str) and is_valid_build_id(build_id):
        return build_id
    raise ValueError(
        f"{where} must be 1 to 64 letters, digits, '_' or '-', starting with a letter or digit "
        f"and not a name the cache uses itself ('dev'), such as a commit hash: not {build_id!r}"
    )


def scope_cache(url: str | None, build_id: str, base_dir: str | os.PathLike[str]) -> str:
    """The cache URL of ``build_id``'s own pages in the store ``url`` names (``None``: the
    default directory). A URL that names its own ``build_id=`` too is a ``ValueError``:
    one of the two would be ignored."""
    if url and is_shared_cache(url) and "build_id" in parse_qs(urlparse(url).query):
        raise ValueError("the cache URL has its own build_id=: name the build in one place")
    return scoped_cache_url(url, build_id, base_dir)


class BuildRecord(ABC):
    """The builds that served an app lately, kept where every process of it can read them."""

    @abstractmethod
    async def started(self, build_id: str) -> tuple[list[str], bool] | None:
        """Record ``build_id`` as the newest; returns the builds recorded before it (oldest
        first) and whether it was not the newest already, or ``None`` if the store could
        not be written."""

    @abstractmethod
    async def newest(self) -> str | None:
        """The build recorded last (``None``: none, or the store cannot say)."""

    def hold(self, build_id: str) -> None:  # noqa: B027 - optional: only a file cache needs it
        """This process serves ``build_id`` until it ends (a file cache: never removed under it)."""

    def remove_unused(self, build_id: str) -> list[str]:
        """Remove what older builds left that nobody serves; returns the builds removed."""
        return []


class FileRecord(BuildRecord):
    """The record of a file cache: ``<root>/.builds/record``, a line per build."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / BUILDS_DIR
        self._held: dict[str, int] = {}

    async def started(self, build_id: str) -> tuple[list[str], bool] | None:
        return await asyncio.to_thread(self._started, build_id)

    def _started(self, build_id: str) -> tuple[list[str], bool] | None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with exclusive_lock(self.dir / "record.lock", blocking=True):
                before = record_served(self.dir / "record", build_id)
        except OSError as exc:
            logger.warning("pyisr: cannot record build %s in %s: %s", build_id, self.dir, exc)
            return None
        return before, before[-1:] != [build_id]

    async def newest(self) -> str | None:
        found = self._read()
        return found[-1] if found else None

    def _read(self) -> list[str]:
        return read_record(self.dir / "record")

    def hold(self, build_id: str) -> None:
        if build_id in self._held:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / f"{build_id}.in-use", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            logger.warning("pyisr: cannot mark build %s as in use: %s", build_id, exc)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # released when the process ends
        except OSError:
            os.close(fd)
            return
        self._held[build_id] = fd

    def remove_unused(self, build_id: str) -> list[str]:
        """Remove the directories of builds that served here, but for the newest two and
        those a process still holds (their ``.in-use`` lock says which builds served)."""
        keep = {build_id, *self._read()[-KEEP_NEWEST:]}
        try:
            served = [p.name.removesuffix(".in-use") for p in self.dir.glob("*.in-use")]
        except OSError:
            return []
        removed = []
        for old in sorted(served):
            if old in keep or not is_valid_build_id(old):
                continue
            lock = self.dir / f"{old}.in-use"
            with if_unused(lock) as unused:
                if not unused:
                    continue
                trash = self.root / f".trash-{old}-{os.getpid()}"
                try:
                    (self.root / old).rename(trash)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    logger.warning("pyisr: cannot remove build %s's cache: %s", old, exc)
                    continue
                lock.unlink(missing_ok=True)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(old)
        for left in self.root.glob(".trash-*"):  # what an earlier removal left half done
            shutil.rmtree(left, ignore_errors=True)
        if removed:
            logger.info(
                "pyisr: removed the cache of builds %s: build %s serves", ", ".join(removed), build_id
            )
        return removed


class RedisRecord(BuildRecord):
    """The record of a Redis cache: a list shared by the builds of its prefix."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    async def started(self, build_id: str) -> tuple[list[str], bool] | None:
        found: tuple[list[str], bool] | None = await self.cache.record_served_build(RECORD_LENGTH)
        if found is None:
            return None
        before, newer = found
        return [b for b in before if is_valid_build_id(b)], newer

    async def newest(self) -> str | None:
        found: str | None = await self.cache.newest_served_build()
        return found if found is not None and is_valid_build_id(found) else None


def record_for(
    url: str | None, handler: CacheHandler, base_dir: str | os.PathLike[str]
) -> BuildRecord | None:
    """Where the builds of an app whose cache ``url`` names are recorded; ``None`` for a
    memory cache (one process: nothing to tell another)."""
    if url and is_shared_cache(url):
        return RedisRecord(getattr(handler, "backing", handler))
    root = cache_root(url, base_dir)
    return FileRecord(root) if root is not None else None


class AppBuild:
    """An app's build: its id, its record, and what its processes do as they start and end."""

    def __init__(self, build_id: str, record: BuildRecord | None) -> None:
        self.build_id = build_id
        self.record = record
        #: Whether this process began serving (reset in a forked child), and its pid.
        self._begun = False
        self._began: int | None = None
        self._lock = threading.Lock()
        _builds.add(self)

    def begin_serving(self, engine: Engine) -> None:
        """At each process's first ``@isr`` request: record the build, purge the older
        ones at the edge if it is newer than the record's newest, remove unused
        directories, and purge this build at exit once superseded. Runs on pyisr's
        bridge loop: the request never waits for it. Repeat calls cost a comparison."""
        if self._begun or self.record is None:
            return
        with self._lock:
            if self._begun:
                return
            self._begun, self._began = True, os.getpid()
        from pyisr.runtime import bridge

        asyncio.run_coroutine_threadsafe(self._begin(engine), bridge.loop())

    async def _begin(self, engine: Engine) -> None:
        record = self.record
        assert record is not None
        record.hold(self.build_id)
        try:
            found = await record.started(self.build_id)
        except Exception:  # noqa: BLE001 - a record is never worth a failed start
            logger.exception("pyisr: cannot record build %s", self.build_id)
            return
        if found is not None:
            before, newer = found
            others = [b for b in before if b != self.build_id]
            if newer and others and engine.cdn is not None:
                engine.cdn.add([build_key(b) for b in others])
                logger.info(
                    "purging the edge's pages of build(s) %s: build %s serves",
                    ", ".join(others),
                    self.build_id,
                )
        atexit.register(_purge_if_superseded, weakref.ref(engine), self)
        try:
            await asyncio.to_thread(record.remove_unused, self.build_id)
        except OSError as exc:  # the next build's start tries again
            logger.warning("pyisr: cannot remove the cache of old builds: %s", exc)

    async def superseded(self) -> bool:
        """Whether another build was recorded after this one."""
        if self.record is None:
            return False
        newest = await self.record.newest()
        return newest is not None and newest != self.build_id


#: Every app build of the process, so a forked child (gunicorn's pre-loaded workers)
#: begins serving on its own.
_builds: weakref.WeakSet[AppBuild] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for build in list(_builds):
        build._begun = False
        build._lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def _purge_if_superseded(engine_ref: weakref.ref[Engine], build: AppBuild) -> None:
    """At exit: purge this build's pages at the edge if a newer build serves (registered
    after the purge queue's own exit hook, so it runs first and the queue sends it)."""
    engine = engine_ref()
    if engine is None or engine.cdn is None or os.getpid() != build._began:
        return
    from pyisr.runtime import run_sync

    try:
        if run_sync(build.superseded()):
            engine.cdn.add([build_key(build.build_id)])
            logger.info("purging the edge's pages of build %s: a newer build serves", build.build_id)
    except Exception:  # noqa: BLE001 - an exit never fails for a purge
        logger.exception("pyisr: cannot check whether build %s was superseded", build.build_id)


def begin_serving(engine: Engine) -> None:
    """What an app's process starts at its first ``@isr`` request: the re-warm, and its
    build's record and purges (when ``build_id`` is set)."""
    rewarm_in_background(engine)
    if engine.app_build is not None:
        engine.app_build.begin_serving(engine)
