"""``FileSystemCache``: the default handler, a directory several worker processes share.

Where each key's files live, and the rules that keep any key addressable, are in
:mod:`pyisr.cache.fs_layout`; the tag manifest (an append-only log) is in
:mod:`pyisr.cache.fs_taglog`; flock, temporary files and fsync are in
:mod:`pyisr.cache.files`. This module stores and reads entries.

Consistency: a write puts body and metadata in temporary files in the target
directory, fsyncs both, then renames the body and then the metadata into place,
all under the key's ``.write`` flock (which also makes the ``created_at`` fencing
check atomic across processes). A reader checks that the body is the file the
metadata records (its inode, size and mtime: no digest of the body; see
:mod:`pyisr.cache.fs_entry` for why that suffices, and when the digest is checked
instead); a mismatch means it raced a writer (or a writer was
killed between its two renames), so it reads again under the key's flock and, if
still inconsistent, completes the dead writer's rename from its fsynced temporary
metadata. Readers therefore never see a torn entry. Temporary files are named
``.<final name>.<token>.tmp``; readers and ``keys`` ignore them and
``sweep_temp_files`` removes those a killed writer left. An entry's stored encodings
(:mod:`pyisr.compression`) follow its body in the same body file, so all of the above
holds for them unchanged (:mod:`pyisr.cache.fs_entry`).

Regeneration locks are non-blocking flocks on ``locks/<sha1>.lock``: the OS frees one
if its holder dies. POSIX only (``fcntl.flock``). Their files are removed by their
holder on release, safely (see :mod:`pyisr.cache.files`), and write locks are 256
files keys share (:func:`pyisr.cache.fs_layout.write_lock_path`), so lock files do not
pile up one per key ever locked.

The cache is capped (``max_bytes``, 1 GiB by default): everything under the root
counts, entries are evicted approximately least recently used first, negative results
(404) have a small share of their own, and entries a day past their ``expire`` go first;
:mod:`pyisr.cache.fs_budget` tells how. Evicting an entry is deleting it, under the
key's write lock, so it never tears an entry; reading an evicted key gives ``None``.
Directories a deletion leaves empty are removed, and a writer makes them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from pyisr.cache.activity import Activity, ActivityReport, Invalidation
from pyisr.cache.entry import CacheEntry, EntrySummary, make_etag
from pyisr.cache.files import (
    TEMP_SUFFIX,
    exclusive_lock,
    fsync_dir,
    make_dirs,
    read_file,
    remove_empty_dirs,
    write_temp,
)
from pyisr.cache.fs_activity import ActivityFiles, lock_is_held
from pyisr.cache.fs_budget import NEGATIVE_STATUS, DiskBudget, expires_at
from pyisr.cache.fs_entry import (
    ReadInThread,
    Torn,
    body_matches,
    file_bytes,
    file_size,
    needs_repair,
    read_entry,
    read_summary,
    roll_forward,
    stamp,
    try_load_meta,
)
from pyisr.cache.fs_layout import (
    ENTRY_DIRS,
    LOCKS_DIR,
    EntryFiles,
    is_regeneration_lock,
    key_to_slot,
    listing_dirs,
    regeneration_lock_path,
    write_lock_path,
)
from pyisr.cache.fs_taglog import TAG_LOG_COMPACT_BYTES, TagLog
from pyisr.cache.handler import CacheHandler

logger = logging.getLogger("pyisr.cache.filesystem")

T = TypeVar("T")

#: Bodies at least this large are read in a thread rather than on the event loop.
THREADED_READ_BYTES = 256 * 1024
#: Threads of one cache's file I/O (writes with their fsyncs, big reads, listings). Its
#: own, never the event loop's default executor nor the render threads: hung page
#: functions must not make the cache wait, and the cache must not take a render's thread.
IO_THREADS = 8


def _log_failure(future: Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        exc = future.exception()
        logger.error("pyisr: cache maintenance failed: %r", exc, exc_info=exc)


def _remove_if_unheld(lock_file: Path) -> None:
    """Remove a lock file nobody holds, by taking it the way its users do (see ``files``)."""
    with contextlib.suppress(OSError), exclusive_lock(lock_file, blocking=False, remove=True):
        pass


class FileSystemCache(CacheHandler):
    """Entries as browsable files, a shared tag log and flock-based locks (see module doc)."""

    name = "filesystem"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: bool = True,
        tag_log_compact_bytes: int = TAG_LOG_COMPACT_BYTES,
        staging: bool = False,
        max_bytes: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.fsync = fsync
        #: The directory is private to this one writer until it is published (renamed into
        #: place, as ``pyisr build`` does): nobody reads it meanwhile and a crash only
        #: leaves a directory nobody serves, so writes need no lock, no fencing read and
        #: no temporary files. Cuts a prerendered page's write from ~9 system calls to ~4.
        self.staging = staging
        self._staging_writer: ThreadPoolExecutor | None = None
        self._io_pool: ThreadPoolExecutor | None = None
        self._io_pid = -1
        self._tag_log = TagLog(self.root, fsync=fsync, compact_bytes=tag_log_compact_bytes)
        #: Regeneration locks held by this object: key -> (the held flock, token, monotonic expiry).
        self._held: dict[str, tuple[contextlib.ExitStack, str, float]] = {}
        self._check_root()
        #: What the cache holds on disk and what to evict (``None``: the 1 GiB default).
        self.budget = DiskBudget(self.root, max_bytes)
        self._maintenance: Future[int] | None = None
        self._maintenance_lock = threading.Lock()
        self._closed = False

    def _check_root(self) -> None:
        """Fail at start-up, naming the directory, rather than on the first request."""
        try:
            for sub in (*ENTRY_DIRS, LOCKS_DIR):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self._tag_log.ensure()
            if not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "Permission denied")
            os.listdir(self.root)
        except OSError as exc:
            raise type(exc)(
                exc.errno,
                f"pyisr cache directory is not usable ({exc.strerror}); check that it exists "
                "and is readable and writable by this process",
                str(self.root),
            ) from exc

    def _pool(self) -> ThreadPoolExecutor:
        """This cache's own I/O threads (made per process: a forked worker inherits none)."""
        if self._io_pool is None or self._io_pid != os.getpid():
            self._io_pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="pyisr-cache-io")
            self._io_pid = os.getpid()
        return self._io_pool

    def _io(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run blocking file I/O on this cache's own threads."""
        return asyncio.get_running_loop().run_in_executor(self._pool(), fn, *args)

    # -- entries ------------------------------------------------------------------------

    def slot(self, key: str) -> EntryFiles:
        """The body and metadata paths of ``key`` (for tools and tests)."""
        return key_to_slot(self.root, key)

    async def get(self, key: str) -> CacheEntry | None:
        """The entry, checked against its metadata (:func:`~pyisr.cache.fs_entry.read_entry`:
        no digest of the body when its files are the ones written together); re-read under
        the key's lock if torn."""
        slot = self.slot(key)
        try:
            try:
                entry = read_entry(key, slot, inline_limit=THREADED_READ_BYTES)
            except ReadInThread:
                entry = await self._io(read_entry, key, slot)
        except Torn:
            # Raced a writer, or a writer died between its renames: wait for the key's lock.
            entry = await self._io(self._get_locked, key, slot)
        if entry is not None:
            self.budget.touch(key)
        return entry

    async def summary(self, key: str) -> EntrySummary | None:
        """``key``'s metadata file and a ``stat`` of its body, never the body (a listing's
        read: :func:`~pyisr.cache.fs_entry.read_summary`). Not counted as a use for eviction."""
        return read_summary(key, self.slot(key))

    def touch(self, key: str) -> None:
        """Count ``key`` as used now, for eviction; no I/O. ``get`` does it; a memory tier
        serving ``key`` from its own copy may call it too."""
        self.budget.touch(key)

    def _get_locked(self, key: str, slot: EntryFiles) -> CacheEntry | None:
        with self._write_lock(key):
            for attempt in range(2):
                try:
                    return read_entry(key, slot)
                except Torn:
                    if attempt or not self._roll_forward(key, slot):
                        break
        logger.warning("pyisr: cache entry %r at %s is inconsistent; treating it as missing", key, slot.meta)
        return None

    def _roll_forward(self, key: str, slot: EntryFiles) -> bool:
        return roll_forward(key, slot, fsync=self.fsync)

    async def set(self, entry: CacheEntry) -> bool:
        """Store ``entry`` unless a newer one is stored (fsync blocks, so in a thread)."""
        if self.staging:
            # One writer thread: file creations in one directory serialise in the kernel
            # anyway, and fewer threads contend less for the GIL.
            if self._staging_writer is None:
                self._staging_writer = ThreadPoolExecutor(1, thread_name_prefix="pyisr-build-writer")
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._staging_writer, self._set_sync, entry)
        return await self._io(self._set_sync, entry)

    def _set_sync(self, entry: CacheEntry) -> bool:
        slot = self.slot(entry.key)
        body = file_bytes(entry)  # the body, then its encodings (fs_entry's docstring)
        meta = entry.meta_json()
        digest = make_etag(body)
        if entry.etag != digest:  # a custom ETag, or encodings: our own digest for the torn check
            meta["body_etag"] = digest
        if self.staging:
            return self._set_staged(slot, body, meta)
        # The body file's stamp (fs_entry.stamp) adds about as many bytes as these.
        meta_bytes = json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode()
        size = self.budget.entry_size(len(body), len(meta_bytes) + 48)
        self.budget.make_room(entry.key, size, entry.status == NEGATIVE_STATUS, self._evict_sync)
        with self._write_lock(entry.key):
            current = try_load_meta(read_file(slot.meta))
            if current is not None and current.get("key") == entry.key:
                # A torn pair (a writer died between renames) is completed first, so the
                # fencing below compares with what was really stored last.
                if not body_matches(slot, current):
                    if self._roll_forward(entry.key, slot):
                        current = try_load_meta(read_file(slot.meta))
                    else:
                        # Nothing completes it: remove the metadata, so it never pairs with
                        # a body that reuses its recorded inode (fs_entry's docstring).
                        with contextlib.suppress(FileNotFoundError):
                            slot.meta.unlink()
                        current = None
                stored_at = current.get("created_at") if current is not None else None
                if isinstance(stored_at, int | float) and stored_at > entry.created_at:
                    return False
            token = secrets.token_hex(6)
            temps: list[Path] = []
            body_in_place = False
            try:
                temps.append(self._first_temp(slot, body, token))
                stamp(meta, os.stat(temps[0]))
                meta_bytes = json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode()
                temps.append(write_temp(slot.dir, slot.meta.name, meta_bytes, token, self.fsync))
                os.replace(temps[0], slot.body)
                body_in_place = True
                os.replace(temps[1], slot.meta)
            except BaseException:
                # Once the body is in place, its metadata temp is what a reader finishes from.
                for path in [] if body_in_place else temps:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                raise
            if self.fsync:
                fsync_dir(slot.dir)
            self.budget.record(entry.key, size, status=entry.status, expires=entry.expires_at())
        self._after_write()
        return True

    def _first_temp(self, slot: EntryFiles, body: bytes, token: str) -> Path:
        """Write the body's temporary file, making the key's directories when missing (never
        made yet, or removed by a deletion that left them empty, even between two tries)."""
        for attempt in range(5):
            try:
                return write_temp(slot.dir, slot.body.name, body, token, self.fsync)
            except FileNotFoundError:
                if attempt == 4:
                    raise
                with contextlib.suppress(FileNotFoundError):
                    self._make_dirs(slot.dir)
        raise AssertionError("unreachable")

    def _make_dirs(self, directory: Path) -> None:
        self.budget.adjust_other(make_dirs(directory) * self.budget.block)

    def _prune_dirs(self, directory: Path) -> None:
        """Remove the directories a deletion left empty, but never ``entries/``, ``data/``
        or ``long/``; a writer racing this makes them again (``_first_temp``)."""
        self.budget.adjust_other(-remove_empty_dirs(directory, keep=self.root) * self.budget.block)

    def _after_write(self) -> None:
        """Start the budget's background task if it has work and is not running already."""
        if not self.budget.maintenance_due():
            return
        with self._maintenance_lock:
            if self._maintenance is None or self._maintenance.done():
                self._maintenance = self._background(self._maintain_sync)

    def _evict_sync(self, key: str, expired_at: float | None = None) -> bool:
        return self._delete_sync(key, expired_at, evicting=True)

    def _maintain_sync(self, thorough: bool = False) -> int:
        return self.budget.maintain(self._evict_sync, thorough=thorough)

    async def evict(self) -> int:
        """Bring the cache within its budget now (scan if due, expired entries, then least
        recently used); returns how many entries were deleted. Writes start this by
        themselves in the background; this is for tools and tests."""
        running = self._maintenance
        if running is not None and not running.done():  # let it finish what it picked
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(running)
        return await self._io(self._maintain_sync, True)

    def _background(self, fn: Callable[..., T], *args: Any) -> Future[T] | None:
        """Run ``fn`` on the I/O threads without anyone waiting for it; failures are logged.
        Nothing starts once the cache is closed (its threads are going away)."""
        if self._closed:
            return None
        future = self._pool().submit(fn, *args)
        future.add_done_callback(_log_failure)
        return future

    def _set_staged(self, slot: EntryFiles, body: bytes, meta: dict[str, Any]) -> bool:
        """Write straight into place: body first, so a meta file always has its body.

        The body is always a new file (a rewrite removes the old pair, metadata first),
        so the stamp its metadata records names it alone (:mod:`pyisr.cache.fs_entry`).
        """
        for attempt in range(3):
            try:
                with open(slot.body, "xb") as f:
                    f.write(body)
                    f.flush()
                    stamp(meta, os.fstat(f.fileno()))
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
                slot.dir.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                if attempt == 2:
                    raise
                for path in (slot.meta, slot.body):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
        with open(slot.meta, "wb") as f:
            f.write(json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode())
        return True

    def _write_lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        """Held while ``key``'s files are compared and replaced, so writers and repairs take turns."""
        return exclusive_lock(write_lock_path(self.root, key), blocking=True)

    async def delete(self, key: str) -> None:
        """Remove both files, metadata first so the entry vanishes in one step."""
        await self._io(self._delete_sync, key)

    def _delete_sync(self, key: str, expired_at: float | None = None, *, evicting: bool = False) -> bool:
        """Delete ``key``'s files (True if there were any); with ``expired_at``, only an entry
        expired by then, so a fresher one written meanwhile stays (eviction's fence).

        ``evicting`` skips reading the metadata when nothing needs it: on a file system
        that folds case, the files may hold another key's entry, and evicting that one
        instead is as good (it is rendered again when asked).
        """
        slot = self.slot(key)
        removed = False
        with self._write_lock(key):
            data = read_file(slot.meta) if expired_at is not None or not evicting else None
            meta = try_load_meta(data)
            if meta is not None and meta.get("key") != key:
                self.budget.forget(key)
                return False  # the files belong to another key (case-insensitive file system)
            if expired_at is not None and meta is not None and data is not None:
                expires = expires_at(meta)
                if expires is None or expires > expired_at:
                    size = self.budget.entry_size(file_size(meta) or 0, len(data))
                    self.budget.record(key, size, status=meta.get("status", 200), expires=expires)
                    return False
            for path in (slot.meta, slot.body):
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    path.unlink()
                    removed = True
            self.budget.forget(key)
        if removed:
            self._prune_dirs(slot.dir)
        return removed

    # -- listing and maintenance ----------------------------------------------------------

    async def keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Every stored key starting with ``prefix``, read from the metadata files."""
        for key in await self._io(self._keys_sync, prefix):
            yield key

    def _keys_sync(self, prefix: str) -> list[str]:
        found: list[str] = []
        for top in listing_dirs(self.root, prefix):
            for dirpath, _dirs, files in os.walk(top):
                for name in files:
                    if name.startswith(".") or not name.endswith(".json"):
                        continue
                    meta = try_load_meta(read_file(Path(dirpath, name)))
                    if meta is not None and isinstance(meta.get("key"), str):
                        if meta["key"].startswith(prefix):
                            found.append(meta["key"])
        return found

    async def sweep_temp_files(self, older_than: float = 60) -> int:
        """Remove temporary files left by killed writers; returns how many were handled.

        Regeneration lock files a killed holder could not remove go too (those nobody
        holds; not counted).

        A temporary metadata file whose write died between its two renames is renamed
        into place instead of removed. Files younger than ``older_than`` seconds may
        belong to a live writer and are left alone.
        """
        return await self._io(self._sweep_sync, older_than)

    def _sweep_sync(self, older_than: float) -> int:
        cutoff = time.time() - older_than
        handled = 0
        for top in (self.root / name for name in ENTRY_DIRS):
            for dirpath, _dirs, files in os.walk(top):
                for name in files:
                    if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                        handled += self._sweep_one(Path(dirpath, name), cutoff)
        with os.scandir(self.root) as it:
            for item in it:
                if item.name.startswith(".") and item.name.endswith(TEMP_SUFFIX):
                    handled += self._sweep_one(Path(item.path), cutoff)
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root / LOCKS_DIR) as it:
            for item in it:
                if is_regeneration_lock(item.name):
                    _remove_if_unheld(Path(item.path))
        return handled

    def _sweep_one(self, path: Path, cutoff: float) -> int:
        try:
            if path.stat().st_mtime > cutoff:
                return 0
        except FileNotFoundError:
            return 0
        if ".json." in path.name:
            meta = try_load_meta(read_file(path))
            if meta is not None and isinstance(meta.get("key"), str):
                key = meta["key"]
                slot = self.slot(key)
                if slot.dir == path.parent:
                    with self._write_lock(key):
                        if needs_repair(key, slot) and self._roll_forward(key, slot) and not path.exists():
                            return 1
        try:
            path.unlink()
        except FileNotFoundError:
            return 0
        return 1

    # -- tags ----------------------------------------------------------------------------

    async def revalidate_tags(self, tags: Iterable[str], at: float) -> None:
        """Append one line to the tag log (more only for huge batches), then fsync it."""
        tags = [str(t) for t in tags]
        if not tags:
            return
        await self._io(self._tag_log.append, tags, at)
        self._tag_log.mirror.record(tags, at)

    def compact_tag_log(self) -> bool:
        """Rewrite the tag log with one line per tag (its latest time); True if rewritten.

        Appends do this by themselves past ``tag_log_compact_bytes``.
        """
        return self._tag_log.compact()

    async def tag_times(self, tags: Iterable[str]) -> Mapping[str, float]:
        """Latest times from the in-process mirror, after reading any new log lines."""
        return self._tag_log.times(tags)

    async def tag_changes(self, cursor: Any) -> tuple[Any, Mapping[str, float]] | None:
        """Tag times from lines appended after ``cursor`` (see :mod:`pyisr.cache.fs_taglog`)."""
        return self._tag_log.changes(cursor)

    # -- regeneration lock -----------------------------------------------------------------

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        """A non-blocking flock on ``locks/<sha1>.lock``; the OS frees it if we die."""
        now = time.monotonic()
        held = self._held.get(key)
        if held is not None:
            if held[2] > now:
                return None
            # Our own holder overran its ttl: take the lock over.
            del self._held[key]
            held[0].close()
        flock = contextlib.ExitStack()
        try:
            path = regeneration_lock_path(self.root, key)
            flock.enter_context(exclusive_lock(path, blocking=False, remove=True))
        except BlockingIOError:
            return None
        token = secrets.token_hex(8)
        self._held[key] = (flock, token, now + ttl)
        return token

    async def release_lock(self, key: str, token: str) -> None:
        """Release only if ``token`` still holds it (not after a ttl takeover)."""
        held = self._held.get(key)
        if held is not None and held[1] == token:
            del self._held[key]
            held[0].close()

    # -- lifecycle -----------------------------------------------------------------------

    async def close(self) -> None:
        """Close the descriptors of held regeneration locks, which releases them."""
        self._closed = True
        held, self._held = self._held, {}
        for flock, _token, _expires in held.values():
            with contextlib.suppress(OSError):
                flock.close()
        writer, self._staging_writer = self._staging_writer, None
        if writer is not None:
            writer.shutdown(wait=True)
        pool, self._io_pool = self._io_pool, None
        if pool is not None and self._io_pid == os.getpid():
            pool.shutdown(wait=False)  # nothing is waiting on it once the engine has drained

    def signing_key_home(self) -> Path | Literal["process"] | None:
        """A key file beside the cache directory, not in it.

        ``pyisr build`` replaces the cache directory by renaming a new one into place;
        a key inside it would change with every build and make every signed value
        unreadable. ``SITE/.pyisr/cache`` thus keeps its key in ``SITE/.pyisr/signing.key``.
        """
        return self.root.absolute().parent / "signing.key"

    def describe(self) -> dict[str, Any]:
        """Root, lock count, the cap and the bytes held (from the index: no directory walk,
        which could be slow on a big cache; ``bytes`` is ``None`` until the first write)."""
        budget = self.budget.describe()
        return {
            "handler": self.name,
            "root": str(self.root),
            "locks_held": len(self._held),
            "tag_log_bytes": self._tag_log.bytes_read,
            "max_bytes": budget.pop("max_bytes"),
            "bytes": budget.pop("bytes"),
            "budget": budget,
        }

    # -- activity: recent invalidations, hits, counts per minute (pyisr.cache.fs_activity) --

    @functools.cached_property
    def _activity_files(self) -> ActivityFiles:
        return ActivityFiles(self.root)

    async def record_invalidation(self, invalidation: Invalidation) -> None:
        """Append it to ``activity.log``, shared by every process using the directory."""
        grown = await self._io(self._activity_files.record_invalidation, invalidation)
        self.budget.adjust_other(grown)

    async def add_activity(self, report: ActivityReport, now: float) -> None:
        """Merge one process's hits and per-minute counts into ``activity.json``."""
        grown = await self._io(self._activity_files.add, report, now)
        self.budget.adjust_other(grown)

    async def activity(self, now: float) -> Activity:
        return await self._io(self._activity_files.read, now)

    async def is_locked(self, key: str) -> bool | None:
        """Whether any process holds ``key``'s regeneration lock (a non-blocking probe)."""
        return await self._io(lock_is_held, self.root, key)
