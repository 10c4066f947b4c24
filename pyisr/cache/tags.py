"""Tags: validating the ones users write, deriving the implicit ones pyisr adds, and
recording when each was revalidated.

Implicit tags are how ``revalidate_path`` works without scanning the cache: every
entry carries a tag for its own path, its route pattern and each ancestor layout
segment, so invalidating a path, a route or a subtree is one tag-manifest write.

:class:`TagTimes` holds the one rule every copy of the tag manifest follows (the
memory handler's, the tier's mirror, the file-system tag log and its mirror, Redis'
mirror and its queue of invalidations made during an outage): of two times recorded
for the same tag, the later wins. Invalidations reach a process in any order (a
pub/sub message after a resync, a log line read after a newer one was applied), and
one reported late must never undo a newer one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

from pyisr.paths import normalize_path

#: Next.js limits (``NEXT_CACHE_TAG_MAX_LENGTH``, ``NEXT_CACHE_TAG_MAX_ITEMS``,
#: ``NEXT_CACHE_SOFT_TAG_MAX_LENGTH``).
MAX_TAG_LENGTH = 256
MAX_TAGS_PER_ENTRY = 128
MAX_PATH_LENGTH = 1024

IMPLICIT_PREFIX = "_pyisr:"
PATH_TAG = IMPLICIT_PREFIX + "path:"
PAGE_TAG = IMPLICIT_PREFIX + "page:"
LAYOUT_TAG = IMPLICIT_PREFIX + "layout:"
#: Where ``revalidate_tag(tag, stale=True)`` records its time: under a name of its own, so
#: every handler (memory, tag log, Redis and its pub/sub) stores and mirrors it like any
#: tag time, and the entry rule tells "stale from then on" from "invalidated".
STALE_TAG = IMPLICIT_PREFIX + "stale:"


def stale_tag(tag: str) -> str:
    """The name under which ``tag`` was marked stale (``revalidate_tag(tag, stale=True)``)."""
    return STALE_TAG + tag


@functools.lru_cache(maxsize=8192)
def stale_names(tags: tuple[str, ...]) -> tuple[str, ...]:
    """The stale-mark names of ``tags`` (memoised: an entry's tags are asked on every lookup,
    and building the names each time cost the full request path ~10%)."""
    return tuple(STALE_TAG + t for t in tags)


@functools.lru_cache(maxsize=8192)
def with_stale_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    """``tags`` and the names of their stale marks: every tag time an entry's rule reads."""
    return tags + stale_names(tags)


def validate_tags(tags: Iterable[object] | None, *, where: str = "tags") -> tuple[str, ...]:
    """Check user tags and return them de-duplicated in their original order.

    Raises ``ValueError`` rather than dropping a bad tag (as Next.js does with a
    warning), because a tag that is silently dropped is an invalidation that
    silently never happens.
    """
    if tags is None:
        return ()
    if isinstance(tags, str | bytes):
        raise ValueError(
            f"{where} must be a list of strings, not a single string {tags!r}: write tags=[{tags!r}]"
        )
    seen: dict[str, None] = {}
    for tag in tags:
        if not isinstance(tag, str):
            raise ValueError(f"{where}: tag {tag!r} must be a string, not {type(tag).__name__}")
        if not tag:
            raise ValueError(f"{where}: tags must not be empty strings")
        if len(tag) > MAX_TAG_LENGTH:
            raise ValueError(
                f"{where}: tag {tag[:40]!r}... is {len(tag)} characters; the limit is {MAX_TAG_LENGTH}"
            )
        if tag.startswith(IMPLICIT_PREFIX):
            raise ValueError(
                f"{where}: tag {tag!r} uses the reserved prefix {IMPLICIT_PREFIX!r}; "
                "use revalidate_path() for path-based invalidation"
            )
        seen[tag] = None
    if len(seen) > MAX_TAGS_PER_ENTRY:
        raise ValueError(f"{where}: {len(seen)} tags given; an entry may carry at most {MAX_TAGS_PER_ENTRY}")
    return tuple(seen)


def merge_tags(*groups: Iterable[str]) -> tuple[str, ...]:
    """Union of tag groups, first occurrence wins the position."""
    merged: dict[str, None] = {}
    for group in groups:
        for tag in group:
            merged[tag] = None
    return tuple(merged)


class TagTimes(dict[str, float]):
    """Tag -> the time it was last revalidated, only ever raised (see the module docstring).

    A ``dict`` so readers use it as the ``Mapping`` that ``CacheHandler.tag_times``
    returns; writers raise times through :meth:`record` and :meth:`merge`, not ``[]=``.
    """

    def record(self, tags: Iterable[str], at: float) -> list[str]:
        """Raise each of ``tags`` to ``at``; returns the tags whose time changed."""
        return self.merge(dict.fromkeys(tags, at))

    def merge(self, times: Mapping[str, float]) -> list[str]:
        """Raise each tag to the later of its two times; returns the tags whose time changed.

        Callers that keep a change log or a version number advance it for these only.
        """
        raised: list[str] = []
        for tag, at in times.items():
            if at > self.get(tag, float("-inf")):
                self[tag] = at
                raised.append(tag)
        return raised

    def pick(self, tags: Iterable[str]) -> dict[str, float]:
        """The times of ``tags``, leaving out those never revalidated (``tag_times``' answer)."""
        return {t: self[t] for t in tags if t in self}


def _prefixes(path: str) -> list[str]:
    """``/blog/[id]`` -> ``["/", "/blog", "/blog/[id]"]``."""
    parts = [p for p in path.split("/") if p]
    return ["/"] + ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def implicit_tags(path: str, route_pattern: str | None = None) -> tuple[str, ...]:
    """The tags every page entry for ``path`` (matched by ``route_pattern``) carries.

    ``route_pattern`` defaults to the path itself (a static route).
    """
    pattern = route_pattern or path
    layouts = _prefixes(pattern)
    if pattern != path:
        layouts += [p for p in _prefixes(path) if p not in layouts]
    return merge_tags(
        (LAYOUT_TAG + p for p in layouts),
        (PAGE_TAG + pattern,),
        (PATH_TAG + path,),
    )


def key_tag(key: str) -> str:
    """The tag every entry carries for its own key: a page's path tag, a data entry's key.

    Revalidating it invalidates that one entry in every process (and, for a data entry,
    the pages that read it, which inherit its tags): what ``pyisr cache purge`` does.
    """
    return PATH_TAG + key


def is_dynamic_pattern(path: str) -> bool:
    return "[" in path and "]" in path


def tags_for_revalidate_path(path: str, kind: str | None) -> tuple[str, ...]:
    """The implicit tags ``revalidate_path(path, kind)`` revalidates.

    ``kind=None`` targets one concrete path; ``"page"`` a route pattern (or a
    concrete path); ``"layout"`` everything at or below that segment.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"Invalid path {path!r} for revalidate_path(): must start with '/', e.g. '/blog/1'")
    if len(path) > MAX_PATH_LENGTH:
        raise ValueError(
            f"revalidate_path() received a path of {len(path)} characters; the limit is {MAX_PATH_LENGTH}"
        )
    if kind not in (None, "page", "layout"):
        raise ValueError(f"revalidate_path() type must be 'page' or 'layout', not {kind!r}")
    normalised = normalize_path(path)
    if kind == "layout":
        return (LAYOUT_TAG + normalised,)
    if kind == "page":
        if is_dynamic_pattern(normalised):
            return (PAGE_TAG + normalised,)
        return (PAGE_TAG + normalised, PATH_TAG + normalised)
    if is_dynamic_pattern(normalised):
        raise ValueError(
            f"revalidate_path({path!r}) names a route pattern but no type: pass "
            f"type='page' to revalidate every page of {path!r}, or 'layout' for everything "
            "below it"
        )
    return (PATH_TAG + normalised,)
