"""Where ``FileSystemCache`` keeps each key: the directory layout and the key -> path mapping.

Layout under ``root`` (by default ``<site>/.pyisr/cache``)::

    entries/blog/1.html     body of key ``/blog/1``, raw bytes (open it in a browser), then
                            its gzip and brotli encodings if it has any (``fs_entry``)
    entries/blog/1.json     its metadata (``CacheEntry.meta_json()``)
    entries/index.html      key ``/``
    data/3f/a2....bin       data-cache value of key ``data:3fa2...`` (+ ``.json``)
    long/<h2>/<sha256>.bin  any key the readable mapping cannot hold (+ ``.json``)
    locks/<sha1>.lock       regeneration lock of a key (``acquire_lock``), removed on release
    locks/<xx>.write        held while a key's files are compared and replaced: one of 256
                            stripes (``xx``: the first byte of the key's SHA-1), never removed
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

Keys whose path would be too long or too deep (a component over 200 bytes, the
whole path over 3,000 bytes, more than 32 segments, or a key longer than
:data:`pyisr.paths.MAX_KEY_BYTES`, which no request can name), keys not starting
with ``/`` and malformed ``data:`` keys are stored under ``long/`` by the SHA-256 of
the key: whatever a caller passes, a key costs two files with names of bounded
length under at most 31 directories (two when hashed), never a name built from
kilobytes of its bytes nor hundreds of nested directories.
The metadata always holds the exact key, which ``get`` checks and ``keys`` reports;
the path is only an address.

On a case-insensitive or Unicode-normalising file system (macOS) keys differing only
in case or normalisation share files, and ``get`` returns ``None`` for the one not
stored last.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from pyisr.paths import MAX_KEY_BYTES

#: Longest path component (bytes) the readable mapping uses; NAME_MAX is 255 and a
#: temporary name adds a dot, a suffix and a token.
MAX_SEGMENT_BYTES = 200
#: Longest relative path (bytes) the readable mapping uses, well under PATH_MAX.
MAX_PATH_BYTES = 3000
#: Most segments the readable mapping nests: each is a directory (a block on disk), so a
#: key such as ``/a/a/a/...`` must not cost hundreds of them.
MAX_DEPTH = 32
#: Write-lock files: keys share them by the first byte of their SHA-1 (:func:`write_lock_path`).
WRITE_LOCK_STRIPES = 256

#: The directories that hold entries (each may hold temporary files of killed writers).
ENTRY_DIRS = ("entries", "data", "long")
LOCKS_DIR = "locks"
TAG_LOG = "tags.log"
TAG_LOG_LOCK = "tags.lock"

_DATA_KEY = re.compile(r"data:([0-9a-f]{3,128})")
_UNSAFE_CHARS = re.compile(r"[%\\\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class EntryFiles:
    """Where one key lives: its directory, the body file and the metadata file."""

    dir: Path
    body: Path
    meta: Path

    @property
    def meta_temp_prefix(self) -> str:
        """How the temporary metadata files of this entry start (see :mod:`pyisr.cache.files`)."""
        return f".{self.meta.name}."


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


def _too_long(key: str) -> bool:
    """Longer than any key a request can name (the character count settles most keys)."""
    return len(key) > MAX_KEY_BYTES or (
        len(key) > MAX_KEY_BYTES // 4 and len(_key_bytes(key)) > MAX_KEY_BYTES
    )


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
    if not key.startswith("/") or _too_long(key):
        return _hashed_slot(root, key)
    if key == "/":
        directory = root / "entries"
        return EntryFiles(directory, directory / "index.html", directory / "index.json")
    segments = key[1:].split("/")
    if len(segments) > MAX_DEPTH:
        return _hashed_slot(root, key)
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


def listing_dirs(root: Path, prefix: str) -> list[Path]:
    """The directories that can hold keys starting with ``prefix`` (all, if unsure).

    Listing a prefix such as ``/blog/`` then walks ``entries/blog`` only, not the cache.
    """
    long_dir = root / "long"
    if prefix.startswith("data:"):
        return [root / "data", long_dir]
    if prefix.startswith("/"):
        complete = prefix[1:].split("/")[:-1]
        parts = [_encode_segment(s, final=False) for s in complete]
        if all(len(p.encode("utf-8", "surrogatepass")) <= MAX_SEGMENT_BYTES for p in parts):
            return [root.joinpath("entries", *parts), long_dir]
        return [root / "entries", long_dir]
    return [root / "entries", root / "data", long_dir]


def regeneration_lock_path(root: Path, key: str) -> Path:
    """The lock file one process holds while it regenerates ``key``."""
    return root / LOCKS_DIR / f"{_key_hash(key)}.lock"


def write_lock_path(root: Path, key: str) -> Path:
    """The lock file held while ``key``'s files are compared and replaced (or repaired).

    One of :data:`WRITE_LOCK_STRIPES` files, shared by the keys whose SHA-1 starts the
    same: a fixed set of files reused for ever, rather than one per key (which would
    pile up) or one made and removed per write (a file creation, the dearest step of a
    write on some disks). Two keys of a stripe wait for each other's writes, which take
    milliseconds; nothing holds two write locks at once, so this cannot deadlock.
    """
    return root / LOCKS_DIR / f"{_key_hash(key)[:2]}.write"


def is_regeneration_lock(name: str) -> bool:
    """Whether ``name`` (in ``locks/``) is a regeneration lock file (removed on release,
    so one left behind was its killed holder's)."""
    return len(name) == 45 and name.endswith(".lock")
