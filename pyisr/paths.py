"""Turning request paths into cache keys.

A key is the path with each segment percent-decoded (so ``/blog/%E3%81%82`` and
``/blog/あ`` are one entry), dot segments resolved, empty segments dropped, ``/index``
made ``/``, and only the four characters that would change a path's meaning if
decoded (``% / ? #``) kept encoded. Normalising a key again gives the same key.
"""

from __future__ import annotations

from urllib.parse import unquote

_KEEP_ENCODED = {"%": "%25", "/": "%2F", "?": "%3F", "#": "%23"}


#: The longest cache key, in UTF-8 bytes. A longer path is answered 414 before anything is
#: rendered or written: keys become file names and Redis keys, and a crawler sending
#: 65 kB paths must not be able to fill the cache with them.
MAX_KEY_BYTES = 1024


class BadPath(ValueError):
    """A request path that cannot be decoded (answered with 400)."""

    status = 400


class PathTooLong(BadPath):
    """A path whose key would be longer than :data:`MAX_KEY_BYTES` (answered with 414)."""

    status = 414


def _decode_segment(segment: str) -> str:
    if "%" not in segment:
        return segment
    # Strict decoding: Python's unquote leaves bad escapes alone, Next.js answers 400.
    i = 0
    while True:
        i = segment.find("%", i)
        if i < 0:
            break
        pair = segment[i + 1 : i + 3]
        if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            raise BadPath(f"invalid percent-encoding in path segment {segment!r}")
        i += 3
    try:
        return unquote(segment, errors="strict")
    except UnicodeDecodeError as exc:
        raise BadPath(f"path segment {segment!r} is not valid UTF-8") from exc


def _encode_segment(segment: str) -> str:
    for char, escaped in _KEEP_ENCODED.items():
        if char in segment:
            segment = segment.replace(char, escaped)
    return segment


def split_key(key: str) -> list[str]:
    """The decoded segments of a key (``%2F`` inside a segment becomes ``/`` here)."""
    return [unquote(s) for s in key.split("/") if s]


def normalize_path(path: str) -> str:
    """The cache key for a request path (without query string).

    Raises ``BadPath`` for malformed percent-encoding.
    """
    path = path.split("?", 1)[0].split("#", 1)[0]
    if len(path) > 3 * MAX_KEY_BYTES:  # refused before any decoding work: no real page has one
        raise PathTooLong(f"path is longer than {MAX_KEY_BYTES} bytes")
    segments: list[str] = []
    for raw in path.split("/"):
        if not raw:
            continue
        segment = _decode_segment(raw)
        if segment == ".":
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(_encode_segment(segment))
    if segments == ["index"]:
        # Only the root's ``/index`` is ``/`` (as in Next.js): ``/blog/index`` is the
        # ``[id]`` page for id "index", not the ``/blog`` page.
        segments = []
    key = "/" + "/".join(segments)
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise PathTooLong(f"path is longer than {MAX_KEY_BYTES} bytes")
    return key


def validate_revalidate_target(path: object) -> str:
    """Check a path handed to ``revalidate``/``revalidate_path`` and return its key."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"Invalid path {path!r}: must be a URL path starting with '/', e.g. '/blog/post-1'")
    return normalize_path(path)
