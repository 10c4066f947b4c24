"""URL patterns from file paths, and matching request keys against them.

``app/blog/[id]/page.py`` and ``pages/blog/[id].py`` both mean ``/blog/[id]``.
Segments are static (``blog``), dynamic (``[id]``), catch-all (``[...slug]``) or
optional catch-all (``[[...slug]]``); a static segment beats a dynamic one, which
beats a catch-all, as in Next.js. Fully static patterns are matched by one dict
lookup, so the common case costs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from pyisr.paths import normalize_path, split_key

T = TypeVar("T")

_DYNAMIC = re.compile(r"^\[([A-Za-z_][A-Za-z0-9_]*)\]$")
_CATCH_ALL = re.compile(r"^\[\.\.\.([A-Za-z_][A-Za-z0-9_]*)\]$")
_OPTIONAL = re.compile(r"^\[\[\.\.\.([A-Za-z_][A-Za-z0-9_]*)\]\]$")


class SegmentKind(IntEnum):
    STATIC = 0
    DYNAMIC = 1
    CATCH_ALL = 2
    OPTIONAL_CATCH_ALL = 3


@dataclass(frozen=True)
class Segment:
    kind: SegmentKind
    value: str  # the static text, or the parameter name


class PatternError(ValueError):
    pass


def parse_pattern(pattern: str) -> tuple[Segment, ...]:
    """``/blog/[id]`` -> segments; raises ``PatternError`` for malformed brackets."""
    segments: list[Segment] = []
    parts = [p for p in pattern.split("/") if p]
    names: set[str] = set()
    for i, part in enumerate(parts):
        if m := _OPTIONAL.match(part):
            seg = Segment(SegmentKind.OPTIONAL_CATCH_ALL, m.group(1))
        elif m := _CATCH_ALL.match(part):
            seg = Segment(SegmentKind.CATCH_ALL, m.group(1))
        elif m := _DYNAMIC.match(part):
            seg = Segment(SegmentKind.DYNAMIC, m.group(1))
        elif "[" in part or "]" in part:
            raise PatternError(
                f"segment {part!r} of {pattern!r} is not a valid dynamic segment: use [name], "
                "[...name] or [[...name]] with a Python identifier as name"
            )
        else:
            seg = Segment(SegmentKind.STATIC, part)
        if seg.kind is not SegmentKind.STATIC:
            if seg.value in names:
                raise PatternError(f"parameter {seg.value!r} appears twice in {pattern!r}")
            names.add(seg.value)
        if seg.kind >= SegmentKind.CATCH_ALL and i != len(parts) - 1:
            raise PatternError(f"catch-all segment {part!r} must be the last segment of {pattern!r}")
        segments.append(seg)
    return tuple(segments)


Params = dict[str, Any]


def _match(segments: tuple[Segment, ...], parts: list[str]) -> Params | None:
    params: Params = {}
    for i, seg in enumerate(segments):
        if seg.kind >= SegmentKind.CATCH_ALL:
            rest = parts[i:]
            if not rest and seg.kind is SegmentKind.CATCH_ALL:
                return None
            params[seg.value] = rest
            return params
        if i >= len(parts):
            return None
        if seg.kind is SegmentKind.STATIC:
            if parts[i] != seg.value:
                return None
        else:
            params[seg.value] = parts[i]
    return params if len(parts) == len(segments) else None


def path_for(segments: tuple[Segment, ...], params: Mapping[str, Any], pattern: str) -> str:
    """The cache key of ``pattern`` filled with ``params`` (from static params)."""
    out: list[str] = []
    for seg in segments:
        if seg.kind is SegmentKind.STATIC:
            out.append(seg.value)
            continue
        if seg.value not in params:
            if seg.kind is SegmentKind.OPTIONAL_CATCH_ALL:
                continue
            raise ValueError(f"static params {dict(params)!r} for {pattern} lack {seg.value!r}")
        value = params[seg.value]
        if seg.kind is SegmentKind.DYNAMIC:
            if not isinstance(value, str | int):
                raise ValueError(
                    f"param {seg.value!r} of {pattern} must be a string, got {value!r}; "
                    f"write {{{seg.value!r}: str(...)}}"
                )
            out.append(quote(str(value), safe=""))
        else:
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise ValueError(
                    f"catch-all param {seg.value!r} of {pattern} must be a list of strings, got {value!r}"
                )
            out.extend(quote(str(v), safe="") for v in value)
    return normalize_path("/" + "/".join(out))


@dataclass
class PatternRoute(Generic[T]):
    pattern: str
    target: T
    segments: tuple[Segment, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.segments:
            self.segments = parse_pattern(self.pattern)

    @property
    def is_static(self) -> bool:
        return all(s.kind is SegmentKind.STATIC for s in self.segments)

    def rank(self) -> tuple[tuple[int, str], ...]:
        # Static beats dynamic beats catch-all, segment by segment; longer static paths
        # first among equals. The text breaks ties so the order is deterministic.
        return tuple(
            (int(s.kind), s.value if s.kind is SegmentKind.STATIC else "") for s in self.segments
        ) + ((9, ""),)


class Router(Generic[T]):
    """Matches keys against patterns; static ones by dict, dynamic ones in precedence order."""

    def __init__(self, routes: Iterable[PatternRoute[T]]) -> None:
        self.routes = list(routes)
        self._static: dict[str, PatternRoute[T]] = {}
        dynamic: list[PatternRoute[T]] = []
        for route in self.routes:
            if route.is_static:
                self._static["/" + "/".join(s.value for s in route.segments)] = route
            else:
                dynamic.append(route)
        self._dynamic = sorted(dynamic, key=lambda r: r.rank())

    def match(self, key: str) -> tuple[PatternRoute[T], Params] | None:
        route = self._static.get(key)
        if route is not None:
            return route, {}
        parts = split_key(key)
        for route in self._dynamic:
            params = _match(route.segments, parts)
            if params is not None:
                return route, params
        return None
