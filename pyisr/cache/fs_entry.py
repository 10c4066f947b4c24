"""Whether the two files of a ``FileSystemCache`` entry form one entry, and repairing them.

A writer renames the body into place, then the metadata; a reader may see one write's
metadata with another's body (it raced the writer, or the writer was killed between
its renames). The metadata records the body's size and digest, so the mismatch is
detected here and the reader knows to read again under the key's lock
(:mod:`pyisr.cache.filesystem`). A pair a killed writer left torn is completed here
too, from the temporary metadata it had already fsynced (:func:`roll_forward`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyisr.cache.entry import CacheEntry, make_etag
from pyisr.cache.files import TEMP_SUFFIX, fsync_dir, read_file
from pyisr.cache.fs_layout import EntryFiles

logger = logging.getLogger("pyisr.cache.filesystem")


def _body_digest(meta: Mapping[str, Any]) -> Any:
    return meta.get("body_etag") or meta.get("etag")


def consistent(meta: Mapping[str, Any], body: bytes) -> bool:
    """True when ``body`` is exactly the body ``meta`` was written with."""
    try:
        size = int(meta["size"])
    except (KeyError, TypeError, ValueError):
        return False
    return size == len(body) and make_etag(body) == _body_digest(meta)


class Torn(Exception):
    """Metadata and body disagree, or the metadata is unreadable."""


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
    """The entry from its two files; raises ``Torn`` unless they belong together."""
    if meta.get("key") != key:
        return None  # another key shares the path (case-insensitive file system)
    if body is None or not consistent(meta, body):
        raise Torn
    try:
        return CacheEntry.from_meta(meta, body)
    except (ValueError, KeyError, TypeError) as exc:
        raise Torn from exc


def needs_repair(key: str, slot: EntryFiles) -> bool:
    """True when the files of ``key`` do not form an entry (a writer died mid-way)."""
    body = read_file(slot.body)
    try:
        meta = load_meta(read_file(slot.meta))
        if meta is None:
            return body is not None  # a first write that died between its renames
        build_entry(key, meta, body)
    except Torn:
        return True
    return False


def try_load_meta(data: bytes | None) -> dict[str, Any] | None:
    """Parsed metadata, ``None`` if absent or unreadable (for best-effort callers)."""
    try:
        return load_meta(data)
    except Torn:
        return None


def body_size_matches(slot: EntryFiles, meta: Mapping[str, Any]) -> bool:
    """Whether the body on disk has the size ``meta`` records (a cheap first check)."""
    try:
        return os.stat(slot.body).st_size == meta.get("size")
    except FileNotFoundError:
        return False


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
