"""Who asked for an invalidation, in words an operator reads in ``pyisr cache explain``.

Entry points that know who they act for say so with :func:`invalidated_by` (the
revalidate endpoint, the CLI, the Django and SQLAlchemy signals); any other caller is
code, named by the first frame outside pyisr (``code at blog/views.py:42``). The label
travels in a context variable, so it reaches the engine through ``revalidate_tag`` and
``revalidate_path`` without changing their signatures, across ``await`` and into tasks
started under it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_by: ContextVar[str | None] = ContextVar("pyisr_invalidated_by", default=None)

#: Directory of the pyisr package: frames inside it are never "the caller".
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: Labels are shown and stored, not parsed: long ones are cut.
MAX_LABEL = 200


@contextmanager
def invalidated_by(label: str) -> Iterator[None]:
    """Record invalidations made inside this block as done by ``label``."""
    token = _by.set(label[:MAX_LABEL])
    try:
        yield
    finally:
        _by.reset(token)


def current_source() -> str:
    """Who is invalidating now: the innermost :func:`invalidated_by` label, else the calling code."""
    label = _by.get()
    return label if label is not None else _calling_code()


def _calling_code() -> str:
    """``code at <file>:<line>`` of the nearest frame outside pyisr and the event loop's machinery."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_PACKAGE) and not _is_plumbing(filename):
            return f"code at {_short(filename)}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "code"


def _is_plumbing(filename: str) -> bool:
    """Frames of asyncio, threads and contextlib: they run the caller's code, they are not it."""
    return filename.startswith("<") or any(
        part in filename for part in (f"{os.sep}asyncio{os.sep}", "threading.py", "contextlib.py")
    )


def _short(filename: str) -> str:
    """A path relative to the working directory when it is under it (shorter, and no home names)."""
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return relative if not relative.startswith("..") else os.path.basename(filename)
