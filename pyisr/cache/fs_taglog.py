"""The tag manifest of ``FileSystemCache``: an append-only log every process shares.

``revalidate_tags`` is one ``O_APPEND`` write of a line shorter than 4 KB
(``{"t": [tags], "at": epoch}``), made under a shared flock on ``tags.lock``; appends
that small are never interleaved, so processes append together without waiting for
each other. Past 4 MB the log is rewritten with one line per tag under the exclusive
flock, so no append can go to the file being replaced.

The first line carries a random id; cursors are ``(id, offset)``, so a reader notices
a replaced log even when the file system reuses the inode number, and restarts from
the top of the new file, which holds every tag's latest time. A line without its
newline is not read until it is finished (a killed writer's unfinished line is ended
by the next append, so it cannot swallow that append), and a corrupt line is skipped
with a warning.

Each process mirrors the log in memory and reads only what was appended since its
last read; when the file has not changed, a tag lookup costs one ``stat``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pyisr.cache.files import (
    atomic_write,
    exclusive_lock,
    read_file,
    shared_lock,
    write_all,
    write_temp,
)
from pyisr.cache.fs_layout import TAG_LOG, TAG_LOG_LOCK
from pyisr.cache.tags import TagTimes

# Named after the handler whose log this is, as its warnings always were.
logger = logging.getLogger("pyisr.cache.filesystem")

#: Tag log size above which it is rewritten with one line per tag.
TAG_LOG_COMPACT_BYTES = 4 * 1024 * 1024
#: Longest tag-log write; O_APPEND writes this small are not interleaved.
TAG_LINE_BYTES = 4000

#: Where a reader is in a log: the log's id and the offset just after a newline.
Cursor = tuple[str, int]


# -- the line format ----------------------------------------------------------------------


def _tag_line(tags: list[str], at: float) -> bytes:
    return json.dumps({"t": tags, "at": at}, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


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


def _parse_tag_lines(data: bytes, source: object) -> tuple[TagTimes, int]:
    """Latest time per tag in the complete lines of ``data``, and the bytes they span.

    Bytes after the last newline belong to a line still being written (or left by a
    killed writer) and are not consumed. Corrupt lines are skipped with a warning:
    one bad line must not stop every later invalidation from being seen.
    """
    end = data.rfind(b"\n") + 1
    times = TagTimes()
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
        times.record(tags, at)
    return times, end


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


# -- the log ------------------------------------------------------------------------------


class TagLog:
    """``root/tags.log``: appending, compacting and reading it, and this process's mirror of it."""

    def __init__(self, root: Path, *, fsync: bool, compact_bytes: int = TAG_LOG_COMPACT_BYTES) -> None:
        self.root = root
        self.path = root / TAG_LOG
        self._lock_path = root / TAG_LOG_LOCK
        self.fsync = fsync
        self.compact_bytes = compact_bytes
        #: Do not compact again until the log reaches this size (a compaction that saves
        #: little would otherwise repeat on every append).
        self._compact_floor = 0
        #: Mirror of the log: times, the cursor read up to, and the file state seen.
        self.mirror = TagTimes()
        self._mirror_cursor: Cursor | None = None
        self._mirror_seen: tuple[int, ...] | None = None

    @property
    def bytes_read(self) -> int:
        """How far into the current log the mirror has read (for ``describe``)."""
        return self._mirror_cursor[1] if self._mirror_cursor else 0

    def ensure(self) -> None:
        """Create the tag log, header included, in one step (a hard link never overwrites)."""
        if self.path.exists():
            return
        temp = write_temp(self.root, self.path.name, _log_header(), secrets.token_hex(6), self.fsync)
        try:
            os.link(temp, self.path)
        except FileExistsError:
            pass
        finally:
            temp.unlink()

    def append(self, tags: list[str], at: float) -> None:
        """Append the records of one invalidation (blocking: run it in a thread), then fsync.

        The caller records the same times in :attr:`mirror` once this returns.
        """
        lines = _tag_lines(tags, at)
        # Shared: appenders run together, but never while compaction swaps the file.
        with shared_lock(self._lock_path):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            except FileNotFoundError:  # removed by hand while we run
                self.ensure()
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            try:
                size = os.fstat(fd).st_size
                # A killed writer's unfinished line must not swallow ours.
                pending = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
                for line in lines:
                    write_all(fd, pending + line)
                    pending = b""
                if self.fsync:
                    os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
        if size > max(self.compact_bytes, self._compact_floor):
            self.compact()

    def compact(self) -> bool:
        """Rewrite the log with one line per tag (its latest time); True if rewritten.

        Runs under the exclusive ``tags.lock``, so no append is in flight and none can
        go to the file being replaced. The new file has a new id in its header line, so
        readers holding a cursor into the old one start again from the top.
        """
        with exclusive_lock(self._lock_path, blocking=True):
            data = read_file(self.path)
            if data is None or len(data) <= self.compact_bytes:
                return False  # another process compacted it meanwhile
            times, _ = _parse_tag_lines(data, self.path)
            compacted = _log_header() + b"".join(_tag_line([tag], at) for tag, at in times.items())
            if len(compacted) * 2 > len(data):
                self._compact_floor = len(data) * 2
                return False
            atomic_write(self.path, compacted, fsync=self.fsync)
        return True

    def times(self, tags: Iterable[str]) -> dict[str, float]:
        """Latest times from the mirror, after reading any new log lines."""
        self._refresh_mirror()
        return self.mirror.pick(tags)

    def _refresh_mirror(self) -> None:
        """Read new log lines into the mirror; one ``stat`` when nothing changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if self._mirror_seen == _stat_key(st):
            return
        read = self._read_changes(self._mirror_cursor)
        if read is None:
            return
        self._mirror_cursor, times, self._mirror_seen = read
        self.mirror.merge(times)

    def changes(self, cursor: Any) -> tuple[Any, dict[str, float]]:
        """Tag times from lines appended after ``cursor`` (a ``(log id, offset)`` pair).

        A cursor into a log that compaction replaced (another id) restarts from the top
        of the new one, which holds every tag's latest time.
        """
        read = self._read_changes(cursor)
        if read is None:
            return cursor, {}
        new_cursor, times, _seen = read
        return new_cursor, times

    def _read_changes(self, cursor: Any) -> tuple[Cursor, TagTimes, tuple[int, ...]] | None:
        """Read the log after ``cursor``: (new cursor, times, stat key of what was read)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
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
        times, consumed = _parse_tag_lines(b"".join(chunks), self.path)
        return (log_id, start + consumed), times, _stat_key(st)
