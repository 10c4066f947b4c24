"""What happened to a store's entries: recent invalidations, hits, renders per minute.

"Why is this page stale?" is answered from three records a store keeps next to its
entries, all bounded whatever the traffic:

* :class:`Invalidation`: which tag, path or pattern was revalidated, when, and by whom
  (the endpoint, the CLI, code, an ORM signal); the last :data:`MAX_INVALIDATIONS`;
* hits per key, approximate (the server counts them in memory and reports them every
  few seconds), for the :data:`MAX_HIT_KEYS` most requested keys;
* counts per minute (hits, misses, regenerations, failures, invalidations) for the
  last :data:`MINUTES` minutes, what the dashboard's chart and hit ratio show.

Every process reports its own share (:class:`ActivityReport`); a shared store (Redis)
adds up every instance's. :class:`ActivityLog` is the in-memory form, used as is by the
memory store and by any handler that keeps no record of its own, and by the file-system
and Redis stores to merge and trim what they persist.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: Invalidations kept (a ring: the oldest go first).
MAX_INVALIDATIONS = 500
#: Keys whose hit counts are kept (the most requested; the rest are dropped when trimmed).
MAX_HIT_KEYS = 10_000
#: Minutes of per-minute counts kept.
MINUTES = 60
#: Longest stored invalidation record; one naming more tags keeps those that fit.
MAX_RECORD_BYTES = 8192
#: The per-minute counters (names shared by the server, the stores and the dashboard).
MINUTE_COUNTERS = ("hits", "stale", "misses", "regenerations", "failures", "invalidations")


@dataclass(frozen=True, slots=True)
class Invalidation:
    """One ``revalidate_tag`` / ``revalidate_path`` / ``revalidate(path)``, as recorded.

    ``kind`` is ``tag``, ``path`` (one path), ``page`` (every page of a route pattern),
    ``layout`` (a subtree) or ``regenerate`` (``revalidate(path)``: rendered now);
    ``target`` is what the caller named; ``tags`` the tag times it wrote; ``by`` who
    asked, in words (``POST /_pyisr/revalidate``, ``pyisr revalidate``, ``code at
    blog/views.py:42``, ``Django post_save blog.Post``).
    """

    at: float
    kind: str
    target: str
    tags: tuple[str, ...]
    by: str
    stale: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Invalidation:
        """Read one back from a store; what a store holds is data, never trusted further."""
        return cls(
            at=float(data["at"]),
            kind=str(data["kind"]),
            target=str(data["target"]),
            tags=tuple(str(t) for t in data.get("tags", ())),
            by=str(data.get("by", "")),
            stale=bool(data.get("stale", False)),
        )


# -- records as stores keep them ------------------------------------------------------------


def encode_invalidation(invalidation: Invalidation, max_bytes: int = MAX_RECORD_BYTES) -> bytes:
    """One record as compact JSON of at most about ``max_bytes`` (tags dropped to fit)."""
    data = invalidation.to_json()
    data["target"], data["by"] = data["target"][:2048], data["by"][:512]
    tags: list[str] = data["tags"]
    while True:
        record = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")
        if len(record) <= max_bytes or not tags:
            return record
        del tags[len(tags) // 2 :]  # halve until it fits: few passes even for 128 tags


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def parse_invalidation(raw: bytes) -> Invalidation | None:
    """A stored record read back (a line of the file-system log, an item of the Redis list),
    or ``None`` when it does not hold one: what a store holds is data, checked field by field."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    at = _finite(data.get("at"))
    tags = data.get("tags", [])
    fields = (data.get("kind"), data.get("target"), data.get("by", ""))
    if at is None or not isinstance(tags, list) or not all(isinstance(f, str) for f in fields):
        return None
    if not all(isinstance(t, str) for t in tags):
        return None
    try:
        return Invalidation.from_json(data)
    except (KeyError, TypeError, ValueError):
        return None


def minute_of(at: float) -> int:
    """The minute an epoch time falls in (epoch minutes)."""
    return int(at // 60)


@dataclass(slots=True)
class ActivityReport:
    """One process's activity since its last report: hits per key and counts per minute."""

    hits: dict[str, int] = field(default_factory=dict)
    minutes: dict[int, dict[str, int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.hits or self.minutes)

    def count(self, at: float, counter: str, n: int = 1) -> None:
        bucket = self.minutes.setdefault(minute_of(at), {})
        bucket[counter] = bucket.get(counter, 0) + n


@dataclass(slots=True)
class Activity:
    """What a store knows of its entries' activity (what ``pyisr cache`` and the dashboard read)."""

    invalidations: list[Invalidation] = field(default_factory=list)  # newest first
    hits: dict[str, int] = field(default_factory=dict)
    minutes: dict[int, dict[str, int]] = field(default_factory=dict)

    def invalidations_of(self, tags: Iterable[str]) -> list[Invalidation]:
        """The recorded invalidations that touched any of ``tags``, newest first."""
        wanted = set(tags)
        return [inv for inv in self.invalidations if wanted.intersection(inv.tags)]


def trim_hits(hits: dict[str, int], limit: int = MAX_HIT_KEYS) -> dict[str, int]:
    """The ``limit`` most requested keys of ``hits`` (all of them when there are fewer)."""
    if len(hits) <= limit:
        return hits
    return dict(heapq.nlargest(limit, hits.items(), key=lambda kv: kv[1]))


def trim_minutes(minutes: dict[int, dict[str, int]], now: float) -> dict[int, dict[str, int]]:
    """The buckets of the last :data:`MINUTES` minutes."""
    oldest = minute_of(now) - MINUTES + 1
    return {m: c for m, c in minutes.items() if m >= oldest}


def merge_report(
    hits: dict[str, int], minutes: dict[int, dict[str, int]], report: ActivityReport, now: float
) -> tuple[dict[str, int], dict[int, dict[str, int]]]:
    """``hits`` and ``minutes`` with ``report`` added, trimmed to their bounds."""
    for key, n in report.hits.items():
        hits[key] = hits.get(key, 0) + n
    for minute, counts in report.minutes.items():
        bucket = minutes.setdefault(minute, {})
        for name, n in counts.items():
            bucket[name] = bucket.get(name, 0) + n
    return trim_hits(hits), trim_minutes(minutes, now)


class ActivityLog:
    """The in-memory record: a ring of invalidations, bounded hit counts, recent minutes."""

    def __init__(self) -> None:
        self._invalidations: deque[Invalidation] = deque(maxlen=MAX_INVALIDATIONS)
        self._hits: dict[str, int] = {}
        self._minutes: dict[int, dict[str, int]] = {}

    def record_invalidation(self, invalidation: Invalidation) -> None:
        self._invalidations.append(invalidation)

    def add(self, report: ActivityReport, now: float) -> None:
        self._hits, self._minutes = merge_report(self._hits, self._minutes, report, now)

    def read(self, now: float, limit: int = MAX_INVALIDATIONS) -> Activity:
        newest_first = list(reversed(self._invalidations))[:limit]
        return Activity(newest_first, dict(self._hits), trim_minutes(dict(self._minutes), now))
