"""Precompressed pages: which responses get stored encodings, making them, and choosing one.

A cached page is served many times and changes rarely, so its gzip and brotli encodings
are made once, when the entry is made (the build and every regeneration), stored beside
it in every store, and served as they are: a HIT does no compression work. What this
module decides:

* **which entries** (:func:`compressible`): a page's or a route handler's response of a
  text type (HTML, CSS, JavaScript, JSON, XML, SVG, plain text, ``+json``/``+xml``), at
  least :data:`MIN_BYTES` long, with no ``Content-Encoding`` of its own. Data-cache
  entries never: they are values, not responses;
* **how** (:func:`encode`): gzip level :data:`GZIP_LEVEL` and brotli quality
  :data:`BROTLI_QUALITY`, each kept only when smaller than the body, on this module's own
  threads (:func:`compress_entry`), never on the event loop (both libraries release the
  GIL while they work, so the threads really run beside the loop);
* **which one a request gets** (:func:`negotiate`): ``Accept-Encoding`` with q-values,
  ``*`` and ``identity;q=0``, case-insensitive; the highest q wins, br before gzip on a
  tie; no header, or nothing acceptable, is the identity body.

The levels were chosen by measuring (one core of the development machine; a 98 KB and a
37 KB HTML page of real documentation; milliseconds per compression, size as a share of
the page)::

                 98 KB page          37 KB page
    gzip 1     0.93 ms  18.5 %     0.29 ms  27.9 %
    gzip 4     1.40 ms  16.4 %     0.43 ms  25.2 %
    gzip 6     2.07 ms  15.6 %     0.65 ms  24.6 %   <- GZIP_LEVEL
    gzip 9     3.21 ms  15.4 %     1.02 ms  24.5 %
    br 1       0.61 ms  18.2 %     0.11 ms  28.3 %
    br 4       1.43 ms  15.3 %     0.48 ms  24.3 %
    br 5       2.16 ms  14.3 %     0.70 ms  23.1 %   <- BROTLI_QUALITY
    br 6       2.29 ms  14.2 %     0.74 ms  23.1 %
    br 9      11.07 ms  14.0 %     9.31 ms  23.0 %
    br 11    134.97 ms  12.5 %    49.83 ms  20.4 %

gzip 6 gives nearly all of gzip 9's gain for two thirds of its time; brotli 5 is the
knee (quality 9 costs five times as much for 0.3 %, 11 sixty times for 2 %): both
encodings of a 100 KB page cost about 4 ms of a worker thread per regeneration, well
under what rendering it takes.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import brotli

from pyisr.cache.entry import CacheEntry, EntryKind

#: Bodies shorter than this are stored as they are: the saving would not pay for a variant.
MIN_BYTES = 1024
GZIP_LEVEL = 6
BROTLI_QUALITY = 5

#: Media types worth compressing (besides any ``+json`` or ``+xml`` type).
TEXT_TYPES = frozenset(
    {
        "text/html",
        "text/css",
        "text/plain",
        "text/javascript",
        "text/xml",
        "application/javascript",
        "application/json",
        "application/xml",
        "image/svg+xml",
    }
)
#: An entry without a ``Content-Type`` is served as HTML (pyisr.http.content_headers).
_DEFAULT_TYPE = "text/html"
#: Threads that compress, at most; their own, so neither user code nor storage I/O can
#: keep a page from being stored, and compressing never takes a render's thread.
THREADS = 4


def compressible(entry: CacheEntry) -> bool:
    """Whether ``entry`` gets stored encodings (see the module docstring)."""
    if entry.kind is EntryKind.DATA or len(entry.body) < MIN_BYTES or entry.encodings:
        return False
    own = entry.headers.get("content-encoding", "").strip().lower()
    if own and own != "identity":
        return False  # already encoded by the render: served as it is
    media = entry.headers.get("content-type", _DEFAULT_TYPE).split(";", 1)[0].strip().lower()
    return media in TEXT_TYPES or media.endswith("+json") or media.endswith("+xml")


class _Counts:
    """Bodies compressed by this process: what tests read to show a HIT compresses nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bodies = 0

    def add(self) -> None:
        with self._lock:
            self.bodies += 1


COUNTS = _Counts()


def encode(body: bytes) -> dict[str, bytes]:
    """The brotli and gzip encodings of ``body`` that are smaller than it, in the order
    pyisr prefers them when a request accepts both equally (brotli is smaller).

    Deterministic (gzip's header carries no time), so every process and every build make
    the same bytes from the same body. Blocking: call it off the event loop.
    """
    COUNTS.add()
    out: dict[str, bytes] = {}
    br = brotli.compress(body, mode=brotli.MODE_TEXT, quality=BROTLI_QUALITY)
    if len(br) < len(body):
        out["br"] = br
    gz = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
    if len(gz) < len(body):
        out["gzip"] = gz
    return out


_pool_state: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """This process's compression threads (made again in a forked child, which has none)."""
    global _pool_state
    with _pool_lock:
        if _pool_state is None or _pool_state[0] != os.getpid():
            threads = max(1, min(THREADS, os.cpu_count() or 1))
            _pool_state = (os.getpid(), ThreadPoolExecutor(threads, thread_name_prefix="pyisr-compress"))
        return _pool_state[1]


async def compress_entry(entry: CacheEntry) -> CacheEntry:
    """``entry`` with its encodings, made on the compression threads; ``entry`` itself when
    it gets none (:func:`compressible`, or no encoding was smaller)."""
    if not compressible(entry):
        return entry
    encodings = await asyncio.get_running_loop().run_in_executor(_pool(), encode, entry.body)
    return replace(entry, encodings=encodings) if encodings else entry


def _qvalue(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0  # a q-value we cannot read accepts nothing
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


#: Longer ``Accept-Encoding`` values are parsed every time rather than remembered (no
#: browser sends one; a client sending many long ones must not grow the memo).
_MEMO_LIMIT = 256


def negotiate(accept_encoding: str | None, offered: tuple[str, ...]) -> str | None:
    """The coding of ``offered`` (stored encodings, preferred first) a request with this
    ``Accept-Encoding`` gets, or ``None`` for the identity body.

    The highest q-value wins, the earlier of ``offered`` on a tie; a coding the header
    does not name takes ``*``'s q-value, else is not acceptable; ``x-gzip`` is ``gzip``
    (RFC 9110, 8.4.1.3); an ``identity`` the header names with a higher q than every
    coding wins. Nothing acceptable (``identity;q=0`` included) gets the identity body:
    RFC 9110, 12.5.3 allows it, and a page beats a 415. Remembered by value: clients send
    few distinct headers, so a HIT parses none.
    """
    if not accept_encoding or not offered:
        return None
    if len(accept_encoding) > _MEMO_LIMIT:
        return _negotiate(accept_encoding, offered)
    return _remembered(accept_encoding, offered)


def _negotiate(accept_encoding: str, offered: tuple[str, ...]) -> str | None:
    named: dict[str, float] = {}
    star: float | None = None
    for item in accept_encoding.split(","):
        coding, *params = item.split(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        if coding == "x-gzip":
            coding = "gzip"
        q = _qvalue(params)
        if coding == "*":
            star = q
        else:
            named[coding] = max(q, named.get(coding, 0.0))
    best: str | None = None
    best_q = 0.0
    for coding in offered:
        q = named.get(coding, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = coding, q
    if best is not None and named.get("identity", 0.0) > best_q:
        return None
    return best


_remembered = functools.lru_cache(maxsize=512)(_negotiate)
