"""The disk budget of ``FileSystemCache``: what it holds on disk, and what goes when it is full.

**What counts.** Everything under the cache root, as bytes on disk (``st_blocks * 512``,
so a 300-byte metadata file costs a whole block, usually 4 kB, and many small files are
counted honestly): entry bodies and metadata, directories, the tag log, the activity
record (``activity.log``, ``activity.json``: :mod:`pyisr.cache.fs_activity`), lock and
temporary files. A scan of the root measures all of it; between scans the index adds
what this process writes (each file rounded up to the block, each directory it makes,
what the activity files grew by) and subtracts what it deletes. Only files under the
entry directories are ever taken for entries, so nothing else is evicted.

**The index.** One per process: for each entry its bytes on disk, whether it is a
negative result (status 404), when it expires and when it was last used, in least
recently used order. It is built by one scan of the root when the cache first writes,
in the cache's own I/O threads (the request that wrote does not wait for it), and kept
current by writes, deletes and reads; a read marks its entry (no lock, no system call)
and the order catches up when evicting (a second chance, as in the CLOCK algorithm).
Until a scan, uses are not recorded; after a restart the time an entry's metadata was
written stands in for its last use. Memory: about 190 bytes per entry, plus its key
(a 1 GiB cache of 8 kB entries: about 30 MB per process).

**Eviction, approximately LRU.**

* A write that would take the total over ``max_bytes``, or a negative result that would
  take negative results over their share, first evicts in the writer's thread until it
  fits, so the bound holds even when the background task lags behind.
* Past :data:`HIGH_WATER` of the cap (or of the negative share), or when a scan is due,
  one background task per process (in the cache's I/O threads) scans if due, deletes
  entries past their ``expire``, evicts negative results down to
  :data:`NEGATIVE_LOW_WATER` of their share, then the least recently used entries
  until the total is under :data:`LOW_WATER` of the cap. Entries expired for a day
  (:data:`EXPIRED_GRACE`) go first, whatever the total; they are looked for after each
  scan, and at most once a minute otherwise.
* Negative results (a crawler asking for unknown ids) have a share of their own,
  :data:`NEGATIVE_SHARE` of the cap, and are evicted among themselves first: a
  crawler cannot push real pages out. Real pages, prerendered ones too, are evicted
  only when real pages fill the cache; an evicted page is rendered again when asked.

**Several processes.** Workers sharing a directory each keep their own index, last
uses included, and evict from it. Each scans the root again after writing a share of
the cap since its last scan (:data:`RESCAN_SHARE`, adapted to how much the others
change the disk), which adds what the others wrote and drops what they deleted, so the
total a process acts on is off by at most about that much. Two processes evicting the
same entry is harmless: the second finds nothing.

**Safety.** Evicting an entry is deleting it the way ``FileSystemCache.delete`` does:
under the key's write lock, metadata first, so a reader sees the whole entry or none
(and ``None`` means the page is rendered again), never a torn one. Callers record and
forget entries while holding that lock, so the index's view of a key changes in the
same order as the files do.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyisr.cache.files import read_file
from pyisr.cache.fs_layout import ENTRY_DIRS, key_to_slot

logger = logging.getLogger("pyisr.cache.filesystem")

#: The cap when none is configured (``cache_max_bytes``).
DEFAULT_MAX_BYTES = 1024**3
#: Share of the cap negative results (status 404) may hold, evicted among themselves first.
NEGATIVE_SHARE = 0.10
#: The status of a negative result.
NEGATIVE_STATUS = 404
#: Fill (of the cap, or of the negative share) past which the background task evicts.
HIGH_WATER = 0.95
#: Fill the background task evicts down to: room for many writes before the next run.
LOW_WATER = 0.90
#: Fill of their share the background task evicts negative results down to: lower, since
#: a crawler writes them fast and each is worth little; fewer, longer runs cost less.
NEGATIVE_LOW_WATER = 0.50
#: Share of the cap a process writes before it scans the root again (to see other
#: processes' writes and deletes), at first; it halves (down to :data:`MIN_RESCAN_SHARE`)
#: after a scan that found the disk off by more than :data:`RESCAN_DRIFT` of the cap from
#: what the index thought, and doubles (up to 1) after one that did not. A process alone
#: with its directory thus scans about once per cap written, a busy shared one up to
#: sixteen times as often.
RESCAN_SHARE = 0.25
MIN_RESCAN_SHARE = 1 / 16
RESCAN_DRIFT = 0.05
#: Seconds an expired entry stays on disk past its ``expire``, and at least after it was
#: written: an entry written a moment ago that says it expired long ago comes from a clock
#: far behind ours (another machine's, a test's fake one), not from the past. The engine
#: never serves an expired entry meanwhile; the same margin as Redis' (one day).
EXPIRED_GRACE = 86_400.0
#: Seconds between two looks for expired entries by the background task.
EXPIRY_CHECK_SECONDS = 60.0
#: Consecutive failed deletions after which an eviction run gives up until the next one.
_MAX_FAILURES = 3

#: Deletes one entry under its write lock, forgetting (or, when ``expired_at`` is given and
#: the stored entry is not expired by then, recording) it; True if files were removed.
Remove = Callable[..., bool]


@dataclass(slots=True)
class _Item:
    size: int
    negative: bool
    expires_at: float | None
    used: float  # last use (wall clock; a read is only marked, below), for the order after a scan
    written: float  # when its metadata was written, as far as the index knows
    touched: bool = False  # read since it was last queued


def expires_at(meta: Mapping[str, Any]) -> float | None:
    """When the entry these metadata describe stops being servable, or ``None``."""
    created, expire = meta.get("created_at"), meta.get("expire")
    if isinstance(created, int | float) and isinstance(expire, int | float) and not isinstance(expire, bool):
        return float(created) + float(expire)
    return None


def _block_size(root: Path) -> int:
    try:
        return os.statvfs(root).f_frsize or 4096
    except (OSError, AttributeError):
        return 4096


class DiskBudget:
    """The index of one ``FileSystemCache`` in one process, and its eviction (module doc)."""

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, not {max_bytes!r}")
        self.negative_max = int(self.max_bytes * NEGATIVE_SHARE)
        #: Allocation unit of the file system: what a small file or a directory costs.
        self.block = _block_size(root)
        self._lock = threading.Lock()
        #: Least recently used first; an entry being evicted is in ``_evicting`` instead.
        self._pages: OrderedDict[str, _Item] = OrderedDict()
        self._negatives: OrderedDict[str, _Item] = OrderedDict()
        self._evicting: dict[str, _Item] = {}
        self._bytes = self._negative_bytes = 0  # every known entry, those being evicted too
        self._evicting_bytes = self._evicting_negative_bytes = 0
        self._other = 0  # directories, the tag log, temporary and lock files
        self._built = False
        self._scan_lock = threading.Lock()
        #: While a scan runs: what this process recorded (an item) or forgot (``None``).
        self._journal: dict[str, _Item | None] | None = None
        self._written = 0  # bytes recorded since the last scan started
        self._rescan_share = RESCAN_SHARE
        self._expiry_checked = 0.0
        self.evicted = 0

    # -- bookkeeping (record and forget: the caller holds the key's write lock) -------------

    def on_disk(self, nbytes: int) -> int:
        """What a file of ``nbytes`` costs on disk: whole blocks."""
        return -(-nbytes // self.block) * self.block

    def entry_size(self, body_bytes: int, meta_bytes: int) -> int:
        return self.on_disk(body_bytes) + self.on_disk(meta_bytes)

    def record(self, key: str, size: int, *, status: int, expires: float | None) -> None:
        """``key`` was just written (``size`` bytes on disk): it is the most recently used."""
        now = time.time()
        item = _Item(size, status == NEGATIVE_STATUS, expires, now, now)
        with self._lock:
            self._drop(key)
            self._add(key, item)
            self._written += size
            if self._journal is not None:
                self._journal[key] = item

    def forget(self, key: str) -> None:
        """``key``'s files were deleted."""
        with self._lock:
            self._drop(key)
            if self._journal is not None:
                self._journal[key] = None

    def touch(self, key: str) -> None:
        """``key`` was read: mark it used. A lookup and a store, no lock, no clock and no
        I/O (a read must not wait for an eviction run); the order catches up in
        :meth:`_pick`, and the time of use at the next scan."""
        item = self._pages.get(key) or self._negatives.get(key)
        if item is not None:
            item.touched = True

    def adjust_other(self, delta: int) -> None:
        """Bytes that belong to no entry changed (a directory made or removed)."""
        with self._lock:
            self._other = max(0, self._other + delta)

    def _add(self, key: str, item: _Item) -> None:
        (self._negatives if item.negative else self._pages)[key] = item
        self._bytes += item.size
        if item.negative:
            self._negative_bytes += item.size

    def _drop(self, key: str) -> None:
        item = self._pages.pop(key, None)
        if item is None:
            item = self._negatives.pop(key, None)
        if item is None:
            item = self._evicting.pop(key, None)
            if item is None:
                return
            self._evicting_bytes -= item.size
            if item.negative:
                self._evicting_negative_bytes -= item.size
        self._bytes -= item.size
        if item.negative:
            self._negative_bytes -= item.size

    # -- decisions ---------------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Bytes on disk under the root, as far as this process knows."""
        return self._bytes + self._other

    def _scan_due(self) -> bool:
        return not self._built or self._written >= self._rescan_share * self.max_bytes

    def maintenance_due(self) -> bool:
        """Whether the background task has work: a scan, or a fill past the high-water mark."""
        if self._journal is not None:
            return False  # a scan is running; it is followed by an eviction
        return self._scan_due() or self._targets() != (1.0, 1.0)

    def _targets(self) -> tuple[float, float]:
        """The fills of the cap and of the negative share an eviction run brings down: the
        low-water mark for one past its high-water mark, else 1 (nothing to do)."""
        total = self.total - self._evicting_bytes
        negatives = self._negative_bytes - self._evicting_negative_bytes
        return (
            LOW_WATER if total > HIGH_WATER * self.max_bytes else 1.0,
            NEGATIVE_LOW_WATER if negatives > HIGH_WATER * self.negative_max else 1.0,
        )

    def _pick(
        self,
        extra: int,
        negative_extra: int,
        fill: float,
        negative_fill: float,
        *,
        strict: bool = False,
        spare: str | None = None,
    ) -> str | None:
        """The next entry to evict so that ``extra`` more bytes (``negative_extra`` of them
        negative) fit under ``fill`` of the cap and ``negative_fill`` of the negative share,
        moved out of the LRU order (so no other thread picks it); ``None`` when they fit.

        Entries other threads are evicting count as gone, unless ``strict``: a writer must
        not fill the disk before their files are really deleted. ``spare`` is never picked:
        the key a writer is about to replace, whose stored ``created_at`` its fencing
        must still see. Caller holds ``_lock``.
        """
        in_flight = 0 if strict else self._evicting_bytes
        negatives_in_flight = 0 if strict else self._evicting_negative_bytes
        negatives = self._negative_bytes - negatives_in_flight + negative_extra
        if self._negatives and negatives > negative_fill * self.negative_max:
            pool = self._negatives
        elif self.total - in_flight + extra > fill * self.max_bytes:
            pool = self._pages or self._negatives
            if not pool:
                return None
        else:
            return None
        # The least recently used first, but an entry read since it was queued gets a second
        # chance at the end of the queue (the CLOCK approximation of LRU: reads then cost no
        # reordering). Each pass clears the mark, so this ends within two rounds.
        for _ in range(2 * len(pool) + 1):
            key, item = pool.popitem(last=False)
            if not (item.touched or key == spare):
                break
            item.touched = False
            item.used = time.time()
            pool[key] = item
        else:
            return None  # only the key being written is left
        self._evicting[key] = item
        self._evicting_bytes += item.size
        if item.negative:
            self._evicting_negative_bytes += item.size
        return key

    def _take_expired(self, now: float) -> list[str]:
        """Entries expired and written more than :data:`EXPIRED_GRACE` ago, taken out of the
        LRU order for deletion."""
        cutoff = now - EXPIRED_GRACE
        with self._lock:
            keys = [
                key
                for pool in (self._pages, self._negatives)
                for key, item in pool.items()
                if item.expires_at is not None and item.expires_at <= cutoff and item.written <= cutoff
            ]
            for key in keys:
                item = self._pages.pop(key, None) or self._negatives.pop(key)
                self._evicting[key] = item
                self._evicting_bytes += item.size
                if item.negative:
                    self._evicting_negative_bytes += item.size
        return keys

    # -- evicting ----------------------------------------------------------------------------

    def _evict(self, key: str, remove: Remove, expired_at: float | None = None) -> bool | None:
        """Delete one picked entry: True if files were removed, ``None`` if that failed (the
        entry is dropped from the index anyway; the next scan finds it again)."""
        removed: bool | None
        try:
            removed = remove(key, expired_at) if expired_at is not None else remove(key)
        except OSError as exc:
            logger.warning("pyisr: could not evict cache entry %r: %s", key, exc)
            removed = None
        with self._lock:
            if key in self._evicting:  # neither forgotten nor recorded again: drop it
                self._drop(key)
            if removed:
                self.evicted += 1
        return removed

    def _evict_until(
        self,
        remove: Remove,
        extra: int,
        negative_extra: int,
        fill: float,
        negative_fill: float,
        *,
        strict: bool = False,
        spare: str | None = None,
    ) -> int:
        evicted = failures = 0
        while failures < _MAX_FAILURES:
            with self._lock:
                key = self._pick(extra, negative_extra, fill, negative_fill, strict=strict, spare=spare)
            if key is None:
                break
            removed = self._evict(key, remove)
            failures = failures + 1 if removed is None else 0
            evicted += bool(removed)
        return evicted

    def make_room(self, key: str, size: int, negative: bool, remove: Remove) -> int:
        """Before writing ``key`` (``size`` bytes): evict until it fits under the caps.

        Runs in the writer's thread; usually there is room already, since the background
        task keeps the total under the high-water mark.
        """
        if not self._built:
            return 0  # nothing is known yet; the first write's scan catches up
        with self._lock:
            old = self._pages.get(key) or self._negatives.get(key)
            growth = size - (old.size if old is not None else 0)
        if growth <= 0:
            return 0
        return self._evict_until(remove, growth, growth if negative else 0, 1.0, 1.0, strict=True, spare=key)

    def maintain(self, remove: Remove, *, thorough: bool = False) -> int:
        """The background task: scan if due, then delete expired entries, negative results
        over their share and the least recently used entries down to the low-water mark.
        Blocking (the cache's I/O threads); returns how many entries were deleted.

        Looking for expired entries walks the whole index, so it is done after a scan,
        at most once per :data:`EXPIRY_CHECK_SECONDS` otherwise, and whenever ``thorough``.
        """
        with self._scan_lock:  # wait for a scan another thread runs, rather than skip it
            scanned = self._scan_due()
            if scanned:
                self._scan()
        now = time.time()
        evicted = 0
        if scanned or thorough or now - self._expiry_checked >= EXPIRY_CHECK_SECONDS:
            self._expiry_checked = now
            expired = self._take_expired(now)
            evicted = sum(bool(self._evict(key, remove, now - EXPIRED_GRACE)) for key in expired)
        fill, negative_fill = self._targets()
        return evicted + self._evict_until(remove, 0, 0, fill, negative_fill)

    # -- scanning ----------------------------------------------------------------------------

    def scan(self) -> None:
        """Measure the root and rebuild the index from what is on disk (blocking).

        Keys this process knows keep their last use, and their metadata is not read again
        unless it changed since. Writes and deletes made while it runs are applied on top.
        """
        with self._scan_lock:
            self._scan()

    def _scan(self) -> None:
        with self._lock:
            self._journal = {}
            self._written = 0
            known = {**self._pages, **self._negatives}
        try:
            by_path = {}
            for key, item in known.items():
                slot = key_to_slot(self.root, key)
                by_path[str(slot.meta)] = (key, slot.body.name, item)
            found, everything = self._walk(by_path)
        except BaseException:
            with self._lock:
                self._journal = None
            raise
        with self._lock:
            journal, self._journal = self._journal, None
            changed = self._merge(found, everything, journal, known)
            if self._built:  # how often to look again: as often as others change the disk
                drifted = changed > RESCAN_DRIFT * self.max_bytes
                share = self._rescan_share / 2 if drifted else self._rescan_share * 2
                self._rescan_share = min(1.0, max(MIN_RESCAN_SHARE, share))
            self._built = True

    def _walk(self, known: Mapping[str, tuple[str, str, _Item]]) -> tuple[dict[str, _Item], int]:
        """Every entry on disk (key -> item) and the bytes of everything under the root."""
        found: dict[str, _Item] = {}
        everything = os.stat(self.root).st_blocks * 512
        tops = {str(self.root / name) for name in ENTRY_DIRS}
        stack = [(str(self.root), False)]
        while stack:
            directory, in_entries = stack.pop()
            sizes: dict[str, int] = {}
            metas: list[tuple[str, str, float]] = []
            try:
                with os.scandir(directory) as listing:
                    for dirent in listing:
                        try:
                            st = dirent.stat(follow_symlinks=False)
                        except OSError:
                            continue  # removed meanwhile
                        everything += st.st_blocks * 512
                        if stat.S_ISDIR(st.st_mode):
                            stack.append((dirent.path, in_entries or dirent.path in tops))
                        elif in_entries:
                            sizes[dirent.name] = st.st_blocks * 512
                            if dirent.name.endswith(".json") and not dirent.name.startswith("."):
                                metas.append((dirent.name, dirent.path, st.st_mtime))
            except OSError:
                continue
            for name, path, mtime in metas:
                entry = self._entry_at(path, mtime, known)
                if entry is not None:
                    key, body_name, item = entry
                    item.size = sizes[name] + sizes.get(body_name, 0)
                    found[key] = item
        return found, everything

    def _entry_at(
        self, path: str, mtime: float, known: Mapping[str, tuple[str, str, _Item]]
    ) -> tuple[str, str, _Item] | None:
        """The key, body file name and index item of the metadata file at ``path``.

        Metadata the index knows and nobody rewrote since (its file is not newer than
        when the index learnt of it) is not read again.
        """
        prior = known.get(path)
        if prior is not None and mtime <= prior[2].written:
            key, body_name, item = prior
            return key, body_name, _Item(0, item.negative, item.expires_at, item.used, item.written)
        try:
            meta = json.loads(read_file(Path(path)) or b"null")
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or not isinstance(meta.get("key"), str):
            return None
        key = meta["key"]
        slot = key_to_slot(self.root, key)
        if str(slot.meta) != path:
            return None  # not where its key lives: counted, never evicted by key
        status = meta.get("status", 200)
        used = max(mtime, prior[2].used) if prior is not None else mtime
        return key, slot.body.name, _Item(0, status == NEGATIVE_STATUS, expires_at(meta), used, mtime)

    def _merge(
        self,
        found: dict[str, _Item],
        everything: int,
        journal: dict[str, _Item | None],
        known: dict[str, _Item],
    ) -> int:
        """Install a scan's result, with what this process did while it ran; returns the bytes
        of entries other processes wrote or deleted since the index last looked. Caller
        holds ``_lock``."""
        other = everything - sum(item.size for item in found.values())
        live = {**self._pages, **self._negatives}
        mine = journal.keys() | self._evicting.keys()
        changed = sum(item.size for key, item in found.items() if key not in known and key not in mine)
        changed += sum(item.size for key, item in known.items() if key not in found and key not in mine)
        for key, change in journal.items():
            if change is None:
                found.pop(key, None)
            else:
                found[key] = change
        for key in self._evicting:
            found.pop(key, None)
        now = time.time()
        for key, item in found.items():
            current = live.get(key)
            if current is not None and current is not item:
                item.used = max(item.used, now if current.touched else current.used)
            elif item.touched:
                item.used, item.touched = now, False
        self._pages.clear()
        self._negatives.clear()
        self._bytes = self._evicting_bytes
        self._negative_bytes = self._evicting_negative_bytes
        for key, item in sorted(found.items(), key=lambda pair: pair[1].used):
            self._add(key, item)
        self._other = max(0, other)
        return changed

    def describe(self) -> dict[str, Any]:
        """The cap and what the index knows (``bytes`` is ``None`` before the first scan)."""
        with self._lock:
            return {
                "max_bytes": self.max_bytes,
                "bytes": self.total if self._built else None,
                "entries": len(self._pages) + len(self._negatives) + len(self._evicting),
                "negative_bytes": self._negative_bytes,
                "negative_max_bytes": self.negative_max,
                "evicted": self.evicted,
            }
