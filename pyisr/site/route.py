"""One route of a site, whichever style it was written in.

App-style pages (``revalidate``, ``dynamic_params``, ``generate_static_params``,
``page(params)``), Pages-style pages (``get_static_paths``, ``get_static_props``,
``page(props)`` or ``template``), route handlers (``GET``/``POST``...) and API routes
(``handler(request)``) all become a :class:`Route` that can list its static paths,
render a key into an :class:`~pyisr.engine.Rendered`, and describe its cache policy.

This module holds what every kind shares; each kind is one class in its own module
(``app_page``, ``pages_page``, ``route_handler``, ``api_route``) that builds itself from
its module and answers the questions below in its own way. The server branches on
:attr:`Route.kind` only where HTTP differs (which requests bypass the cache).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Self

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pyisr.cache.entry import EntryKind, Revalidate
from pyisr.cache.tags import implicit_tags
from pyisr.engine import UNSET, OnMissing, Rendered, RenderPolicy
from pyisr.http import HTML
from pyisr.origin import LOCALHOST, Origin
from pyisr.render_slots import call_in_thread
from pyisr.site import templates
from pyisr.site.loader import ExportCheck, SiteError
from pyisr.site.router import Params, PatternRoute, path_for
from pyisr.site.templates import has_template, render_template

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class RouteKind(StrEnum):
    APP_PAGE = "app page"
    PAGES_PAGE = "pages page"
    ROUTE_HANDLER = "route handler"
    API = "api route"


Fallback = bool | str  # False, True or "blocking"


async def call_maybe_async(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a user function that may be sync or async; sync ones run in a thread.

    Inside a render, the rendering engine's render threads, counted on its render slot
    (so a hung page function holds its slot, not the threads storage reads with);
    elsewhere (API routes, middleware, pages rendered per request) a bounded pool of
    their own (see pyisr.render_slots).
    """
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await call_in_thread(fn, *args)
    if inspect.isawaitable(result):
        result = await result
    return result


def as_rendered(result: Any, where: str) -> Rendered:
    """Turn what a page function returned into a Rendered result."""
    if isinstance(result, Rendered):
        return result
    if isinstance(result, Response):
        # Pairs, not a dict: a response may set several cookies (and is then never stored).
        headers = [(k, v) for k, v in result.headers.items() if k.lower() != "content-length"]
        return Rendered(bytes(result.body), status=result.status_code, headers=headers)
    if isinstance(result, str):
        return Rendered(result, headers={"content-type": HTML})
    if isinstance(result, bytes | bytearray):
        return Rendered(bytes(result), headers={"content-type": HTML})
    raise TypeError(
        f"{where} returned {type(result).__name__}; return HTML as a str or bytes, "
        "pyisr.render_template(...), or a starlette Response"
    )


def with_header(rendered: Rendered, name: str, value: str) -> Rendered:
    """``rendered`` with one more header, whichever form its headers have."""
    headers = rendered.headers
    if isinstance(headers, Mapping):
        rendered.headers = {**headers, name: value}
    else:
        rendered.headers = [*headers, (name, value)]
    return rendered


def handler_result(result: Any) -> Any:
    """A handler may return a dict or list, as in Next.js' ``Response.json``: answer it as JSON."""
    if isinstance(result, dict | list):
        return JSONResponse(result)
    return result


def not_found_result(revalidate: Any = UNSET) -> Rendered:
    """The site's 404 page, cached like the page that asked for it."""
    body = render_template("404.html") if has_template("404.html") else DEFAULT_404
    return Rendered(body, status=404, headers={"content-type": HTML}, revalidate=revalidate)


def redirect_result(destination: str, permanent: bool, revalidate: Any = UNSET) -> Rendered:
    """A 307 or 308, cached like the page that asked for it."""
    headers = {"location": destination, "content-type": "text/plain; charset=utf-8"}
    if permanent:
        headers["refresh"] = f"0;url={destination}"
    return Rendered(destination, status=308 if permanent else 307, headers=headers, revalidate=revalidate)


DEFAULT_404 = (
    "<!DOCTYPE html><html><head><meta charset='utf-8'><title>404: Not found</title></head>"
    "<body><h1>404</h1><p>This page could not be found.</p></body></html>"
)
DEFAULT_500 = (
    "<!DOCTYPE html><html><head><meta charset='utf-8'><title>500: Server error</title></head>"
    "<body><h1>500</h1><p>Internal server error.</p></body></html>"
)


class MethodNotAllowed(Exception):
    def __init__(self, allowed: list[str]) -> None:
        super().__init__(", ".join(allowed))
        self.allowed = allowed


@dataclass(frozen=True)
class StaticPaths:
    """What a route prerenders, and its fallback: computed, never stored on the route.

    The caller decides where the fallback goes (the build's manifest, a dev server's
    route), so listing the paths twice or failing half-way changes nothing.
    """

    keys: list[str]
    fallback: Fallback


@dataclass
class Route(ABC):
    """A route of the site: its pattern, its module and what the module declared.

    A subclass per :class:`RouteKind` answers how it renders, which unknown paths it
    renders, what it prerenders and which requests it handles itself.
    """

    #: Which kind of route this is; the server branches on it where HTTP differs.
    kind: ClassVar[RouteKind]
    #: The names a module of this kind may define; look-alikes are reported as mistakes.
    exports: ClassVar[tuple[str, ...]]
    #: What the engine stores this route's renders as.
    entry_kind: ClassVar[EntryKind] = EntryKind.PAGE
    #: Pages answer GET and HEAD only; route handlers and API routes answer their methods.
    is_page: ClassVar[bool] = False

    pattern: str
    file: Path
    module: ModuleType
    revalidate: Revalidate = None
    #: The module's ``expire`` (or its profile's); ``None``: the site's default.
    expire: int | None = None
    dynamic_params: bool = True
    fallback: Fallback = "blocking"
    tags: tuple[str, ...] = ()
    matcher: PatternRoute[Route] | None = field(default=None, repr=False)
    #: Keys prerendered by the build (filled in from the build manifest).
    prerendered: set[str] = field(default_factory=set)
    #: The site's Jinja2 environment, current while this route renders (site/templates.py).
    templates: Any = field(default=None, repr=False)

    @classmethod
    def from_module(cls, pattern: str, path: Path, module: ModuleType) -> tuple[Self | None, list[SiteError]]:
        """The route ``module`` declares, or every mistake in it (so one build lists them all)."""
        check = ExportCheck(path, module, cls.exports)
        route = cls.from_exports(pattern, check)
        return (None, check.errors) if check.errors else (route, [])

    @classmethod
    @abstractmethod
    def from_exports(cls, pattern: str, check: ExportCheck) -> Self:
        """This kind's route, read from its module through ``check``, which keeps every mistake."""

    # -- classification -----------------------------------------------------------------

    @property
    def is_isr(self) -> bool:
        """Served through the cache (pages and route handlers with a revalidate other than 0)."""
        return self.revalidate != 0

    @property
    def is_dynamic_pattern(self) -> bool:
        return "[" in self.pattern

    def describe_kind(self) -> str:
        """``static``, ``ISR 60s`` or ``dynamic``, for the build summary."""
        if not self.is_isr:
            return "dynamic"
        return "static" if self.revalidate is None else f"ISR {self.revalidate}s"

    # -- policy -------------------------------------------------------------------------

    def on_missing(self, key: str, *, bot: bool = False) -> OnMissing:
        """What the engine does with a key it has no entry for."""
        if key in self.prerendered or not self.is_dynamic_pattern:
            return OnMissing.RENDER
        return self.on_unknown_path(bot=bot)

    def on_unknown_path(self, *, bot: bool) -> OnMissing:
        """A path of a dynamic pattern the build did not prerender: rendered unless a kind says no."""
        return OnMissing.RENDER

    def policy(self, key: str, *, bot: bool = False) -> RenderPolicy:
        return RenderPolicy(
            kind=self.entry_kind,
            revalidate=self.revalidate,
            expire=self.expire,
            tags=self.tags + implicit_tags(key, self.pattern),
            on_missing=self.on_missing(key, bot=bot),
            route=self.pattern,
        )

    # -- static paths -------------------------------------------------------------------

    async def static_paths(self) -> StaticPaths:
        """The keys to prerender: one for a static pattern, the static params otherwise."""
        if not self.is_isr:
            return StaticPaths([], self.fallback)
        if not self.is_dynamic_pattern:
            key = path_for(self.matcher.segments if self.matcher else (), {}, self.pattern)
            return StaticPaths([key], self.fallback)
        assert self.matcher is not None
        return await self.dynamic_static_paths(self.matcher)

    async def dynamic_static_paths(self, matcher: PatternRoute[Route]) -> StaticPaths:
        """The static paths of a dynamic pattern: none unless the kind's module lists some."""
        return StaticPaths([], self.fallback)

    # -- rendering ----------------------------------------------------------------------

    def renderer(
        self, key: str, params: Params, *, fallback_shell: bool = False, origin: Origin = LOCALHOST
    ) -> Callable[[], Awaitable[Rendered]]:
        """A zero-argument render callable for the engine.

        ``origin`` is the scheme and host a route handler's request has (see pyisr.origin).
        """

        async def render() -> Rendered:
            token = templates.use(self.templates)
            try:
                return await self.render(key, params, fallback_shell=fallback_shell, origin=origin)
            finally:
                templates.reset(token)

        return render

    @abstractmethod
    async def render(
        self, key: str, params: Params, *, fallback_shell: bool = False, origin: Origin = LOCALHOST
    ) -> Rendered:
        """Render ``key`` for the cache (or for one visitor, when the route is dynamic)."""

    # -- request handlers (API routes, non-cached route handler methods) ------------------

    async def handle(self, request: Request) -> Response:
        """Answer ``request`` outside the cache with the module's function for its method."""
        fn = self.handler_for(request.method.upper())
        if fn is None:
            raise MethodNotAllowed(self.allowed_methods())
        result = handler_result(await call_maybe_async(fn, request))
        if isinstance(result, Response):
            return result
        rendered = as_rendered(result, f"{self.file}")
        return Response(rendered.body, status_code=rendered.status, headers=dict(rendered.headers))

    def handler_for(self, method: str) -> Callable[..., Any] | None:
        """The module's function named for ``method``; HEAD falls back to GET, as in Next.js."""
        fn = getattr(self.module, method, None)
        if fn is None and method == "HEAD":
            fn = getattr(self.module, "GET", None)
        return fn

    def allowed_methods(self) -> list[str]:
        return ["GET", "HEAD"]
