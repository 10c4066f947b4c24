"""One route of a site, whichever style it was written in.

App-style pages (``revalidate``, ``dynamic_params``, ``generate_static_params``,
``page(params)``), Pages-style pages (``get_static_paths``, ``get_static_props``,
``page(props)`` or ``template``), route handlers (``GET``/``POST``...) and API routes
(``handler(request)``) all become a :class:`Route` that can list its static paths,
render a key into an :class:`~pyisr.engine.Rendered`, and describe its cache policy.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pyisr.cache.entry import EntryKind, Revalidate
from pyisr.cache.tags import implicit_tags
from pyisr.engine import UNSET, OnMissing, Rendered, RenderPolicy
from pyisr.http import HTML, PROPS_HEADER
from pyisr.origin import LOCALHOST, Origin
from pyisr.site.routes import Params, PatternRoute, path_for
from pyisr.site.signals import NotFoundSignal, RedirectSignal
from pyisr.site.templates import has_template, render_template

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class RouteKind(StrEnum):
    APP_PAGE = "app page"
    PAGES_PAGE = "pages page"
    ROUTE_HANDLER = "route handler"
    API = "api route"


Fallback = bool | str  # False, True or "blocking"


async def call_maybe_async(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a user function that may be sync or async; sync ones run in a thread."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    import asyncio
    import contextvars

    ctx = contextvars.copy_context()
    result = await asyncio.get_running_loop().run_in_executor(None, lambda: ctx.run(fn, *args))
    if inspect.isawaitable(result):
        result = await result
    return result


def _body_of(result: Any, where: str) -> Rendered:
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


def _with_header(rendered: Rendered, name: str, value: str) -> Rendered:
    """``rendered`` with one more header, whichever form its headers have."""
    headers = rendered.headers
    if isinstance(headers, Mapping):
        rendered.headers = {**headers, name: value}
    else:
        rendered.headers = [*headers, (name, value)]
    return rendered


def not_found_result(revalidate: Any = UNSET) -> Rendered:
    body = render_template("404.html") if has_template("404.html") else DEFAULT_404
    return Rendered(body, status=404, headers={"content-type": HTML}, revalidate=revalidate)


def redirect_result(destination: str, permanent: bool, revalidate: Any = UNSET) -> Rendered:
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


def validate_props_revalidate(value: Any, key: str) -> Revalidate:
    """Check ``get_static_props``' ``revalidate`` the way Next.js does (SPEC S-25)."""
    if value is None or value is False:
        return None
    if value is True:
        return 1
    if isinstance(value, float) and not math.isnan(value) and not value.is_integer():
        raise ValueError(
            f"A page's revalidate option must be seconds expressed as a natural number for {key}. "
            f"Mixed numbers, such as {value!r}, cannot be used."
        )
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isnan(value) or value <= 0:
            raise ValueError(
                f"A page's revalidate option can not be less than or equal to zero for {key} "
                f"(got {value!r}). To never revalidate, return revalidate=False."
            )
        return int(value)
    raise ValueError(
        f"A page's revalidate option must be seconds expressed as a natural number. Mixed numbers "
        f"and strings cannot be used. Received {value!r} for {key}."
    )


@dataclass
class Route:
    kind: RouteKind
    pattern: str
    file: Path
    module: ModuleType
    revalidate: Revalidate = None
    dynamic_params: bool = True
    fallback: Fallback = "blocking"
    tags: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("GET", "HEAD")
    matcher: PatternRoute[Route] | None = field(default=None, repr=False)
    #: Keys prerendered by the build (filled in from the build manifest).
    prerendered: set[str] = field(default_factory=set)

    # -- classification -----------------------------------------------------------------

    @property
    def is_page(self) -> bool:
        return self.kind in (RouteKind.APP_PAGE, RouteKind.PAGES_PAGE)

    @property
    def is_isr(self) -> bool:
        """Served through the cache (pages and route handlers with a revalidate other than 0)."""
        if self.kind is RouteKind.API:
            return False
        if self.kind is RouteKind.ROUTE_HANDLER:
            return hasattr(self.module, "revalidate") and self.revalidate != 0 and "GET" in self.methods
        return self.revalidate != 0

    @property
    def is_dynamic_pattern(self) -> bool:
        return "[" in self.pattern

    def describe_kind(self) -> str:
        """``static``, ``ISR 60s`` or ``dynamic``, for the build summary."""
        if not self.is_isr:
            return "dynamic" if self.kind is not RouteKind.API else "api"
        if self.kind is RouteKind.PAGES_PAGE and hasattr(self.module, "get_static_props"):
            return "ISR (per page)"
        return "static" if self.revalidate is None else f"ISR {self.revalidate}s"

    # -- policy -------------------------------------------------------------------------

    def on_missing(self, key: str, *, bot: bool = False) -> OnMissing:
        if key in self.prerendered or not self.is_dynamic_pattern:
            return OnMissing.RENDER
        if self.kind is RouteKind.APP_PAGE:
            return OnMissing.RENDER if self.dynamic_params else OnMissing.NOT_FOUND
        if self.kind is RouteKind.PAGES_PAGE:
            if self.fallback is False:
                return OnMissing.NOT_FOUND
            if self.fallback is True and not bot:
                return OnMissing.FALLBACK
        return OnMissing.RENDER

    def policy(self, key: str, *, bot: bool = False) -> RenderPolicy:
        return RenderPolicy(
            kind=EntryKind.ROUTE if self.kind is RouteKind.ROUTE_HANDLER else EntryKind.PAGE,
            revalidate=self.revalidate,
            tags=self.tags + implicit_tags(key, self.pattern),
            on_missing=self.on_missing(key, bot=bot),
            route=self.pattern,
        )

    # -- static paths -------------------------------------------------------------------

    async def static_keys(self) -> list[str]:
        """The keys to prerender: one for a static pattern, the static params otherwise."""
        if not self.is_isr or self.kind is RouteKind.API:
            return []
        if not self.is_dynamic_pattern:
            return [path_for(self.matcher.segments if self.matcher else (), {}, self.pattern)]
        assert self.matcher is not None
        where = f"{self.file}"
        if self.kind is RouteKind.APP_PAGE:
            fn = getattr(self.module, "generate_static_params", None)
            if fn is None:
                return []
            params_list = await call_maybe_async(fn)
            if not isinstance(params_list, list | tuple):
                raise TypeError(f"{where}: generate_static_params() must return a list of dicts")
            return [
                path_for(self.matcher.segments, _check_params(p, where), self.pattern) for p in params_list
            ]
        fn = getattr(self.module, "get_static_paths", None)
        if fn is None:
            return []
        result = await call_maybe_async(fn)
        if not isinstance(result, dict) or "paths" not in result:
            raise TypeError(f"{where}: get_static_paths() must return {{'paths': [...], 'fallback': ...}}")
        fallback = result.get("fallback", False)
        if fallback not in (True, False, "blocking"):
            raise ValueError(
                f"{where}: get_static_paths() fallback must be False, True or 'blocking', not {fallback!r}"
            )
        self.fallback = fallback
        keys = []
        for item in result["paths"]:
            if isinstance(item, str):
                from pyisr.paths import normalize_path

                keys.append(normalize_path(item))
            elif isinstance(item, dict) and isinstance(item.get("params"), dict):
                keys.append(path_for(self.matcher.segments, item["params"], self.pattern))
            else:
                raise TypeError(
                    f"{where}: get_static_paths() paths must be '/path' strings or "
                    f"{{'params': {{...}}}} dicts, not {item!r}"
                )
        return keys

    # -- rendering ----------------------------------------------------------------------

    def renderer(
        self, key: str, params: Params, *, fallback_shell: bool = False, origin: Origin = LOCALHOST
    ) -> Callable[[], Awaitable[Rendered]]:
        """A zero-argument render callable for the engine.

        ``origin`` is the scheme and host a route handler's request has (see pyisr.origin).
        """

        async def render() -> Rendered:
            return await self.render(key, params, fallback_shell=fallback_shell, origin=origin)

        return render

    async def render(
        self, key: str, params: Params, *, fallback_shell: bool = False, origin: Origin = LOCALHOST
    ) -> Rendered:
        if self.kind is RouteKind.APP_PAGE:
            return await self._render_app(key, params)
        if self.kind is RouteKind.PAGES_PAGE:
            return await self._render_pages(key, params, fallback_shell=fallback_shell)
        if self.kind is RouteKind.ROUTE_HANDLER:
            request = synthetic_request(key, origin)
            return _body_of(
                _handler_result(await call_maybe_async(self.module.GET, request)), f"{self.file} GET"
            )
        raise TypeError(f"{self.kind} routes are not rendered into the cache")

    async def _render_app(self, key: str, params: Params) -> Rendered:
        try:
            result = await call_maybe_async(self.module.page, params)
        except NotFoundSignal:
            return not_found_result()
        except RedirectSignal as sig:
            return redirect_result(sig.destination, sig.permanent)
        return _body_of(result, f"{self.file} page()")

    async def _render_pages(self, key: str, params: Params, *, fallback_shell: bool) -> Rendered:
        if fallback_shell:
            from pyisr import context as render_context

            token = render_context.enter(render_context.RenderContext(key=key, is_fallback=True))
            try:
                return await self._render_pages_body({}, None, params)
            finally:
                render_context.leave(token)
        gsp = getattr(self.module, "get_static_props", None)
        if gsp is None:
            return await self._render_pages_body({}, None, params)
        result = await call_maybe_async(gsp, params)
        if not isinstance(result, dict):
            raise TypeError(
                f"{self.file}: get_static_props() must return a dict, not {type(result).__name__}"
            )
        extra = set(result) - {"props", "revalidate", "not_found", "redirect"}
        if extra:
            raise ValueError(
                f"{self.file}: get_static_props() returned unknown keys {sorted(extra)}; allowed: "
                "props, revalidate, not_found, redirect"
            )
        revalidate = validate_props_revalidate(result.get("revalidate"), key)
        if result.get("not_found") and result.get("redirect"):
            raise ValueError(f"{self.file}: get_static_props() cannot return both not_found and redirect")
        if result.get("not_found"):
            return _with_header(not_found_result(revalidate), PROPS_HEADER, json.dumps({"not_found": True}))
        if result.get("redirect"):
            target = result["redirect"]
            if not isinstance(target, dict) or not isinstance(target.get("destination"), str):
                raise ValueError(
                    f"{self.file}: redirect must be {{'destination': '/path', 'permanent': False}}, "
                    f"not {target!r}"
                )
            rendered = redirect_result(target["destination"], bool(target.get("permanent")), revalidate)
            return _with_header(rendered, PROPS_HEADER, json.dumps({"redirect": target}))
        props = result.get("props", {})
        if not isinstance(props, dict):
            raise TypeError(f"{self.file}: get_static_props() 'props' must be a dict")
        return await self._render_pages_body(props, revalidate, params)

    async def _render_pages_body(
        self, props: dict[str, Any], revalidate: Revalidate, params: Params
    ) -> Rendered:
        page_fn = getattr(self.module, "page", None)
        if page_fn is not None:
            result = await call_maybe_async(page_fn, props)
        else:
            template = self.module.template
            result = render_template(template, **props, props=props, params=params)
        rendered = _body_of(result, f"{self.file} page()")
        try:
            props_json = json.dumps({"props": props}, default=str)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{self.file}: props must be JSON-serialisable: {exc}") from exc
        rendered.revalidate = revalidate
        return _with_header(rendered, PROPS_HEADER, props_json)

    # -- request handlers (API routes, non-cached route handler methods) ------------------

    async def handle(self, request: Request) -> Response:
        if self.kind is RouteKind.API:
            fn = self.module.handler
        else:
            method = request.method.upper()
            fn = getattr(self.module, method, None)
            if fn is None and method == "HEAD":
                fn = getattr(self.module, "GET", None)
        if fn is None:
            raise MethodNotAllowed(self.allowed_methods())
        result = _handler_result(await call_maybe_async(fn, request))
        if isinstance(result, Response):
            return result
        rendered = _body_of(result, f"{self.file}")
        return Response(rendered.body, status_code=rendered.status, headers=dict(rendered.headers))

    def allowed_methods(self) -> list[str]:
        if self.kind is RouteKind.API:
            return list(HTTP_METHODS)
        if self.is_page:
            return ["GET", "HEAD"]
        methods = [m for m in HTTP_METHODS if hasattr(self.module, m)]
        if "GET" in methods and "HEAD" not in methods:
            methods.insert(methods.index("GET") + 1, "HEAD")
        return methods


class MethodNotAllowed(Exception):
    def __init__(self, allowed: list[str]) -> None:
        super().__init__(", ".join(allowed))
        self.allowed = allowed


def _handler_result(result: Any) -> Any:
    if isinstance(result, dict | list):
        return JSONResponse(result)
    return result


def _check_params(params: Any, where: str) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise TypeError(f"{where}: generate_static_params() items must be dicts, not {params!r}")
    return params


def synthetic_request(path: str, origin: Origin = LOCALHOST) -> Request:
    """A GET for ``path`` from no one, at ``origin``: what a cached route handler renders against."""
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", origin.host.encode("latin-1"))],
        "scheme": origin.scheme,
        "server": (origin.hostname, origin.port),
        "client": None,
        "root_path": "",
        "http_version": "1.1",
    }
    return Request(scope)
