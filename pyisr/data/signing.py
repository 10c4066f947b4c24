"""The key that signs pickled data-cache values: where it comes from, and how it is kept.

A signed pickle is only as safe as its key: anyone who can read it can forge values the
cache then unpickles, anyone who can replace it can too. So the key is
``PYISR_SIGNING_KEY`` when set (the same on every instance of a shared cache), else
whatever the store allows (:meth:`pyisr.cache.handler.CacheHandler.signing_key_home`):
a random key for a store private to this process, a key file beside a local cache
directory (created once, 0600, owned by this user, refused otherwise), and none at all
for a store other machines may share, where pyisr cannot make up a key the other
instances would agree on and refuses pickle instead.
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The environment variable holding the pickle signing key.
SIGNING_KEY_ENV = "PYISR_SIGNING_KEY"
#: Shorter secrets are refused: a guessable key would let anyone forge a pickle.
MIN_SIGNING_KEY_BYTES = 16
#: Bytes of a key file pyisr creates.
KEY_FILE_BYTES = 32


class SigningKeyError(ValueError):
    """``serializer="pickle"`` has no usable signing key; nothing was stored or read."""


_keys_lock = threading.Lock()
_process_key: bytes | None = None
_key_files: dict[Path, bytes] = {}


def _process_secret() -> bytes:
    global _process_key
    with _keys_lock:
        if _process_key is None:
            _process_key = secrets.token_bytes(KEY_FILE_BYTES)
        return _process_key


def _key_file_error(path: Path, problem: str) -> SigningKeyError:
    return SigningKeyError(
        f"pickle signing key file {path} {problem}. Fix or delete it (pyisr creates a new one), "
        f"or set {SIGNING_KEY_ENV}."
    )


def _read_key_file(path: Path, *, wait: float = 2.0) -> bytes:
    """An existing key file's key; waits a little for a creator still writing it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise _key_file_error(path, f"cannot be read ({exc.strerror})") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _key_file_error(path, "is not a regular file")
            # Anyone who can read the key can forge pickles; anyone who can replace it, too.
            if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
                raise _key_file_error(path, "belongs to another user")
            if info.st_mode & 0o077:
                raise _key_file_error(
                    path, f"is open to other users (mode {info.st_mode & 0o777:o}; chmod 600)"
                )
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        if len(data) >= KEY_FILE_BYTES:
            return data
        if time.monotonic() >= deadline:
            raise _key_file_error(path, f"holds {len(data)} bytes, fewer than {KEY_FILE_BYTES}")
        time.sleep(0.01)  # its creator has made it but not written it yet


def _create_key_file(path: Path) -> bytes | None:
    """A new key in a new file at ``path``, or ``None`` if the file exists already."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return None
    except OSError as exc:
        raise _key_file_error(path, f"cannot be created ({exc.strerror})") from exc
    key = secrets.token_bytes(KEY_FILE_BYTES)
    try:
        written = 0
        while written < len(key):
            written += os.write(fd, key[written:])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)  # an empty file would stop every later run
        raise
    os.close(fd)
    return key


def key_from_file(path: Path) -> bytes:
    """The key in ``path``, created there once (32 random bytes, mode 0600) if missing.

    Two processes creating it at once agree: ``O_EXCL`` lets one win and the other
    reads the winner's file. Cached per path for the life of the process.
    """
    with _keys_lock:
        key = _key_files.get(path)
        if key is None:
            key = _create_key_file(path) or _read_key_file(path)
            _key_files[path] = key
        return key


def signing_key(handler: object, *, where: str = "cached()") -> bytes:
    """The HMAC key for ``serializer="pickle"`` with ``handler``'s store, or :class:`SigningKeyError`."""
    configured = os.environ.get(SIGNING_KEY_ENV, "")
    if configured:
        secret = configured.encode("utf-8", "surrogateescape")
        if len(secret) < MIN_SIGNING_KEY_BYTES:
            raise SigningKeyError(
                f"{SIGNING_KEY_ENV} is {len(secret)} bytes long; use at least {MIN_SIGNING_KEY_BYTES} "
                "random bytes (e.g. the output of "
                '`python -c "import secrets; print(secrets.token_hex(32))"`).'
            )
        return secret
    home_of: Callable[[], Any] | None = getattr(handler, "signing_key_home", None)
    home = home_of() if home_of is not None else None
    if home == "process":
        return _process_secret()
    if isinstance(home, os.PathLike):
        return key_from_file(Path(home))
    name = getattr(handler, "name", type(handler).__name__)
    raise SigningKeyError(
        f'{where} uses serializer="pickle", which needs a signing key, and the {name!r} cache may be '
        f"shared with other machines or apps, so pyisr cannot make one up. Set {SIGNING_KEY_ENV} to a "
        "long random secret, the same on every instance (e.g. the output of "
        '`python -c "import secrets; print(secrets.token_hex(32))"`), or use the default '
        'serializer="json".'
    )
