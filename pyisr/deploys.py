"""The builds of a site kept on disk: which one is current, which one is kept for
rollback, which ones running servers use, and removing the others.

A deploy never mixes two builds: each build has a cache namespace of its own
(:mod:`pyisr.site_store`) and a manifest of its own, and a server reads the id of the
current build once, at start-up, then serves that build until it exits, whatever is
built meanwhile. Layout of ``SITE/.pyisr``::

    BUILD_ID                   the current build: what a server starting now serves
    PREVIOUS_BUILD_ID          the build it replaced, kept for rollback
    manifest.json              a copy of the current build's manifest, for people and tools
    build.lock                 one ``pyisr build`` of the site at a time
    builds/<id>/manifest.json  the manifest of every kept build
    builds/<id>/in-use.lock    shared-flocked by each process serving that build
    builds/.lock               publishing, rolling back and removing builds, one at a time
    cache/<id>/                the build's file-system cache (or ``<file: root>/<id>/``)
    cache/.staging-<id>/       the pages of a build still running (or killed)

Builds other than the current and the previous one are removed once no process holds
their ``in-use.lock``. flock is the kernel's: a process that dies releases it, so a
crashed server never pins a build, and a live one can never lose its build.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyisr.cache.files import atomic_write, exclusive_lock, still_named
from pyisr.cache.fs_layout import ENTRY_DIRS, LOCKS_DIR, TAG_LOG, TAG_LOG_LOCK
from pyisr.config import Config
from pyisr.site_store import (
    BUILD_ID_FILE,
    DOT_DIR,
    UNBUILT,
    default_cache_dir,
    is_valid_build_id,
    local_cache_root,
    read_build_id,
)

logger = logging.getLogger("pyisr.deploys")

BUILDS_DIR = "builds"
MANIFEST = "manifest.json"
PREVIOUS_FILE = "PREVIOUS_BUILD_ID"
IN_USE = "in-use.lock"
#: The pid of ``pyisr start``, which its worker processes inherit (for the switch hint).
START_PID_ENV = "PYISR_START_PID"
#: A build writes its pages to ``<cache root>/.staging-<id>`` and renames it into place.
STAGING_PREFIX = ".staging-"
_TRASH_PREFIX = ".trash-"
_REGISTRY_LOCK = ".lock"
#: What the layout before per-build namespaces kept at the top of the cache directory,
#: and beside it in ``.pyisr`` (a build's staging and retired directories).
_OLD_LAYOUT_NAMES = (*ENTRY_DIRS, LOCKS_DIR, TAG_LOG, TAG_LOG_LOCK)
_OLD_LAYOUT_DOT_PREFIXES = ("cache.building-", "cache.old-")


class BuildRemoved(RuntimeError):
    """The build a process meant to serve was removed (or never completed)."""


class NoPreviousBuild(RuntimeError):
    """There is no kept build to roll back to."""


# -- where things are -------------------------------------------------------------------


def dot_dir(site_dir: str | os.PathLike[str]) -> Path:
    return Path(site_dir).resolve() / DOT_DIR


def build_dir(site_dir: str | os.PathLike[str], build_id: str) -> Path:
    """The directory of one build's manifest and in-use lock."""
    if not is_valid_build_id(build_id):
        raise ValueError(f"invalid build id {build_id!r}")
    return dot_dir(site_dir) / BUILDS_DIR / build_id


def manifest_path(site_dir: str | os.PathLike[str], build_id: str) -> Path:
    return build_dir(site_dir, build_id) / MANIFEST


def read_manifest(site_dir: str | os.PathLike[str], build_id: str) -> dict[str, Any] | None:
    """The manifest of ``build_id``, or ``None`` if that build is not complete (or was removed)."""
    try:
        data = json.loads(manifest_path(site_dir, build_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("build_id") != build_id:
        return None
    return data


def current_manifest_path(site_dir: str | os.PathLike[str]) -> Path | None:
    """The manifest of the current build, ``None`` when there is no complete build to serve.

    A ``BUILD_ID`` without its ``builds/<id>/manifest.json`` was written by a pyisr
    before per-build namespaces: it is not served (build again).
    """
    build_id = read_build_id(site_dir)
    if build_id is None:
        return None
    path = manifest_path(site_dir, build_id)
    return path if path.is_file() else None


def read_previous_build_id(site_dir: str | os.PathLike[str]) -> str | None:
    try:
        text = (dot_dir(site_dir) / PREVIOUS_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text if is_valid_build_id(text) else None


def kept_builds(site_dir: str | os.PathLike[str]) -> list[str]:
    """The ids of the complete builds on disk, oldest first (what a rollback may choose from)."""
    found: list[tuple[float, str]] = []
    for path in _children(dot_dir(site_dir) / BUILDS_DIR):
        manifest = read_manifest(site_dir, path.name) if is_valid_build_id(path.name) else None
        if manifest is not None:
            found.append((float(manifest.get("created_at") or 0), path.name))
    return [build_id for _, build_id in sorted(found)]


def _cache_roots(site_dir: str | os.PathLike[str], config: Config) -> tuple[Path, Path | None]:
    """The default cache root (ours to tidy) and the configured local root, if another one."""
    default = default_cache_dir(site_dir)
    configured = local_cache_root(site_dir, config)
    return default, (configured if configured is not None and configured != default else None)


# -- publishing and rolling back ------------------------------------------------------------


@contextlib.contextmanager
def registry_lock(site_dir: str | os.PathLike[str], *, blocking: bool = True) -> Iterator[None]:
    """Changing which builds exist and which is current, one process at a time.

    Held for milliseconds (renames and small writes; directories are deleted after it is
    released). ``blocking=False`` raises ``BlockingIOError`` when another process holds it.
    """
    with exclusive_lock(dot_dir(site_dir) / BUILDS_DIR / _REGISTRY_LOCK, blocking=blocking):
        yield


def record_build(site_dir: str | os.PathLike[str], build_id: str, manifest: dict[str, Any]) -> None:
    """Keep a finished build's manifest (and create its in-use lock), before anything points at it."""
    directory = build_dir(site_dir, build_id)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / IN_USE).touch()
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2).encode())


def publish_pages(staging: Path, namespace: Path) -> None:
    """Rename a build's staged cache directory into its namespace (one rename).

    Whatever a killed publish left at ``namespace`` is moved aside first (nobody serves
    a build before it is current). Call under :func:`registry_lock`.
    """
    if namespace.exists():
        _move_to_trash(namespace)
    os.rename(staging, namespace)


def make_current(site_dir: str | os.PathLike[str], build_id: str) -> None:
    """Point ``BUILD_ID`` at a recorded build; the build it replaces becomes the previous one.

    ``BUILD_ID`` is written last and atomically: a server starting at any instant sees
    the old build whole or the new one whole. Call under :func:`registry_lock`.
    """
    dot = dot_dir(site_dir)
    manifest = manifest_path(site_dir, build_id).read_bytes()
    current = read_build_id(site_dir)
    if current is not None and current != build_id and read_manifest(site_dir, current) is not None:
        atomic_write(dot / PREVIOUS_FILE, current.encode())
    atomic_write(dot / MANIFEST, manifest)
    atomic_write(dot / BUILD_ID_FILE, build_id.encode())


def rollback(site_dir: str | os.PathLike[str]) -> tuple[str | None, str]:
    """Make the previous build current again; returns (the build left, the build now current).

    The build left becomes the previous one, so rolling back twice rolls forward. Servers
    running keep their build; new worker processes (``kill -HUP``, or a restart) serve
    the one now current.
    """
    with registry_lock(site_dir):
        current, previous = read_build_id(site_dir), read_previous_build_id(site_dir)
        if previous is None or previous == current or read_manifest(site_dir, previous) is None:
            raise NoPreviousBuild(f"no previous build is kept in {dot_dir(site_dir) / BUILDS_DIR}")
        make_current(site_dir, previous)
    return current, previous


# -- which builds are in use ------------------------------------------------------------------


class BuildLease:
    """This process serves ``build_id``: a shared flock on the build's ``in-use.lock``.

    Held until :meth:`release` (or the process ends, or the object is collected), so the
    build's namespace and manifest are never removed under a server that serves them.
    """

    def __init__(self, site_dir: str | os.PathLike[str], build_id: str) -> None:
        self.build_id = build_id
        self._fd: int | None = None
        path = build_dir(site_dir, build_id) / IN_USE
        try:
            # Read-only is enough for flock, and works on a read-only deployment.
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise BuildRemoved(f"build {build_id} is not on disk any more: start again") from None
        except OSError as exc:
            logger.warning("cannot mark build %s as in use (%s): a cleanup could remove it", build_id, exc)
            return
        try:
            # Blocks only while a cleanup holds it (milliseconds: it renames, then lets go).
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not still_named(fd, path):
                raise BuildRemoved(f"build {build_id} was removed while this process started: start again")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        """Let the build go (a later cleanup may remove it unless it is current or previous)."""
        if self._fd is not None:
            self._fd = None
            self._finalizer()


@contextlib.contextmanager
def if_unused(lock_path: Path) -> Iterator[bool]:
    """Yield whether nobody holds ``lock_path`` (holding it exclusively meanwhile).

    A missing build directory means nobody can hold it; it is not created.
    """
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


# -- removing what nobody uses ------------------------------------------------------------------


def remove_unused_builds(site_dir: str | os.PathLike[str], config: Config, *, wait: bool = True) -> list[str]:
    """Remove builds other than the current and the previous one that no process serves.

    Also removes what the layout before per-build namespaces left (``cache/entries``,
    ``cache.old-*``...), which no server of this version reads. With ``wait=False`` (a
    server starting) it does nothing if another process is at it. Returns the ids removed.
    Directories are moved aside under the registry lock and deleted after it is released.
    """
    default_root, configured_root = _cache_roots(site_dir, config)
    builds = dot_dir(site_dir) / BUILDS_DIR
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(registry_lock(site_dir, blocking=wait))
        except BlockingIOError:
            return []
        keep = {read_build_id(site_dir), read_previous_build_id(site_dir), UNBUILT}
        registered = {p.name for p in _children(builds) if p.is_dir()}
        # Under .pyisr every namespace is ours; in a configured directory only the builds
        # this site recorded are (another site may share it).
        candidates = registered | {p.name for p in _children(default_root) if p.is_dir()}
        removed: list[str] = []
        for build_id in sorted(candidates - keep):
            if not is_valid_build_id(build_id):
                continue
            with if_unused(builds / build_id / IN_USE) as unused:
                if not unused:
                    continue
                roots = [default_root] + ([configured_root] if configured_root is not None else [])
                for directory in (builds / build_id, *(root / build_id for root in roots)):
                    _move_to_trash(directory)
            removed.append(build_id)
        _retire_old_layout(dot_dir(site_dir), [r for r in (default_root, configured_root) if r is not None])
    for parent in (builds, default_root, configured_root):
        if parent is not None:
            _empty_trash(parent)
    if removed:
        logger.info("removed unused builds: %s", ", ".join(removed))
    return removed


def remove_stale_staging(site_dir: str | os.PathLike[str], config: Config) -> None:
    """The pages of builds killed midway. Only a build calls it, holding the build lock."""
    for root in _cache_roots(site_dir, config):
        if root is None:
            continue
        for path in _children(root):
            if path.name.startswith(STAGING_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def _retire_old_layout(dot: Path, roots: list[Path]) -> None:
    """Move aside the entries of the layout before per-build namespaces (a one-time migration).

    Only from a directory that was such a cache (its tag log says so): a configured
    directory may hold anything else too.
    """
    for root in roots:
        if not _was_a_cache_root(root):
            continue
        for name in _OLD_LAYOUT_NAMES:
            path = root / name
            if path.is_dir():
                _move_to_trash(path)
            else:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    path.unlink()
        for path in root.glob(f".{TAG_LOG}.*.tmp") if root.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    for path in _children(dot):
        if path.name.startswith(_OLD_LAYOUT_DOT_PREFIXES) and path.is_dir():
            _move_to_trash(path, into=dot / BUILDS_DIR)


def _was_a_cache_root(root: Path) -> bool:
    """Whether ``root`` holds a file-system cache's own tag log (its first line names the log)."""
    try:
        with open(root / TAG_LOG, "rb") as f:
            head = json.loads(f.readline(4096))
    except (OSError, ValueError):
        return False
    return isinstance(head, dict) and "log" in head


def _move_to_trash(path: Path, *, into: Path | None = None) -> None:
    """Rename ``path`` out of everybody's way (instant); :func:`_empty_trash` deletes it."""
    parent = into if into is not None else path.parent
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, parent / f"{_TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}")


def _empty_trash(parent: Path) -> None:
    for path in _children(parent):
        if path.name.startswith(_TRASH_PREFIX):
            shutil.rmtree(path, ignore_errors=True)


def _children(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


# -- telling a server that a newer build exists ------------------------------------------------


def switch_hint() -> str:
    """How an operator moves this server to the current build."""
    parent = multiprocessing.parent_process()
    pid = os.environ.get(START_PID_ENV) or (parent.pid if parent is not None else os.getpid())
    return (
        f"`kill -HUP {pid}` (the `pyisr start` process) starts workers on it and lets these "
        "finish, or restart the server"
    )


class BuildWatcher:
    """Notices, by polling ``BUILD_ID``'s stat every few seconds, that another build is current.

    It only logs (once per build id): the process keeps serving the build it started
    with. A ``stat`` costs microseconds and runs on a timer, never on a request.
    """

    def __init__(self, site_dir: str | os.PathLike[str], serving: str, *, interval: float = 2.0) -> None:
        self.site_dir = Path(site_dir).resolve()
        self.serving = serving
        self.interval = interval
        #: The current build as last seen on disk (the one this process serves, at first).
        self.newest: str | None = serving
        self._path = self.site_dir / DOT_DIR / BUILD_ID_FILE
        self._seen: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def check(self) -> str | None:
        """Look at ``BUILD_ID`` now; log if it names a build not seen before. Returns it."""
        try:
            st = os.stat(self._path)
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            seen = None
        if seen == self._seen:
            return self.newest
        self._seen = seen
        current = read_build_id(self.site_dir)
        if current is not None and current != self.newest:
            self.newest = current
            if current != self.serving:
                logger.warning(
                    "build %s is now the current build of %s; this process still serves build %s. "
                    "To serve it: %s.",
                    current,
                    self.site_dir,
                    self.serving,
                    switch_hint(),
                )
        return self.newest

    def start(self) -> None:
        """Check now, then every ``interval`` seconds on the running loop."""
        self.check()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pyisr-build-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - a watcher must never take the server down
                logger.debug("checking %s failed: %s", self._path, exc)
