"""Small file operations that stay correct when several processes share a directory.

* **Atomic replacement**: data goes to a temporary file in the target's directory,
  is fsynced, and is renamed over the target; a reader sees the old file or the new
  one, never half of one, and a crash leaves at most a temporary file. Temporary
  files are named ``.<final name>.<token>.tmp`` (:func:`write_temp`), so they never
  collide with a real file and whoever lists the directory can tell them apart.
* **Durability**: a rename survives a power cut only once its directory is fsynced
  (:func:`fsync_dir`), not just once the file is.
* **Locks**: ``flock`` on a lock file (:func:`exclusive_lock`, :func:`shared_lock`),
  always through a fresh descriptor. flock belongs to the open file description, so
  separate descriptors conflict even inside one process (and across threads), and the
  OS drops the lock when the process dies, so a killed holder never blocks anyone.
* **Lock files that go away** (``remove=True``, for locks named after a key, which
  would otherwise leave one file per key ever locked): the holder unlinks the file
  while it still holds the lock, and whoever takes such a lock checks afterwards that
  the path still names the inode it locked (``fstat`` of its descriptor against
  ``stat`` of the path), starting again if not. A file is only ever unlinked by the
  holder of its lock, so once that check passes nobody can remove or replace the path
  until we release: two processes never hold the "same" lock through two inodes.
  Every user of such a path must pass ``remove=True``; lock files that stay (the
  write-lock stripes, ``tags.lock``, ``build.lock``) skip the check.

POSIX only (``fcntl.flock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def read_file(path: Path) -> bytes | None:
    """The file's bytes, or ``None`` if it does not exist (other errors propagate)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` survive a power cut, not just a crashed process."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path) -> int:
    """Create ``directory`` and its missing parents; returns how many were made.

    Unlike ``Path.mkdir(parents=True)``, counts them (each costs a block on disk).
    Raises ``FileNotFoundError`` when a parent is removed meanwhile: try again.
    """
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    made = 0
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
            made += 1
    return made


def remove_empty_dirs(directory: Path, *, keep: Path) -> int:
    """Remove ``directory`` and its parents while they are empty, stopping at the children
    of ``keep`` (never removed); returns how many were removed."""
    removed = 0
    while directory.parent != keep and keep in directory.parents:
        try:
            os.rmdir(directory)
        except OSError:  # not empty (the usual case), or gone
            break
        removed += 1
        directory = directory.parent
    return removed


def write_temp(directory: Path, final_name: str, data: bytes, token: str, fsync: bool = True) -> Path:
    """Write ``data`` to a fresh temporary file beside ``final_name`` (fsynced unless told not to).

    The file must not exist yet: a token shared by mistake fails loudly instead of
    mixing two writes.
    """
    path = directory / f".{final_name}.{token}{TEMP_SUFFIX}"
    with open(path, "xb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never half of one.

    With ``fsync`` (the default) the new file also survives a power cut once this
    returns; without, only a crashed process.
    """
    temp = write_temp(path.parent, path.name, data, secrets.token_hex(6), fsync)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (it may write fewer than asked)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:  # someone emptied the directory by hand
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def still_named(fd: int, path: Path) -> bool:
    """True when ``path`` still names the file open as ``fd`` (no holder removed it meanwhile)."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_ino, mine.st_dev) == (current.st_ino, current.st_dev)


@contextlib.contextmanager
def _flocked(path: Path, mode: int, remove: bool = False) -> Iterator[None]:
    """Hold ``flock(mode)`` on ``path`` (created if needed) through a fresh descriptor.

    With ``remove`` (exclusive locks only), the file is unlinked before the lock is let
    go, and taking it checks that the path still names the file locked; see the module
    docstring for why that is safe. Costs a file creation per use, and two system calls.
    """
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, mode)
            if not remove or still_named(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # we locked a file its last holder had removed: take the new one
    try:
        yield
    finally:
        if remove:
            with contextlib.suppress(OSError):  # e.g. a file system turned read-only
                os.unlink(path)
        os.close(fd)  # closing releases the lock


def exclusive_lock(
    path: Path, *, blocking: bool, remove: bool = False
) -> contextlib.AbstractContextManager[None]:
    """Hold the exclusive flock on ``path`` for the ``with`` block.

    ``blocking=False`` raises ``BlockingIOError`` at once, on entering the block, when
    another descriptor holds the lock, for callers that must not wait (one build of a
    site at a time, one regeneration of a key). ``remove=True`` unlinks the lock file on
    release, so locks named after keys leave no files behind; every user of that path
    must pass it.
    """
    mode = fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
    return _flocked(path, mode, remove)


def shared_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """Hold a shared flock on ``path``: shared holders run together, never with an exclusive one."""
    return _flocked(path, fcntl.LOCK_SH)
