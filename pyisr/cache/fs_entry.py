"""Whether the two files of a ``FileSystemCache`` entry form one entry, and repairing them.

A writer renames the body into place, then the metadata; a reader may see one write's
metadata with another's body (it raced the writer, or the writer was killed between
its renames). The mismatch is detected here and the reader knows to read again under
the key's lock (:mod:`pyisr.cache.filesystem`). A pair a killed writer left torn is
completed here too, from the temporary metadata it had already fsynced
(:func:`roll_forward`).

**The check a read makes, without hashing the body.** The metadata records the body's
size and digest, and (:func:`stamp`) the inode number and mtime of the body file it was
written with. :func:`read_entry` holds the metadata file open while it opens the body,
and accepts the pair without reading the body twice when the body's size, inode and
mtime are the recorded ones and the metadata path still names the file it read. Why
that body is the one written with that metadata:

* inodes are unique among existing files, and the metadata file we hold open cannot be
  freed, so "the path still names it" means it was in place the whole time, including
  when we opened the body;
* every write makes fresh files (temporary files renamed into place; a staged rewrite
  unlinks the old pair first), so a later write's body never has the inode recorded by
  an earlier write's metadata while that earlier body exists. It could only get it by
  reuse, after the recorded body was freed: by a delete (which removes the metadata
  first, so it was not in place throughout: caught), or by a later write replacing the
  body while this metadata stayed, i.e. a writer killed between its renames. The next
  writer completes that write from its fsynced temporary metadata before renaming its
  own files (``FileSystemCache._set_sync`` compares the same inode), so the metadata
  in place is never an older write's once a newer body's inode could be reused.

Anything else (metadata from an older version, a copied cache directory whose inodes
changed, a body changed in place) falls back to the full check: size and digest of the
body, as every read did before. The mtime is there for that last case only: a file
edited in place keeps its inode, and its new mtime sends the read to the digest
(within the file system's timestamp granularity such an edit, which no writer makes,
is not seen).

**The body file holds the encodings too.** An entry with stored encodings
(:mod:`pyisr.compression`) has one body file: the body, then each encoding in the order
the metadata lists them (``"encodings": {"br": n, "gzip": m}``; ``"size"`` stays the
body's own length). Everything above is about that one file: its size (:func:`file_size`:
the body's and the encodings' lengths), its stamp and, when the body is not the whole
file, a digest of the whole file (``body_etag``), so torn or garbled encoding bytes are
caught exactly like a torn body. Metadata without ``"encodings"`` (an older version's)
describes a file that is the body alone, and reads as before; an older version reading
newer metadata finds the file longer than ``"size"`` says and treats the entry as torn
(missing), never serving the encodings as part of the page.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyisr.cache.entry import CacheEntry, EntrySummary, encoded_sizes, make_etag
from pyisr.cache.files import TEMP_SUFFIX, fsync_dir, read_file, still_named
from pyisr.cache.fs_layout import EntryFiles

logger = logging.getLogger("pyisr.cache.filesystem")


def _body_digest(meta: Mapping[str, Any]) -> Any:
    return meta.get("body_etag") or meta.get("etag")


def file_size(meta: Mapping[str, Any]) -> int | None:
    """Bytes of the body file ``meta`` was written with: the body, then its encodings;
    ``None`` when ``meta`` does not say."""
    size = meta.get("size")
    if not isinstance(size, int) or isinstance(size, bool):
        return None
    try:
        return size + sum(encoded_sizes(meta).values())
    except ValueError:
        return None


def file_bytes(entry: CacheEntry) -> bytes:
    """What ``entry``'s body file holds: its body, then each encoding (see the module docstring)."""
    if not entry.encodings:
        return bytes(entry.body)
    return b"".join([entry.body, *entry.encodings.values()])


def consistent(meta: Mapping[str, Any], body: bytes) -> bool:
    """True when ``body`` (the body file's bytes) is exactly the file ``meta`` was written
    with (hashes it)."""
    return file_size(meta) == len(body) and make_etag(body) == _body_digest(meta)


def stamp(meta: dict[str, Any], body_file: os.stat_result) -> None:
    """Record in ``meta`` which file its body was written to (see the module docstring)."""
    meta["body_ino"] = body_file.st_ino
    meta["body_mtime_ns"] = body_file.st_mtime_ns


def _stamped_file(meta: Mapping[str, Any], body_file: os.stat_result) -> bool:
    """True when ``body_file`` is the very file ``meta`` was written with (as far as its
    stat tells: the caller also checks that ``meta`` stayed in place)."""
    return (
        meta.get("body_ino") == body_file.st_ino
        and meta.get("body_mtime_ns") == body_file.st_mtime_ns
        and file_size(meta) == body_file.st_size
    )


class Torn(Exception):
    """Metadata and body disagree, or the metadata is unreadable."""


class ReadInThread(Exception):
    """The body is larger than the caller reads on its event loop (``inline_limit``)."""


def load_meta(data: bytes | None) -> dict[str, Any] | None:
    """Parsed metadata, or ``None`` if absent; raises ``Torn`` if not a JSON object."""
    if data is None:
        return None
    try:
        meta = json.loads(data)
    except ValueError as exc:
        raise Torn from exc
    if not isinstance(meta, dict):
        raise Torn
    return meta


def build_entry(key: str, meta: dict[str, Any], body: bytes | None) -> CacheEntry | None:
    """The entry from its two files, checked by digest; raises ``Torn`` unless they belong together."""
    if meta.get("key") != key:
        return None  # another key shares the path (case-insensitive file system)
    if body is None or not consistent(meta, body):
        raise Torn
    return _entry(meta, body)


def _entry(meta: dict[str, Any], data: bytes) -> CacheEntry:
    """The entry from its metadata and its body file's bytes, split into the body and the
    encodings the metadata lists."""
    try:
        size = int(meta["size"])
        encodings: dict[str, bytes] = {}
        at = size
        for coding, length in encoded_sizes(meta).items():
            encodings[coding] = data[at : at + length]
            at += length
        # A slice of the whole of a bytes object is that object: no copy without encodings.
        return CacheEntry.from_meta(meta, data[:size], encodings)
    except (ValueError, KeyError, TypeError) as exc:
        raise Torn from exc


def _read_fd(fd: int, size: int) -> bytes:
    """The first ``size`` bytes of ``fd`` (fewer at end of file); one read in the usual case."""
    data = os.read(fd, size)
    if len(data) == size or not data:
        return data
    chunks = [data]
    while size > len(data):
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        chunks.append(chunk)
        data = b"".join(chunks)
        chunks = [data]
    return data


def read_entry(key: str, slot: EntryFiles, *, inline_limit: int | None = None) -> CacheEntry | None:
    """``key``'s entry from its two files, or ``None`` when there is none.

    Raises ``Torn`` when they do not belong together and :class:`ReadInThread` when the
    body is at least ``inline_limit`` bytes (nothing read yet). A pair the metadata
    stamped (:func:`stamp`) is accepted on its files' identity; any other on the body's
    digest (see the module docstring).
    """
    try:
        meta_fd = os.open(slot.meta, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        meta = load_meta(_read_fd(meta_fd, os.fstat(meta_fd).st_size)) or {}
        if meta.get("key") != key:
            return None  # another key shares the path (case-insensitive file system)
        size = file_size(meta)
        if inline_limit is not None and size is not None and size >= inline_limit:
            raise ReadInThread
        try:
            body_fd = os.open(slot.body, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise Torn from None
        try:
            body_file = os.fstat(body_fd)
            body = _read_fd(body_fd, body_file.st_size)
        finally:
            os.close(body_fd)
        if (
            _stamped_file(meta, body_file)
            and len(body) == body_file.st_size
            and still_named(meta_fd, slot.meta)
        ):
            return _entry(meta, body)
        if not consistent(meta, body):
            raise Torn
        return _entry(meta, body)
    finally:
        os.close(meta_fd)


def needs_repair(key: str, slot: EntryFiles) -> bool:
    """True when the files of ``key`` do not form an entry (a writer died mid-way)."""
    try:
        if read_entry(key, slot) is None:
            # No metadata: a first write that died between its renames left a body.
            return not slot.meta.exists() and slot.body.exists()
    except Torn:
        return True
    return False


def try_load_meta(data: bytes | None) -> dict[str, Any] | None:
    """Parsed metadata, ``None`` if absent or unreadable (for best-effort callers)."""
    try:
        return load_meta(data)
    except Torn:
        return None


def body_matches(slot: EntryFiles, meta: Mapping[str, Any]) -> bool:
    """Whether the body on disk looks like the one ``meta`` was written with, from its
    stat alone: the stamped file (:func:`stamp`), else a body of the recorded size."""
    try:
        body_file = os.stat(slot.body)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if "body_ino" in meta:
        return _stamped_file(meta, body_file)
    return body_file.st_size == file_size(meta)


def read_summary(key: str, slot: EntryFiles) -> EntrySummary | None:
    """``key``'s metadata, for a listing: the metadata file, and a ``stat`` of the body
    showing it is the one that metadata was written with (:func:`body_matches`). The
    body itself is never read; ``None`` when there is no entry or the pair is torn (as
    :func:`read_entry` would find, save for a body rewritten in place to the same size
    without a stamp, which only a hand could do)."""
    meta = try_load_meta(read_file(slot.meta))
    if meta is None or meta.get("key") != key or not body_matches(slot, meta):
        return None
    try:
        return EntrySummary.from_meta(meta)
    except (ValueError, KeyError, TypeError):
        return None


def roll_forward(key: str, slot: EntryFiles, *, fsync: bool) -> bool:
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
        meta = try_load_meta(read_file(path))
        if meta is None or meta.get("key") != key or not consistent(meta, body):
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
    if fsync:
        fsync_dir(slot.dir)
    logger.warning("pyisr: completed an interrupted write of cache entry %r", key)
    return True
