"""The activity record of ``FileSystemCache``, on disk beside its entries, shared by every process.

What ``pyisr cache explain`` and the dashboard read (:mod:`pyisr.cache.activity`), in
two files at the top of the cache directory, next to the tag log::

    activity.log    recent invalidations: one JSON line each (``Invalidation.to_json``)
    activity.json   hits per key and counts per minute: {"hits": {...}, "minutes": {...}}
    locks/activity.lock   held (exclusively, briefly) by whoever changes either file

* **Invalidations** are appended, one line each, under the lock. Past
  ``2 * MAX_INVALIDATIONS`` lines the file is rewritten with the newest
  ``MAX_INVALIDATIONS`` (an atomic replacement, still under the lock), so it stays
  between one and two rings long. A line is at most :data:`~pyisr.cache.activity.MAX_RECORD_BYTES` (a record
  naming more tags keeps as many as fit).
* **Hits and minutes**: each process's report (every few seconds) is merged into
  ``activity.json`` under the lock, trimmed to its bounds (``MAX_HIT_KEYS`` keys,
  ``MINUTES`` minutes) and written atomically, so a reader never sees half of it.

Neither file is fsynced: the record is what an operator reads, approximate by nature;
a crash loses at most the last report, never the entries or the tag log. Both files
are read back as data: a line or a file that does not parse, or does not hold what a
record holds, is skipped (nothing read is ever evaluated). The files sit outside the
entry directories, so the disk cap counts them in the cache's bytes and never takes
them for entries (:mod:`pyisr.cache.fs_budget`); what this module writes is returned
as the change in bytes on disk, for the cap's count between its scans.

Files are made at the first record, not before: a cache nobody invalidated holds none.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pyisr.cache.activity import (
    MAX_INVALIDATIONS,
    Activity,
    ActivityReport,
    Invalidation,
    encode_invalidation,
    merge_report,
    parse_invalidation,
    trim_minutes,
)
from pyisr.cache.files import atomic_write, exclusive_lock, read_file, write_all
from pyisr.cache.fs_layout import LOCKS_DIR, regeneration_lock_path

logger = logging.getLogger("pyisr.cache.filesystem")

INVALIDATIONS_FILE = "activity.log"
COUNTS_FILE = "activity.json"
LOCK_FILE = "activity.lock"
#: Largest ``activity.json`` read (10,000 keys with long names fit many times over): a
#: file grown past it by hand is ignored rather than parsed.
MAX_COUNTS_BYTES = 64 * 1024 * 1024


def _on_disk(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


class ActivityFiles:
    """The activity record of one cache directory (see the module docstring).

    Every method blocks (file I/O under a flock): the cache runs them on its I/O threads.
    Those that write return the change in bytes on disk.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.invalidations_path = root / INVALIDATIONS_FILE
        self.counts_path = root / COUNTS_FILE
        self.lock_path = root / LOCKS_DIR / LOCK_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with exclusive_lock(self.lock_path, blocking=True):
            yield

    # -- invalidations -----------------------------------------------------------------

    def record_invalidation(self, invalidation: Invalidation) -> int:
        """Append one record; rewrite the file with the newest ring when it is two rings long."""
        line = encode_invalidation(invalidation) + b"\n"
        with self._locked():
            before = _on_disk(self.invalidations_path)
            fd = os.open(self.invalidations_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                size = os.fstat(fd).st_size
                # A killed writer's unfinished line must not swallow ours.
                pending = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
                write_all(fd, pending + line)
            finally:
                os.close(fd)
            data = read_file(self.invalidations_path) or b""
            lines = data.splitlines()
            if len(lines) > 2 * MAX_INVALIDATIONS:
                atomic_write(
                    self.invalidations_path, b"\n".join(lines[-MAX_INVALIDATIONS:]) + b"\n", fsync=False
                )
            return _on_disk(self.invalidations_path) - before

    def invalidations(self, limit: int = MAX_INVALIDATIONS) -> list[Invalidation]:
        """The newest ``limit`` records, newest first; lines that do not parse are skipped."""
        try:
            data = read_file(self.invalidations_path)
        except OSError as exc:
            logger.warning("pyisr: cannot read %s: %s", self.invalidations_path, exc)
            return []
        found: list[Invalidation] = []
        for raw in reversed((data or b"").splitlines()):
            invalidation = parse_invalidation(raw)
            if invalidation is not None:
                found.append(invalidation)
                if len(found) >= limit:
                    break
        return found

    # -- hits and minutes --------------------------------------------------------------

    def add(self, report: ActivityReport, now: float) -> int:
        """Merge one process's report into ``activity.json`` (under the lock, atomically)."""
        if not report:
            return 0
        with self._locked():
            before = _on_disk(self.counts_path)
            hits, minutes = self._read_counts()
            hits, minutes = merge_report(hits, minutes, report, now)
            document = {"hits": hits, "minutes": {str(m): c for m, c in minutes.items()}}
            data = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
            atomic_write(self.counts_path, data, fsync=False)
            return _on_disk(self.counts_path) - before

    def _read_counts(self) -> tuple[dict[str, int], dict[int, dict[str, int]]]:
        try:
            if _on_disk(self.counts_path) > MAX_COUNTS_BYTES:
                return {}, {}
            data = read_file(self.counts_path)
        except OSError as exc:
            logger.warning("pyisr: cannot read %s: %s", self.counts_path, exc)
            return {}, {}
        return parse_counts(data)

    def read(self, now: float, limit: int = MAX_INVALIDATIONS) -> Activity:
        hits, minutes = self._read_counts()
        return Activity(self.invalidations(limit), hits, trim_minutes(minutes, now))

    def byte_size(self) -> int:
        """Bytes on disk of the two files (for tools and tests)."""
        return _on_disk(self.invalidations_path) + _on_disk(self.counts_path)


# -- reading records back: data, parsed defensively ----------------------------------------


def _counts(value: object) -> dict[str, int]:
    """A ``{name: count}`` mapping with only what is one (non-negative integers)."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0}


def parse_counts(data: bytes | None) -> tuple[dict[str, int], dict[int, dict[str, int]]]:
    """Hits and minutes from ``activity.json``; empty when the file is missing or corrupt."""
    if not data:
        return {}, {}
    try:
        document: Any = json.loads(data)
    except (ValueError, RecursionError):
        logger.warning("pyisr: the cache's activity.json does not parse; starting its counts again")
        return {}, {}
    if not isinstance(document, dict):
        return {}, {}
    hits = _counts(document.get("hits"))
    minutes: dict[int, dict[str, int]] = {}
    raw_minutes = document.get("minutes")
    if isinstance(raw_minutes, dict):
        for minute, counts in raw_minutes.items():
            try:
                minutes[int(minute)] = _counts(counts)
            except ValueError:
                continue
    return hits, minutes


# -- the regeneration lock, looked at from outside ---------------------------------------------


def lock_is_held(root: Path, key: str) -> bool:
    """Whether a process holds ``key``'s regeneration lock (a flock on ``locks/<sha1>.lock``).

    Opens the lock file only if it exists (a key never locked gets no file) and tries a
    shared, non-blocking flock on it, released at once: refused means an exclusive
    holder. An acquirer trying the lock in the same microseconds is refused and treats
    the key as being regenerated elsewhere (the engine's answer for a held lock: serve
    the stored entry, or wait and adopt); the check is for tools, run seldom.
    """
    path = regeneration_lock_path(root, key)
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases our shared lock
    return False
