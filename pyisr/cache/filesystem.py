"""``FileSystemCache``: the default handler, a directory several worker processes share.

Where each key's files live, and the rules that keep any key addressable, are in
:mod:`pyisr.cache.fs_layout`; the tag manifest (an append-only log) is in
:mod:`pyisr.cache.fs_taglog`; flock, temporary files and fsync are in
:mod:`pyisr.cache.files`. This module stores and reads entries.

Consistency: a write puts body and metadata in temporary files in the target
directory, fsyncs both, then renames the body and then the metadata into place,
all under the key's ``.write`` flock (which also makes the ``created_at`` fencing
check atomic across processes). A reader checks that the body matches the size and
digest the metadata records; a mismatch means it raced a writer (or a writer was
killed between its two renames), so it reads again under the key's flock and, if
still inconsistent, completes the dead writer's rename from its fsynced temporary
metadata. Readers therefore never see a torn entry. Temporary files are named
``.<final name>.<token>.tmp``; readers and ``keys`` ignore them and
``sweep_temp_files`` removes those a killed writer left.

Regeneration locks are non-blocking flocks on ``locks/<sha1>.lock``: the OS frees one
if its holder dies. POSIX only (``fcntl.flock``). Lock files are small and never
removed (removing a lock file another process has open would let two processes hold
the "same" lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from pyisr.cache.entry import CacheEntry, make_etag
from pyisr.cache.files import (
    TEMP_SUFFIX,
    exclusive_lock,
    fsync_dir,
    read_file,
    write_temp,
)
from pyisr.cache.fs_layout import (
    ENTRY_DIRS,
    LOCKS_DIR,
    EntryFiles,
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


# -- does a pair of files form an entry ---------------------------------------------------


def _body_digest(meta: Mapping[str, Any]) -> Any:
    return meta.get("body_etag") or meta.get("etag")


def _consistent(meta: Mapping[str, Any], body: bytes) -> bool:
    """True when ``body`` is exactly the body ``meta`` was written with."""
    try:
        size = int(meta["size"])
    except (KeyError, TypeError, ValueError):
        return False
    return size == len(body) and make_etag(body) == _body_digest(meta)


class _Torn(Exception):
    """Metadata and body disagree, or the metadata is unreadable."""


def _load_meta(data: bytes | None) -> dict[str, Any] | None:
    """Parsed metadata, or ``None`` if absent; raises ``_Torn`` if not a JSON object."""
    if data is None:
        return None
    try:
        meta = json.loads(data)
    except ValueError as exc:
        raise _Torn from exc
    if not isinstance(meta, dict):
        raise _Torn
    return meta


def _build(key: str, meta: dict[str, Any], body: bytes | None) -> CacheEntry | None:
    """The entry from its two files; raises ``_Torn`` unless they belong together."""
    if meta.get("key") != key:
        return None  # another key shares the path (case-insensitive file system)
    if body is None or not _consistent(meta, body):
        raise _Torn
    try:
        return CacheEntry.from_meta(meta, body)
    except (ValueError, KeyError, TypeError) as exc:
        raise _Torn from exc


def _needs_repair(key: str, slot: EntryFiles) -> bool:
    """True when the files of ``key`` do not form an entry (a writer died mid-way)."""
    body = read_file(slot.body)
    try:
        meta = _load_meta(read_file(slot.meta))
        if meta is None:
            return body is not None  # a first write that died between its renames
        _build(key, meta, body)
    except _Torn:
        return True
    return False


def _try_load_meta(data: bytes | None) -> dict[str, Any] | None:
    """Parsed metadata, ``None`` if absent or unreadable (for best-effort callers)."""
    try:
        return _load_meta(data)
    except _Torn:
        return None


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

    def _io(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run blocking file I/O on this cache's own threads (made per process: a forked
        worker inherits none)."""
        if self._io_pool is None or self._io_pid != os.getpid():
            self._io_pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="pyisr-cache-io")
            self._io_pid = os.getpid()
        return asyncio.get_running_loop().run_in_executor(self._io_pool, fn, *args)

    # -- entries ------------------------------------------------------------------------

    def slot(self, key: str) -> EntryFiles:
        """The body and metadata paths of ``key`` (for tools and tests)."""
        return key_to_slot(self.root, key)

    async def get(self, key: str) -> CacheEntry | None:
        """The entry, checked against its metadata; re-read under the key's lock if torn."""
        slot = self.slot(key)
        try:
            meta = _load_meta(read_file(slot.meta))
            if meta is None:
                return None
            size = meta.get("size")
            if isinstance(size, int) and size >= THREADED_READ_BYTES:
                body = await self._io(read_file, slot.body)
            else:
                body = read_file(slot.body)
            return _build(key, meta, body)
        except _Torn:
            # Raced a writer, or a writer died between its renames: wait for the key's lock.
            return await self._io(self._get_locked, key, slot)

    def _get_locked(self, key: str, slot: EntryFiles) -> CacheEntry | None:
        with self._write_lock(key):
            for attempt in range(2):
                try:
                    meta = _load_meta(read_file(slot.meta))
                    return None if meta is None else _build(key, meta, read_file(slot.body))
                except _Torn:
                    if attempt or not self._roll_forward(key, slot):
                        break
        logger.warning("pyisr: cache entry %r at %s is inconsistent; treating it as missing", key, slot.meta)
        return None

    def _roll_forward(self, key: str, slot: EntryFiles) -> bool:
        """Finish a write killed between renaming its body and its metadata.

        Its temporary metadata was fsynced before the body was renamed, so if one
        matches the body on disk, renaming it into place completes that write. Caller
        holds the key's write lock.
        """
        body = read_file(slot.body)
        if body is None:
            return False
        best: tuple[float, Path] | None = None
        try:
            names = [e.name for e in os.scandir(slot.dir)]
        except FileNotFoundError:
            return False
        for name in names:
            if not (name.startswith(slot.meta_temp_prefix) and name.endswith(TEMP_SUFFIX)):
                continue
            path = slot.dir / name
            meta = _try_load_meta(read_file(path))
            if meta is None or meta.get("key") != key or not _consistent(meta, body):
                continue
            try:
                created = float(meta["created_at"])
            except (KeyError, TypeError, ValueError):
                continue
            if best is None or created > best[0]:
                best = (created, path)
        if best is None:
            return False
        os.replace(best[1], slot.meta)
        if self.fsync:
            fsync_dir(slot.dir)
        logger.warning("pyisr: completed an interrupted write of cache entry %r", key)
        return True

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
        body = bytes(entry.body)
        meta = entry.meta_json()
        digest = make_etag(body)
        if entry.etag != digest:  # a custom ETag: keep our own digest for the torn check
            meta["body_etag"] = digest
        meta_bytes = json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode()
        if self.staging:
            return self._set_staged(slot, body, meta_bytes)
        with self._write_lock(entry.key):
            current = _try_load_meta(read_file(slot.meta))
            if current is not None and current.get("key") == entry.key:
                # A torn pair (a writer died between renames) is completed first, so the
                # fencing below compares with what was really stored last.
                if not self._body_size_matches(slot, current) and self._roll_forward(entry.key, slot):
                    current = _try_load_meta(read_file(slot.meta))
                stored_at = current.get("created_at") if current is not None else None
                if isinstance(stored_at, int | float) and stored_at > entry.created_at:
                    return False
            slot.dir.mkdir(parents=True, exist_ok=True)
            token = secrets.token_hex(6)
            temps: list[Path] = []
            body_in_place = False
            try:
                temps.append(write_temp(slot.dir, slot.body.name, body, token, self.fsync))
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
        return True

    def _set_staged(self, slot: EntryFiles, body: bytes, meta_bytes: bytes) -> bool:
        """Write straight into place: body first, so a meta file always has its body."""
        for attempt in (0, 1):
            try:
                with open(slot.body, "wb") as f:
                    f.write(body)
                break
            except FileNotFoundError:
                if attempt:
                    raise
                slot.dir.mkdir(parents=True, exist_ok=True)
        with open(slot.meta, "wb") as f:
            f.write(meta_bytes)
        return True

    @staticmethod
    def _body_size_matches(slot: EntryFiles, meta: Mapping[str, Any]) -> bool:
        try:
            return os.stat(slot.body).st_size == meta.get("size")
        except FileNotFoundError:
            return False

    def _write_lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        """Held while ``key``'s files are compared and replaced, so writers and repairs take turns."""
        return exclusive_lock(write_lock_path(self.root, key), blocking=True)

    async def delete(self, key: str) -> None:
        """Remove both files, metadata first so the entry vanishes in one step."""
        await self._io(self._delete_sync, key)

    def _delete_sync(self, key: str) -> None:
        slot = self.slot(key)
        with self._write_lock(key):
            meta = _try_load_meta(read_file(slot.meta))
            if meta is not None and meta.get("key") != key:
                return  # the files belong to another key (case-insensitive file system)
            for path in (slot.meta, slot.body):
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    path.unlink()

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
                    meta = _try_load_meta(read_file(Path(dirpath, name)))
                    if meta is not None and isinstance(meta.get("key"), str):
                        if meta["key"].startswith(prefix):
                            found.append(meta["key"])
        return found

    async def sweep_temp_files(self, older_than: float = 60) -> int:
        """Remove temporary files left by killed writers; returns how many were handled.

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
        return handled

    def _sweep_one(self, path: Path, cutoff: float) -> int:
        try:
            if path.stat().st_mtime > cutoff:
                return 0
        except FileNotFoundError:
            return 0
        if ".json." in path.name:
            meta = _try_load_meta(read_file(path))
            if meta is not None and isinstance(meta.get("key"), str):
                key = meta["key"]
                slot = self.slot(key)
                if slot.dir == path.parent:
                    with self._write_lock(key):
                        if _needs_repair(key, slot) and self._roll_forward(key, slot) and not path.exists():
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
            flock.enter_context(exclusive_lock(regeneration_lock_path(self.root, key), blocking=False))
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
        """Root and lock count; no directory walk, which could be slow on a big cache."""
        return {
            "handler": self.name,
            "root": str(self.root),
            "locks_held": len(self._held),
            "tag_log_bytes": self._tag_log.bytes_read,
        }
