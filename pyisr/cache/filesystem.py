"""``FileSystemCache``: the default handler, a directory several worker processes share.

Layout under ``root`` (by default ``<site>/.pyisr/cache``)::

    entries/blog/1.html     body of key ``/blog/1``, raw bytes (open it in a browser)
    entries/blog/1.json     its metadata (``CacheEntry.meta_json()``)
    entries/index.html      key ``/``
    data/3f/a2....bin       data-cache value of key ``data:3fa2...`` (+ ``.json``)
    long/<h2>/<sha256>.bin  any key the readable mapping cannot hold (+ ``.json``)
    locks/<sha1>.lock       regeneration lock of a key (``acquire_lock``)
    locks/<sha1>.write      held while a key's files are compared and replaced
    tags.log                tag manifest: a header line, then one JSON line per invalidation
    tags.lock               appenders share it, compaction takes it exclusively

Key -> path mapping (page keys, which start with ``/``): the key is split on ``/``
and every segment becomes one path component, so ``/a`` (``a.html``) and ``/a/b``
(``a/b.html``) coexist. A segment is escaped with ``%XX`` (so the mapping stays
one-to-one and no component can be special to the OS):

* ``%``, ``\\``, NUL and the other control characters are always escaped (``%2F``
  in a key is therefore stored as ``%252F``);
* a leading ``.`` becomes ``%2E``, so ``.``, ``..`` and hidden names cannot occur
  (temporary files, which start with ``.``, never collide with an entry);
* a directory component ending in ``.html`` or ``.json`` has that dot escaped, so
  it cannot collide with an entry file;
* an empty segment (``/a//b``, a trailing ``/``) is stored as ``%``;
* the single-segment key ``/index`` is stored as ``%69ndex`` because ``index`` is
  the key ``/``.

Keys whose path would be too long (a component over 200 bytes, or the whole path
over 3,000 bytes), keys not starting with ``/`` and malformed ``data:`` keys are
stored under ``long/`` by the SHA-256 of the key. The metadata always holds the
exact key, which ``get`` checks and ``keys`` reports; the path is only an address.

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

Tag log: ``revalidate_tags`` is one ``O_APPEND`` write of a line shorter than 4 KB
(``{"t": [tags], "at": epoch}``), made under a shared flock on ``tags.lock``. Past
4 MB the log is rewritten with one line per tag under the exclusive flock, so no
append can go to the file being replaced. The first line carries a random id;
cursors are ``(id, offset)``, so a reader notices a replaced log even when the file
system reuses the inode number. A line without its newline is not read until it is
finished, and a corrupt line is skipped with a warning.

POSIX only (``fcntl.flock``). On a case-insensitive or Unicode-normalising file system
(macOS) keys differing only in case or normalisation share files, and ``get`` returns
``None`` for the one not stored last. Lock files are small and never removed (removing
a lock file another process has open would let two processes hold the "same" lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pyisr.cache.entry import CacheEntry, make_etag
from pyisr.cache.handler import CacheHandler

logger = logging.getLogger("pyisr.cache.filesystem")

#: Longest path component (bytes) the readable mapping uses; NAME_MAX is 255 and a
#: temporary name adds a dot, a suffix and a token.
MAX_SEGMENT_BYTES = 200
#: Longest relative path (bytes) the readable mapping uses, well under PATH_MAX.
MAX_PATH_BYTES = 3000
#: Tag log size above which it is rewritten with one line per tag.
TAG_LOG_COMPACT_BYTES = 4 * 1024 * 1024
#: Longest tag-log write; O_APPEND writes this small are not interleaved.
TAG_LINE_BYTES = 4000
#: Bodies at least this large are read in a thread rather than on the event loop.
THREADED_READ_BYTES = 256 * 1024

_DATA_KEY = re.compile(r"data:([0-9a-f]{3,128})")
_TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True, slots=True)
class EntryFiles:
    """Where one key lives: its directory, the body file and the metadata file."""

    dir: Path
    body: Path
    meta: Path

    @property
    def meta_temp_prefix(self) -> str:
        return f".{self.meta.name}."


# -- key -> path --------------------------------------------------------------------------


_UNSAFE_CHARS = re.compile(r"[%\\\x00-\x1f\x7f]")


def _escape_char(match: re.Match[str]) -> str:
    return f"%{ord(match.group()):02X}"


def _encode_segment(segment: str, *, final: bool) -> str:
    """One key segment as a path component (see the module docstring for the rules)."""
    if not segment:
        return "%"
    out = _UNSAFE_CHARS.sub(_escape_char, segment)
    if out[0] == ".":
        out = "%2E" + out[1:]
    if not final and out.endswith((".html", ".json")):
        out = out[:-5] + "%2E" + out[-4:]
    return out


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def _key_hash(key: str) -> str:
    """Lock-file name of a key: short, fixed length, any characters."""
    return hashlib.sha1(_key_bytes(key), usedforsecurity=False).hexdigest()


def _hashed_slot(root: Path, key: str) -> EntryFiles:
    digest = hashlib.sha256(_key_bytes(key)).hexdigest()
    directory = root / "long" / digest[:2]
    return EntryFiles(directory, directory / f"{digest}.bin", directory / f"{digest}.json")


def key_to_slot(root: Path, key: str) -> EntryFiles:
    """The files that hold ``key`` under ``root``; always inside ``root``."""
    match = _DATA_KEY.fullmatch(key)
    if match:
        digest = match.group(1)
        directory = root / "data" / digest[:2]
        return EntryFiles(directory, directory / f"{digest[2:]}.bin", directory / f"{digest[2:]}.json")
    if not key.startswith("/"):
        return _hashed_slot(root, key)
    if key == "/":
        directory = root / "entries"
        return EntryFiles(directory, directory / "index.html", directory / "index.json")
    segments = key[1:].split("/")
    parts = [_encode_segment(s, final=i == len(segments) - 1) for i, s in enumerate(segments)]
    if parts == ["index"]:
        parts = ["%69ndex"]
    try:
        sizes = [len(p.encode("utf-8")) for p in parts]
    except UnicodeEncodeError:  # lone surrogates: not a real path, keep it addressable
        return _hashed_slot(root, key)
    if max(sizes) > MAX_SEGMENT_BYTES or sum(sizes) + len(sizes) > MAX_PATH_BYTES:
        return _hashed_slot(root, key)
    directory = root.joinpath("entries", *parts[:-1])
    return EntryFiles(directory, directory / f"{parts[-1]}.html", directory / f"{parts[-1]}.json")


# -- small file helpers -------------------------------------------------------------------


def _read_file(path: Path) -> bytes | None:
    """The file's bytes, or ``None`` if it does not exist (other errors propagate)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` survive a power cut, not just a crashed process."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: Path, final_name: str, data: bytes, token: str, fsync: bool = True) -> Path:
    """Write ``data`` to a fresh temporary file beside ``final_name`` and fsync it."""
    path = directory / f".{final_name}.{token}{_TEMP_SUFFIX}"
    with open(path, "xb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return path


@contextlib.contextmanager
def _flocked(path: Path, mode: int) -> Iterator[int]:
    """Hold ``flock(mode)`` on ``path`` (created if needed); a fresh descriptor every time.

    flock belongs to the open file description, so separate descriptors conflict even
    inside one process (and across threads), and the OS drops it if the process dies.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:  # someone emptied the cache directory by hand
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


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
    body = _read_file(slot.body)
    try:
        meta = _load_meta(_read_file(slot.meta))
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


def _parse_tag_lines(data: bytes, source: object) -> tuple[dict[str, float], int]:
    """Latest time per tag in the complete lines of ``data``, and the bytes they span.

    Bytes after the last newline belong to a line still being written (or left by a
    killed writer) and are not consumed. Corrupt lines are skipped with a warning:
    one bad line must not stop every later invalidation from being seen.
    """
    end = data.rfind(b"\n") + 1
    times: dict[str, float] = {}
    for raw in data[:end].split(b"\n"):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            tags = record["t"]
            at = float(record["at"])
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise TypeError("'t' is not a list of strings")
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("pyisr: skipping corrupt line in %s (%s): %r", source, exc, raw[:200])
            continue
        for tag in tags:
            if at > times.get(tag, float("-inf")):
                times[tag] = at
    return times, end


def _tag_lines(tags: list[str], at: float) -> list[bytes]:
    """Invalidation records for ``tags``, each line short enough to append atomically."""
    lines: list[bytes] = []
    chunk: list[str] = []
    size = 0
    overhead = len(json.dumps({"t": [], "at": at}, separators=(",", ":"))) + 1
    for tag in tags:
        tag_size = len(json.dumps(tag, ensure_ascii=False).encode()) + 1
        if chunk and overhead + size + tag_size > TAG_LINE_BYTES:
            lines.append(_tag_line(chunk, at))
            chunk, size = [], 0
        chunk.append(tag)
        size += tag_size
    if chunk:
        lines.append(_tag_line(chunk, at))
    return lines


def _tag_line(tags: list[str], at: float) -> bytes:
    return json.dumps({"t": tags, "at": at}, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _log_header() -> bytes:
    """First line of a tag log: a record with no tags (so any parser accepts it) and a
    random id that tells a reader's cursor which file it points into."""
    return json.dumps({"t": [], "at": 0, "log": secrets.token_hex(8)}, separators=(",", ":")).encode() + b"\n"


def _log_id(head: bytes) -> str | None:
    line, newline, _rest = head.partition(b"\n")
    if not newline:
        return None
    try:
        log_id = json.loads(line).get("log")
    except (ValueError, AttributeError):
        return None
    return log_id if isinstance(log_id, str) else None


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    """Changes whenever the log is appended to or replaced."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


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
        self.tag_log_compact_bytes = tag_log_compact_bytes
        self._tags_path = self.root / "tags.log"
        self._tags_lock_path = self.root / "tags.lock"
        self._locks_dir = self.root / "locks"
        #: Regeneration locks held by this object: key -> (fd, token, monotonic expiry).
        self._held: dict[str, tuple[int, str, float]] = {}
        #: Mirror of the tag log: times, the cursor read up to, and the file state seen.
        self._tag_mirror: dict[str, float] = {}
        self._mirror_cursor: tuple[str, int] | None = None
        self._mirror_seen: tuple[int, ...] | None = None
        #: Do not compact again until the log reaches this size (a compaction that saves
        #: little would otherwise repeat on every append).
        self._compact_floor = 0
        self._check_root()

    def _check_root(self) -> None:
        """Fail at start-up, naming the directory, rather than on the first request."""
        try:
            for sub in ("entries", "data", "long", "locks"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self._ensure_tag_log()
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

    # -- entries ------------------------------------------------------------------------

    def slot(self, key: str) -> EntryFiles:
        """The body and metadata paths of ``key`` (for tools and tests)."""
        return key_to_slot(self.root, key)

    async def get(self, key: str) -> CacheEntry | None:
        """The entry, checked against its metadata; re-read under the key's lock if torn."""
        slot = self.slot(key)
        try:
            meta = _load_meta(_read_file(slot.meta))
            if meta is None:
                return None
            size = meta.get("size")
            if isinstance(size, int) and size >= THREADED_READ_BYTES:
                body = await asyncio.to_thread(_read_file, slot.body)
            else:
                body = _read_file(slot.body)
            return _build(key, meta, body)
        except _Torn:
            # Raced a writer, or a writer died between its renames: wait for the key's lock.
            return await asyncio.to_thread(self._get_locked, key, slot)

    def _get_locked(self, key: str, slot: EntryFiles) -> CacheEntry | None:
        with _flocked(self._write_lock_path(key), fcntl.LOCK_EX):
            for attempt in range(2):
                try:
                    meta = _load_meta(_read_file(slot.meta))
                    return None if meta is None else _build(key, meta, _read_file(slot.body))
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
        body = _read_file(slot.body)
        if body is None:
            return False
        best: tuple[float, Path] | None = None
        try:
            names = [e.name for e in os.scandir(slot.dir)]
        except FileNotFoundError:
            return False
        for name in names:
            if not (name.startswith(slot.meta_temp_prefix) and name.endswith(_TEMP_SUFFIX)):
                continue
            path = slot.dir / name
            meta = _try_load_meta(_read_file(path))
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
            _fsync_dir(slot.dir)
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
        return await asyncio.to_thread(self._set_sync, entry)

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
        with _flocked(self._write_lock_path(entry.key), fcntl.LOCK_EX):
            current = _try_load_meta(_read_file(slot.meta))
            if current is not None and current.get("key") == entry.key:
                # A torn pair (a writer died between renames) is completed first, so the
                # fencing below compares with what was really stored last.
                if not self._body_size_matches(slot, current) and self._roll_forward(entry.key, slot):
                    current = _try_load_meta(_read_file(slot.meta))
                stored_at = current.get("created_at") if current is not None else None
                if isinstance(stored_at, int | float) and stored_at > entry.created_at:
                    return False
            slot.dir.mkdir(parents=True, exist_ok=True)
            token = secrets.token_hex(6)
            temps: list[Path] = []
            body_in_place = False
            try:
                temps.append(self._temp(slot.dir, slot.body.name, body, token))
                temps.append(self._temp(slot.dir, slot.meta.name, meta_bytes, token))
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
                _fsync_dir(slot.dir)
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

    def _temp(self, directory: Path, final_name: str, data: bytes, token: str) -> Path:
        if self.fsync:
            return _write_temp(directory, final_name, data, token, self.fsync)
        path = directory / f".{final_name}.{token}{_TEMP_SUFFIX}"
        path.write_bytes(data)
        return path

    @staticmethod
    def _body_size_matches(slot: EntryFiles, meta: Mapping[str, Any]) -> bool:
        try:
            return os.stat(slot.body).st_size == meta.get("size")
        except FileNotFoundError:
            return False

    async def delete(self, key: str) -> None:
        """Remove both files, metadata first so the entry vanishes in one step."""
        await asyncio.to_thread(self._delete_sync, key)

    def _delete_sync(self, key: str) -> None:
        slot = self.slot(key)
        with _flocked(self._write_lock_path(key), fcntl.LOCK_EX):
            meta = _try_load_meta(_read_file(slot.meta))
            if meta is not None and meta.get("key") != key:
                return  # the files belong to another key (case-insensitive file system)
            for path in (slot.meta, slot.body):
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    path.unlink()

    def _write_lock_path(self, key: str) -> Path:
        return self._locks_dir / f"{_key_hash(key)}.write"

    # -- listing and maintenance ----------------------------------------------------------

    async def keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Every stored key starting with ``prefix``, read from the metadata files."""
        for key in await asyncio.to_thread(self._keys_sync, prefix):
            yield key

    def _keys_sync(self, prefix: str) -> list[str]:
        found: list[str] = []
        for top in self._listing_dirs(prefix):
            for dirpath, _dirs, files in os.walk(top):
                for name in files:
                    if name.startswith(".") or not name.endswith(".json"):
                        continue
                    meta = _try_load_meta(_read_file(Path(dirpath, name)))
                    if meta is not None and isinstance(meta.get("key"), str):
                        if meta["key"].startswith(prefix):
                            found.append(meta["key"])
        return found

    def _listing_dirs(self, prefix: str) -> list[Path]:
        """The directories that can hold keys starting with ``prefix`` (all, if unsure)."""
        long_dir = self.root / "long"
        if prefix.startswith("data:"):
            return [self.root / "data", long_dir]
        if prefix.startswith("/"):
            complete = prefix[1:].split("/")[:-1]
            parts = [_encode_segment(s, final=False) for s in complete]
            if all(len(p.encode("utf-8", "surrogatepass")) <= MAX_SEGMENT_BYTES for p in parts):
                return [self.root.joinpath("entries", *parts), long_dir]
            return [self.root / "entries", long_dir]
        return [self.root / "entries", self.root / "data", long_dir]

    async def sweep_temp_files(self, older_than: float = 60) -> int:
        """Remove temporary files left by killed writers; returns how many were handled.

        A temporary metadata file whose write died between its two renames is renamed
        into place instead of removed. Files younger than ``older_than`` seconds may
        belong to a live writer and are left alone.
        """
        return await asyncio.to_thread(self._sweep_sync, older_than)

    def _sweep_sync(self, older_than: float) -> int:
        cutoff = time.time() - older_than
        handled = 0
        tops = [self.root / "entries", self.root / "data", self.root / "long"]
        for top in tops:
            for dirpath, _dirs, files in os.walk(top):
                for name in files:
                    if name.startswith(".") and name.endswith(_TEMP_SUFFIX):
                        handled += self._sweep_one(Path(dirpath, name), cutoff)
        with os.scandir(self.root) as it:
            for item in it:
                if item.name.startswith(".") and item.name.endswith(_TEMP_SUFFIX):
                    handled += self._sweep_one(Path(item.path), cutoff)
        return handled

    def _sweep_one(self, path: Path, cutoff: float) -> int:
        try:
            if path.stat().st_mtime > cutoff:
                return 0
        except FileNotFoundError:
            return 0
        if ".json." in path.name:
            meta = _try_load_meta(_read_file(path))
            if meta is not None and isinstance(meta.get("key"), str):
                key = meta["key"]
                slot = self.slot(key)
                if slot.dir == path.parent:
                    with _flocked(self._write_lock_path(key), fcntl.LOCK_EX):
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
        await asyncio.to_thread(self._append_tags, tags, at)
        for tag in tags:
            if at > self._tag_mirror.get(tag, float("-inf")):
                self._tag_mirror[tag] = at

    def _append_tags(self, tags: list[str], at: float) -> None:
        lines = _tag_lines(tags, at)
        # Shared: appenders run together, but never while compaction swaps the file.
        with _flocked(self._tags_lock_path, fcntl.LOCK_SH):
            try:
                fd = os.open(self._tags_path, os.O_RDWR | os.O_APPEND)
            except FileNotFoundError:  # removed by hand while we run
                self._ensure_tag_log()
                fd = os.open(self._tags_path, os.O_RDWR | os.O_APPEND)
            try:
                size = os.fstat(fd).st_size
                # A killed writer's unfinished line must not swallow ours.
                pending = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
                for line in lines:
                    _write_all(fd, pending + line)
                    pending = b""
                if self.fsync:
                    os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
        if size > max(self.tag_log_compact_bytes, self._compact_floor):
            self.compact_tag_log()

    def _ensure_tag_log(self) -> None:
        """Create the tag log, header included, in one step (a hard link never overwrites)."""
        if self._tags_path.exists():
            return
        temp = self._temp(self.root, self._tags_path.name, _log_header(), secrets.token_hex(6))
        try:
            os.link(temp, self._tags_path)
        except FileExistsError:
            pass
        finally:
            temp.unlink()

    def compact_tag_log(self) -> bool:
        """Rewrite the tag log with one line per tag (its latest time); True if rewritten.

        Runs under the exclusive ``tags.lock``, so no append is in flight and none can
        go to the file being replaced. The new file has a new id in its header line, so
        readers holding a cursor into the old one start again from the top.
        """
        with _flocked(self._tags_lock_path, fcntl.LOCK_EX):
            data = _read_file(self._tags_path)
            if data is None or len(data) <= self.tag_log_compact_bytes:
                return False  # another process compacted it meanwhile
            times, _ = _parse_tag_lines(data, self._tags_path)
            compacted = _log_header() + b"".join(_tag_line([tag], at) for tag, at in times.items())
            if len(compacted) * 2 > len(data):
                self._compact_floor = len(data) * 2
                return False
            temp = self._temp(self.root, self._tags_path.name, compacted, secrets.token_hex(6))
            try:
                os.replace(temp, self._tags_path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
                raise
            if self.fsync:
                _fsync_dir(self.root)
        return True

    async def tag_times(self, tags: Iterable[str]) -> Mapping[str, float]:
        """Latest times from the in-process mirror, after reading any new log lines."""
        self._refresh_mirror()
        mirror = self._tag_mirror
        return {t: mirror[t] for t in tags if t in mirror}

    def _refresh_mirror(self) -> None:
        """Read new log lines into the mirror; one ``stat`` when nothing changed."""
        try:
            st = os.stat(self._tags_path)
        except FileNotFoundError:
            return
        if self._mirror_seen == _stat_key(st):
            return
        read = self._read_changes(self._mirror_cursor)
        if read is None:
            return
        self._mirror_cursor, times, self._mirror_seen = read
        mirror = self._tag_mirror
        for tag, at in times.items():
            if at > mirror.get(tag, float("-inf")):
                mirror[tag] = at

    async def tag_changes(self, cursor: Any) -> tuple[Any, Mapping[str, float]] | None:
        """Tag times from lines appended after ``cursor`` (a ``(log id, offset)`` pair).

        A cursor into a log that compaction replaced (another id) restarts from the top
        of the new one, which holds every tag's latest time.
        """
        read = self._read_changes(cursor)
        if read is None:
            return cursor, {}
        new_cursor, times, _seen = read
        return new_cursor, times

    def _read_changes(self, cursor: Any) -> tuple[tuple[str, int], dict[str, float], tuple[int, ...]] | None:
        """Read the log after ``cursor``: (new cursor, times, stat key of what was read)."""
        try:
            fd = os.open(self._tags_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            # The id, not the inode: inode numbers are reused as soon as they are freed.
            log_id = _log_id(os.pread(fd, 256, 0)) or f"inode-{st.st_ino}"
            start = 0
            if (
                isinstance(cursor, tuple | list)
                and len(cursor) == 2
                and cursor[0] == log_id
                and isinstance(cursor[1], int)
                and 0 <= cursor[1] <= st.st_size
            ):
                start = cursor[1]
                # Offsets always follow a newline; anything else means a different file.
                if start and os.pread(fd, 1, start - 1) != b"\n":
                    start = 0
            chunks: list[bytes] = []
            offset = start
            while offset < st.st_size:
                chunk = os.pread(fd, st.st_size - offset, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
        finally:
            os.close(fd)
        times, consumed = _parse_tag_lines(b"".join(chunks), self._tags_path)
        return (log_id, start + consumed), times, _stat_key(st)

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
            os.close(held[0])
        path = self._locks_dir / f"{_key_hash(key)}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        token = secrets.token_hex(8)
        self._held[key] = (fd, token, now + ttl)
        return token

    async def release_lock(self, key: str, token: str) -> None:
        """Release only if ``token`` still holds it (not after a ttl takeover)."""
        held = self._held.get(key)
        if held is not None and held[1] == token:
            del self._held[key]
            os.close(held[0])

    # -- lifecycle -----------------------------------------------------------------------

    async def close(self) -> None:
        """Close the descriptors of held regeneration locks, which releases them."""
        held, self._held = self._held, {}
        for fd, _token, _expires in held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        writer, self._staging_writer = self._staging_writer, None
        if writer is not None:
            writer.shutdown(wait=True)

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
            "tag_log_bytes": self._mirror_cursor[1] if self._mirror_cursor else 0,
        }
