"""Which requests of an ASGI app are cached, and how long: the routes ``ISRMiddleware`` serves.

Three ways to say it, all compiled here: the ``@isr`` mark on an endpoint, route names
given to the middleware (both read from the app's own routes, so custom convertors,
mounts and the router's order mean exactly what they mean to the app), and plain
patterns (``{"/blog/{id}": 60}``) compiled with Starlette's own path compiler.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyisr.engine import RenderPolicy
from pyisr.integrations import Bypass, check_options, page_policy
from pyisr.lifetimes import Lifetime
from pyisr.paths import normalize_path

E = TypeVar("E")


@dataclass(frozen=True)
class ISRRoute:
    """One cached route: its Starlette pattern, compiled by Starlette, matched against keys."""

    pattern: str
    regex: re.Pattern[str]
    #: Starlette's format string of the pattern (``/docs/{slug}/``): the path the app routes.
    path_format: str
    #: The pattern in pyisr's spelling (``/blog/[id]``), for the implicit page tag.
    isr_pattern: str
    lifetime: Lifetime
    tags: tuple[str, ...]
    #: Who gets a fresh render of their own instead (``@isr(bypass=...)``).
    bypass: Bypass | None = None

    def match(self, key: str) -> dict[str, str] | None:
        """The pattern's values for cache key ``key``, or ``None``.

        Keys have no trailing slash, so a pattern with one (``/docs/{slug}/``) matches its
        key too, and ``/files/{rest:path}`` matches the bare ``/files`` (rest empty).
        """
        found = self.regex.match(key) or self.regex.match(key + "/")
        return found.groupdict() if found is not None else None

    def render_path(self, values: Mapping[str, str]) -> str:
        """The path the render requests: the pattern filled in, trailing slash and all.

        Built from the pattern rather than taken from the request, so ``/blog/1`` and
        ``/blog/1/`` (one cache key) render alike and never as the app's slash redirect.
        """
        return self.path_format.format_map(values)

    def policy(self, key: str) -> RenderPolicy:
        return page_policy(key, self.isr_pattern, self.lifetime, self.tags, route=self.pattern)


def _isr_pattern(path_format: str, convertors: Mapping[str, Any]) -> str:
    """Starlette's ``/files/{rest}`` with its convertors as pyisr's ``/files/[...rest]``."""
    from starlette.convertors import PathConvertor

    isr = path_format
    for name, convertor in convertors.items():
        hole = "{" + name + "}"
        if isinstance(convertor, PathConvertor):
            optional = isr.endswith("/" + hole)
            isr = isr.replace(hole, f"[[...{name}]]" if optional else f"[...{name}]")
        else:
            isr = isr.replace(hole, f"[{name}]")
    return normalize_path(isr)


def compile_route(
    pattern: str,
    revalidate: object,
    tags: Iterable[str] | None,
    *,
    expire: object = None,
    bypass: Bypass | None = None,
) -> ISRRoute:
    """Compile ``/blog/{id}``, ``/files/{rest:path}``, ``/item/{n:int}``... for key matching.

    Starlette's own path compiler and convertors (custom ones registered with
    ``starlette.convertors.register_url_convertor`` included), so a pattern means here
    exactly what it means to the app's router.
    """
    from starlette.routing import compile_path

    if not pattern.startswith("/"):
        raise ValueError(f"route pattern {pattern!r} must start with '/'")
    where = f"ISRMiddleware route {pattern!r}"
    lifetime, tag_tuple = check_options(revalidate, tags, where, expire)
    try:
        regex, path_format, convertors = compile_path(pattern)
    except AssertionError as exc:  # Starlette asserts on unknown convertors and repeated names
        raise ValueError(
            f"{where}: {exc} (a custom convertor must be registered with "
            "starlette.convertors.register_url_convertor before the middleware is made)"
        ) from None
    return ISRRoute(
        pattern=pattern,
        regex=regex,
        path_format=path_format,
        isr_pattern=_isr_pattern(path_format, convertors),
        lifetime=lifetime,
        tags=tag_tuple,
        bypass=bypass,
    )


# -- @isr: declaring a cached endpoint where it is defined --------------------------------------


@dataclass(frozen=True)
class EndpointOptions:
    """What ``@isr`` was given; the middleware reads it from the app's routes."""

    lifetime: Lifetime
    tags: tuple[str, ...]
    bypass: Bypass | None = None


def isr(
    revalidate: object = False,
    *,
    expire: object = None,
    tags: Iterable[str] | None = None,
    bypass: Bypass | None = None,
) -> Callable[[E], E]:
    """Cache a Starlette or FastAPI endpoint's GET/HEAD responses (``ISRMiddleware`` must
    be on the app). Returns the endpoint itself, marked, so the decorator order does not
    matter and FastAPI sees the same signature.

    ``revalidate``: seconds, ``False``/``None`` (until invalidated), a profile name or ``0``
    (never cached). ``expire``: seconds after which a page is never served. ``tags``: its
    explicit tags. ``bypass``: a callable of the visitor's ``starlette.requests.Request``
    returning true for a visitor who gets a fresh, never stored render of their own
    (``x-pyisr-cache: BYPASS``); requests in draft mode (``pyisr.draft``) always do.
    """
    lifetime, tag_tuple = check_options(revalidate, tags, "@isr", expire)
    if bypass is not None and not callable(bypass):
        raise ValueError(f"@isr bypass must be a callable of the request, not {bypass!r}")
    options = EndpointOptions(lifetime, tag_tuple, bypass)

    def mark(endpoint: E) -> E:
        endpoint.__pyisr_isr__ = options  # type: ignore[attr-defined]
        return endpoint

    return mark


@dataclass
class _Entry:
    """One route of the app, in the router's order: what it matches and whether it is cached."""

    regex: re.Pattern[str]
    methods: frozenset[str] | None
    cached: ISRRoute | None


@dataclass
class AppRoutes:
    """The app's routes flattened in the router's order (mounts followed), with the cached ones.

    A key is cached only when the first route that would answer a GET for it is a cached
    one, so ``/posts/new`` declared before ``/posts/{id}`` is never taken for a post.
    """

    entries: list[_Entry] = field(default_factory=list)
    cached: list[ISRRoute] = field(default_factory=list)

    def match(self, path: str) -> tuple[ISRRoute, dict[str, str]] | None:
        if not any(r.regex.match(path) or r.regex.match(path + "/") for r in self.cached):
            return None  # the common case: no cached route comes near this path
        candidates = (path,) if path.endswith("/") else (path, path + "/")
        for candidate in candidates:
            for entry in self.entries:
                found = entry.regex.match(candidate)
                if found is None or (entry.methods is not None and "GET" not in entry.methods):
                    continue
                if entry.cached is None:
                    return None
                return entry.cached, found.groupdict()
        return None


def discover(
    routes: Iterable[Any],
    named: Mapping[str, EndpointOptions],
    prefix: str = "",
    name_prefix: str = "",
    out: AppRoutes | None = None,
    seen: set[str] | None = None,
) -> AppRoutes:
    """Read the app's routes: the ``@isr`` endpoints and the ``named`` ones become cached.

    A route's path is taken as the router compiled it (``path_regex``, ``path_format``
    and ``param_convertors``); a route inside a ``Mount`` is compiled with the mount's
    prefix by Starlette's ``compile_path``. A mount of another app (static files, a
    sub-application) answers its whole prefix, uncached.
    """
    from starlette.routing import Mount, Route, compile_path

    out = out if out is not None else AppRoutes()
    seen = seen if seen is not None else set()
    for route in routes:
        if isinstance(route, Mount):
            inner = getattr(route, "routes", None)
            qualified = f"{name_prefix}{route.name}:" if route.name else name_prefix
            if inner:
                discover(inner, named, prefix + route.path, qualified, out, seen)
            else:
                regex = compile_path(prefix + route.path + "/{path:path}")[0]
                out.entries.append(_Entry(regex, None, None))
            continue
        if not isinstance(route, Route):
            continue  # websockets, hosts: never a cached GET
        name = f"{name_prefix}{route.name}" if route.name else ""
        options = getattr(route.endpoint, "__pyisr_isr__", None)
        if not isinstance(options, EndpointOptions):
            options = named.get(name) or named.get(route.name or "")
            if options is not None:
                seen.update(n for n in (name, route.name) if n in named)
        elif name in named or route.name in named:
            raise ValueError(f"ISRMiddleware: route {name!r} is decorated with @isr and named in routes")
        if prefix:
            regex, path_format, convertors = compile_path(prefix + route.path)
        else:
            regex, path_format, convertors = route.path_regex, route.path_format, route.param_convertors
        cached = None
        if options is not None:
            cached = ISRRoute(
                pattern=prefix + route.path,
                regex=regex,
                path_format=path_format,
                isr_pattern=_isr_pattern(path_format, convertors),
                lifetime=options.lifetime,
                tags=options.tags,
                bypass=options.bypass,
            )
            out.cached.append(cached)
        methods = frozenset(route.methods) if route.methods else None
        out.entries.append(_Entry(regex, methods, cached))
    return out


def missing_names(routes: Iterable[Any], named: Mapping[str, object]) -> list[str]:
    """The names in ``named`` that no route of the app carries (mounted ones qualified)."""
    from starlette.routing import Mount, Route

    names: set[str] = set()

    def walk(items: Iterable[Any], prefix: str) -> None:
        for route in items:
            if isinstance(route, Mount):
                walk(getattr(route, "routes", None) or (), f"{prefix}{route.name}:" if route.name else prefix)
            elif isinstance(route, Route) and route.name:
                names.update((route.name, prefix + route.name))

    walk(routes, "")
    return [n for n in named if n not in names]
