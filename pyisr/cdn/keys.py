"""Cache tags as a CDN sees them: the short, stable keys sent in ``Surrogate-Key`` and
``Cache-Tag`` and named again when a tag is purged.

One mapping for both directions, so a purge always names exactly the keys the responses
carried. What it must survive:

* **the CDNs' syntax**: keys are separated by spaces (``Surrogate-Key``: Varnish xkey,
  Fastly) or commas (``Cache-Tag``: Cloudflare), headers are ASCII, and Cloudflare folds
  case. A tag that is printable ASCII without separators and at most :data:`MAX_KEY_LENGTH`
  characters is sent as it is; any other is sent as ``h:`` and a digest of it;
* **the implicit tags** (``_pyisr:path:/blog/1``) in a short form: ``_p/blog/1`` for a
  path, ``_r/blog/[id]`` for a route's pages, ``_l/blog`` for a layout. A user tag of the
  same spelling purges a few pages too many, never too few;
* **the header's size** (Varnish refuses a response header line over 8 KB by default,
  Fastly and Cloudflare 16 KB): keys past :data:`MAX_HEADER_BYTES` are left out and the
  response carries :data:`OVERFLOW_KEY` instead, which every purge names too. A page
  with too many tags is then purged by any purge, a few too many, never missed.

Stale marks (``revalidate_tag(tag, stale=True)``) have no key of their own: they purge
the tag's key (softly where the CDN can). A site server's answers also carry the key of
the build they come from (:func:`build_key`), so a deploy can purge the previous build's
pages (:mod:`pyisr.cdn.deploys`).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Sequence

from pyisr.cache.tags import LAYOUT_TAG, PAGE_TAG, PATH_TAG, STALE_TAG

#: Longest key sent as written; longer ones are hashed (``h:`` + 32 hex digits).
MAX_KEY_LENGTH = 128
#: Bytes of one header's value at most (half Varnish's default line limit).
MAX_HEADER_BYTES = 4096
#: The key of every response whose keys did not all fit; named by every purge.
OVERFLOW_KEY = "_o"

#: The key of every answer of one build: ``_b/`` and the build id (already plain ASCII).
BUILD_KEY_PREFIX = "_b/"

SURROGATE_KEY = "surrogate-key"
CACHE_TAG = "cache-tag"
#: Header name -> separator of its keys.
TAG_HEADERS = {SURROGATE_KEY: " ", CACHE_TAG: ","}

_SHORT = ((PATH_TAG, "_p"), (PAGE_TAG, "_r"), (LAYOUT_TAG, "_l"))
#: Printable ASCII without space, comma, quote or backslash.
_PLAIN = re.compile(r"[!#-+\--\[\]-~]+")


@functools.lru_cache(maxsize=16384)
def edge_key(tag: str) -> str:
    """The key that stands for ``tag`` at the edge (stable across processes and releases)."""
    if tag.startswith(STALE_TAG):
        tag = tag[len(STALE_TAG) :]
    for prefix, short in _SHORT:
        if tag.startswith(prefix):
            candidate = short + tag[len(prefix) :]
            break
    else:
        candidate = tag
    if len(candidate) <= MAX_KEY_LENGTH and _PLAIN.fullmatch(candidate):
        return candidate
    return "h:" + hashlib.blake2b(tag.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def edge_keys(tags: Iterable[str]) -> list[str]:
    """The keys of ``tags``, de-duplicated in order."""
    return list(dict.fromkeys(edge_key(t) for t in tags))


def purge_keys(tags: Iterable[str]) -> list[str]:
    """What a purge of ``tags`` names: their keys, and :data:`OVERFLOW_KEY`."""
    keys = edge_keys(tags)
    return [*keys, OVERFLOW_KEY] if keys else []


def build_key(build_id: str) -> str:
    """The key every answer of build ``build_id`` carries, and a purge of that build names."""
    return BUILD_KEY_PREFIX + build_id


def _fit(keys: Sequence[str], separator: str) -> str:
    """Keys joined by ``separator``, within :data:`MAX_HEADER_BYTES` (else ending in the overflow key)."""
    value = separator.join(keys)
    if len(value) <= MAX_HEADER_BYTES:
        return value
    budget = MAX_HEADER_BYTES - len(OVERFLOW_KEY)
    kept: list[str] = []
    used = 0
    for key in keys:  # the implicit tags come last in an entry: its own path is kept first
        if used + len(key) + 1 > budget:
            continue
        kept.append(key)
        used += len(key) + 1
    return separator.join([*kept, OVERFLOW_KEY])


def _entry_order(tags: tuple[str, ...], build: str | None) -> list[str]:
    """An entry's own path and route first, its build's key, then its tags, then its
    layouts: what must fit."""
    first = [t for t in tags if t.startswith(PATH_TAG) or t.startswith(PAGE_TAG)]
    layouts = [t for t in tags if t.startswith(LAYOUT_TAG)]
    rest = [t for t in tags if t not in first and t not in layouts]
    keys = edge_keys(first)
    if build is not None:
        keys.append(build_key(build))
    return list(dict.fromkeys([*keys, *edge_keys([*rest, *layouts])]))


@functools.lru_cache(maxsize=8192)
def tag_headers(
    tags: tuple[str, ...], names: tuple[str, ...], build: str | None = None
) -> tuple[tuple[bytes, bytes], ...]:
    """The ready header lines (``names``, of :data:`TAG_HEADERS`) for an entry's ``tags``
    as build ``build`` serves it.

    Memoised: an entry's tags are the same on every answer, so a HIT pays one lookup.
    """
    if not tags or not names:
        return ()
    keys = _entry_order(tags, build)
    return tuple((name.encode(), _fit(keys, TAG_HEADERS[name]).encode("ascii")) for name in names)


def parse_tag_headers(value: object) -> tuple[str, ...]:
    """``cdn_tag_headers``: a list of header names (or a comma-separated string), or ``none``."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError('expected a list of header names, such as ["Surrogate-Key", "Cache-Tag"], or "none"')
    names = [i.strip().lower() for i in items if i.strip()]
    if names in (["none"], []):
        return ()
    unknown = [n for n in names if n not in TAG_HEADERS]
    if unknown:
        raise ValueError(f"unknown header {unknown[0]!r}: pyisr sends Surrogate-Key and Cache-Tag")
    return tuple(dict.fromkeys(names))
