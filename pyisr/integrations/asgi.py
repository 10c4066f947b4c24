"""ISR for any ASGI app (Starlette, FastAPI): a middleware that caches chosen routes.

Declare a cached endpoint where it is defined, and add the middleware once::

    from fastapi import FastAPI
    from pyisr.integrations.asgi import ISRMiddleware, isr

    app = FastAPI()

    @app.get("/posts/{id}")
    @isr(revalidate=60, tags=["posts"])
    async def post_detail(id: int): ...

    app.add_middleware(ISRMiddleware)          # add it first: see "Order" below

Routes can also be named in the middleware (``routes=["post_detail"]``, or
``{"post_detail": 60}``), or given as patterns (``routes={"/blog/{id}": 60}``). Named
and decorated routes are read from the app's own routes (their compiled path and
convertors, custom ones included, and the app's route order), so the middleware caches
exactly the paths the router sends to them.

For GET and HEAD requests that such a route answers, the app's response *is* the render:
the engine stores it and serves it with stale-while-revalidate, single-flight renders
and keep-last-good, exactly as for a pyisr site. Everything else (other paths, other
methods, websockets, lifespan) passes straight through.

Order. ``app.add_middleware`` puts the last one added outermost. Add ``ISRMiddleware``
first, so it sits inside the others: ``SessionMiddleware`` and authentication run before
it (``bypass=`` can read ``request.session`` and ``request.user``) and ``CORSMiddleware``
adds its headers to cached responses for each visitor. Added the other way round, it
still works: a ``CORSMiddleware`` inside it is applied to every cached answer, and a
session inside it never sees the visitor's cookie, so all visitors share one page.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import quote, unquote

from pyisr.engine import Engine, Rendered, RenderFn, RenderPolicy
from pyisr.http import private_cache_control
from pyisr.integrations import (
    _PATH_SAFE,
    BYPASS_HEADERS,
    DEFAULT_ALLOW_HEADERS,
    Bypass,
    FailedResponse,
    PageAnswer,
    allow_list,
    check_options,
    is_bypassed,
    key_for_decoded_path,
    serve_page,
)
from pyisr.integrations.asgi_routes import (
    AppRoutes,
    EndpointOptions,
    ISRRoute,
    compile_route,
    discover,
    isr,
    missing_names,
)
from pyisr.origin import CanonicalOrigin, Origin
from pyisr.paths import BadPath
from pyisr.rewarm import DEFAULT_RATE, Rewarmer
from pyisr.runtime import get_engine

logger = logging.getLogger("pyisr.integrations")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_BYPASS_RAW = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in BYPASS_HEADERS]


class _Capture:
    """Plays the server for one render: an empty GET body in, the whole response out."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.done = asyncio.Event()
        self._asked = False

    async def receive(self) -> Message:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # Apps that watch for a disconnect (streaming responses) must not see one early.
        await self.done.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self.headers = [
                (bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
                for k, v in message.get("headers", ())
            ]
        elif kind == "http.response.body":
            self.body.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                self.done.set()


class _SessionProbe(dict[str, Any]):
    """An empty session that notes whether the render looked at it or wrote to it.

    A page that reads the session depends on who visits (and a write would be lost):
    such a render is answered to its own visitor and never stored.
    """

    touched = False

    def _touch(self) -> None:
        self.touched = True

    def __getitem__(self, key: str) -> Any:
        self._touch()
        return super().__getitem__(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self._touch()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._touch()
        super().__delitem__(key)

    def __contains__(self, key: object) -> bool:
        self._touch()
        return super().__contains__(key)

    def __iter__(self) -> Any:
        self._touch()
        return super().__iter__()

    def __len__(self) -> int:
        self._touch()
        return super().__len__()

    def get(self, key: str, default: Any = None) -> Any:
        self._touch()
        return super().get(key, default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._touch()
        return super().setdefault(key, default)

    def pop(self, key: str, *default: Any) -> Any:
        self._touch()
        return super().pop(key, *default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._touch()
        super().update(*args, **kwargs)

    def clear(self) -> None:
        self._touch()
        super().clear()

    def keys(self) -> Any:
        self._touch()
        return super().keys()

    def values(self) -> Any:
        self._touch()
        return super().values()

    def items(self) -> Any:
        self._touch()
        return super().items()


#: Keys of the visitor's scope a shared render may keep: the protocol and the mount,
#: and the application object (``request.app``), none of which depends on the visitor.
_KEPT_SCOPE_KEYS = ("asgi", "http_version", "root_path", "app")


def _trusted_hosts(scope: Scope) -> tuple[str, ...]:
    """The hosts a Starlette ``TrustedHostMiddleware`` in the app allows, if there is one."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    for spec in getattr(scope.get("app"), "user_middleware", ()):
        if getattr(spec, "cls", None) is TrustedHostMiddleware:
            hosts = spec.kwargs.get("allowed_hosts", spec.args[0] if spec.args else None)
            return tuple(hosts or ())
    return ()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def _send_no_store(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Let the app answer its visitor itself, marked so no cache on the way keeps it."""

    async def send_marked(message: Message) -> None:
        if message["type"] == "http.response.start":
            own = None
            headers = []
            for name, value in message.get("headers", ()):
                if bytes(name).lower() == b"cache-control":
                    own = bytes(value).decode("latin-1")
                else:
                    headers.append((name, value))
            cache_control = private_cache_control(own).encode("latin-1")
            message = {**message, "headers": [*headers, (b"cache-control", cache_control)]}
        await send(message)

    await app(scope, receive, send_marked)


async def _send_bypass(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Let the app answer a bypassed visitor itself: never stored by anyone, and said so."""

    async def send_marked(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [
                (k, v)
                for k, v in message.get("headers", ())
                if bytes(k).lower() not in (b"cache-control", b"x-pyisr-cache")
            ]
            message = {**message, "headers": [*headers, *_BYPASS_RAW]}
        await send(message)

    await app(scope, receive, send_marked)


def _cors_inside(app: Any) -> list[Any]:
    """The ``CORSMiddleware`` instances between this middleware and the router, outermost first.

    A cached answer never passes through them, so their headers are added to it for
    each visitor (with ``Vary: Origin``) exactly as they would have been.
    """
    from starlette.middleware.cors import CORSMiddleware

    found = []
    current = app
    for _ in range(64):
        if isinstance(current, CORSMiddleware):
            found.append(current)
        current = getattr(current, "app", None)
        if current is None:
            break
    return found


def _routes_holder(scope: Scope, app: Any) -> Any:
    """What holds the app's routes: the Starlette/FastAPI app of the scope, or one inside us."""
    candidate = scope.get("app")
    if getattr(candidate, "routes", None) is not None:
        return candidate
    current = app
    for _ in range(64):
        if current is None:
            return None
        if isinstance(getattr(current, "routes", None), list):
            return current
        current = getattr(current, "app", None)
    return None


class ISRMiddleware:
    """Serve the app's GET/HEAD responses for chosen routes through the ISR engine.

    Cached routes: every endpoint marked with :func:`isr`, and ``routes``: route names
    (``["post_detail"]``, or ``{"post_detail": 60}`` with a revalidate each) read from
    the app's routes, or Starlette patterns (``{"/blog/{id}": 60}``; ``/docs/{rest:path}``,
    ``/n/{n:int}``), matched first, in their order. A name or pattern without its own
    revalidate takes ``revalidate`` (default: until invalidated) and ``expire``. ``tags``
    maps a name or pattern to its explicit tags. ``bypass``: a callable of the visitor's
    ``starlette.requests.Request``, true for visitors who get a fresh render of their own
    on every cached route (draft mode always bypasses). ``engine`` defaults to pyisr's
    process-wide engine.

    The cache key is the normalised request path: the query string never makes a new
    entry, and trailing-slash variants share one. Because one render is served to every
    visitor, the app renders a *synthetic* request: a GET for the route's path with no
    query string, no body, and only the request headers in ``allow_headers`` (default:
    none; cookies, ``authorization`` and ``origin`` are refused). Response headers that
    are per-visitor or per-hop (``set-cookie``, ``vary``, ``date``...) are not stored.

    A 5xx response or an exception is a failed render: never stored, the last good page
    keeps being served; with nothing cached the visitor gets the app's own 5xx
    (``no-store``) or the exception propagates. Responses must be finite (a stream that
    never ends times out as a failed render).

    Creating the middleware registers its routes for ``await pyisr.revalidate(path)``;
    call it from the app's own event loop, as the render runs the app there.

    The render's scope is built from nothing: never the visitor's ``session``, ``user``,
    ``auth``, ``client`` or middleware ``state`` (a fresh copy of the lifespan state
    instead). Its scheme and host are ``site_url`` (default ``PYISR_SITE_URL``); without
    one, the request's own Host when it is in ``allowed_hosts`` or the app's
    ``TrustedHostMiddleware``; else ``http://localhost``. A render that sets a cookie,
    says ``private``/``no-store``/``Vary: *`` or touches the session is never stored:
    the app answers each visitor itself (``no-store``) and a shared render is tried
    again a minute later.

    After a wide invalidation (a tag, a route's pages, a layout) the most requested
    cached pages are rendered again in the background, ``rewarm_rate`` a second at most
    (:mod:`pyisr.rewarm`; ``0``: off), from the app's lifespan start-up to its shutdown:
    an app served without lifespan events has none.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[str, object] | Iterable[str] | None = None,
        tags: Mapping[str, Iterable[str]] | None = None,
        *,
        revalidate: object = False,
        expire: object = None,
        bypass: Bypass | None = None,
        engine: Engine | None = None,
        allow_headers: Iterable[str] = DEFAULT_ALLOW_HEADERS,
        site_url: str | None = None,
        allowed_hosts: Iterable[str] = (),
        rewarm_rate: float = DEFAULT_RATE,
    ) -> None:
        self.app = app
        if not rewarm_rate >= 0:
            raise ValueError(f"ISRMiddleware rewarm_rate must be >= 0 pages per second, not {rewarm_rate!r}")
        self.rewarm_rate = rewarm_rate
        #: Started once the app's lifespan start-up completed, stopped at its shutdown.
        self.rewarmer: Rewarmer | None = None
        given: dict[str, object] = (
            dict(routes) if isinstance(routes, Mapping) else dict.fromkeys(routes or (), revalidate)
        )
        tags = dict(tags or {})
        unknown = set(tags) - set(given)
        if unknown:
            raise ValueError(f"ISRMiddleware tags given for patterns not in routes: {sorted(unknown)}")
        if bypass is not None and not callable(bypass):
            raise ValueError(f"ISRMiddleware bypass must be a callable of the request, not {bypass!r}")
        self.bypass = bypass
        self.routes = [
            compile_route(p, rv, tags.get(p), expire=expire) for p, rv in given.items() if p.startswith("/")
        ]
        #: Route names, resolved against the app's routes at the first request.
        self.named = {
            name: EndpointOptions(*check_options(rv, tags.get(name), f"ISRMiddleware route {name!r}", expire))
            for name, rv in given.items()
            if not name.startswith("/")
        }
        allowed = allow_list(allow_headers)
        if "origin" in allowed:
            raise ValueError(
                "allow_headers must not include 'origin': CORS headers made for one origin "
                "would be served to every other"
            )
        # The host a render sees is the canonical one, never a header passed along.
        self.allow_headers = {h.encode("latin-1") for h in allowed} - {b"host"}
        self.origin = CanonicalOrigin(site_url, allowed_hosts, where="ISRMiddleware site_url")
        self._engine = engine
        #: The app's routes (decorated and named), read at the first request or lifespan.
        self._app_routes: AppRoutes | None = None
        self._cors: list[Any] | None = None
        #: The app's lifespan state: each render gets a fresh copy, as each request does.
        self._lifespan_state: dict[str, Any] | None = None
        #: Hosts of the app's TrustedHostMiddleware, found at the first request.
        self._trusted: tuple[str, ...] | None = None
        #: What ``revalidate(path)`` renders with: the kept keys of the first request's scope.
        self._base: Scope = {"asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1"}
        self._installed_on: Engine | None = None
        self._install()

    @property
    def engine(self) -> Engine:
        """The engine given, or the process default at the time of the request."""
        return self._engine if self._engine is not None else get_engine()

    def _install(self) -> Engine:
        """The engine to use now, with this middleware's paths known to ``revalidate()``."""
        engine = self.engine
        if engine is not self._installed_on:
            engine.add_resolver(self._resolve)
            self._installed_on = engine
        return engine

    def _read_app(self, scope: Scope) -> None:
        """Read the app's routes and middleware once (the first lifespan or request)."""
        if self._app_routes is not None:
            return
        holder = _routes_holder(scope, self.app)
        routes = holder.routes if holder is not None else ()
        missing = missing_names(routes, self.named)
        if missing:
            raise ValueError(f"ISRMiddleware routes name no route of the app: {sorted(missing)}")
        found = discover(routes, self.named)
        self._cors = _cors_inside(self.app)
        self._app_routes = found

    def match(self, key: str, root_path: str = "") -> tuple[ISRRoute, dict[str, str], str] | None:
        """The cached route for cache key ``key``, its parameters and the prefix of its path.

        Patterns first, against the whole key; then the app's routes, against the key
        without the ``root_path`` (as the router sees it).
        """
        for route in self.routes:
            values = route.match(key)
            if values is not None:
                return route, values, ""
        if self._app_routes is None or not self._app_routes.cached:
            return None
        path = key
        if root_path and (key == root_path or key.startswith(root_path + "/")):
            path = key[len(root_path) :] or "/"
        elif root_path:
            return None
        found = self._app_routes.match(path)
        return (found[0], found[1], root_path) if found is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            if isinstance(scope.get("state"), dict):
                self._lifespan_state = scope["state"]
            if not self.origin.configured:
                self.origin.warn_once()
            if self.rewarm_rate > 0:
                receive, send = self._rewarm_with_lifespan(receive, send)
        self._read_app(scope)  # once: revalidate(path) from any request knows the routes
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        try:
            key = key_for_decoded_path(scope["path"])
        except BadPath:  # a path too long to be a key: the app answers it, nothing is cached
            await self.app(scope, receive, send)
            return
        root_path = scope.get("root_path", "") or ""
        found = self.match(key, key_for_decoded_path(root_path).rstrip("/") if root_path else "")
        if found is None:
            await self.app(scope, receive, send)
            return
        route, values, prefix = found
        if self._bypassed(scope, route):
            await _send_bypass(self.app, scope, receive, send)
            return
        engine = self._install()
        if engine.app_build is not None:
            engine.app_build.begin_serving(engine)
        failed = FailedResponse()
        if self._trusted is None:
            self._trusted = _trusted_hosts(scope)
            self._base = {k: scope[k] for k in _KEPT_SCOPE_KEYS if k in scope}
        origin = self.origin.for_request(scope.get("scheme", "http"), _header(scope, b"host"), self._trusted)
        render = self._renderer(prefix + route.render_path(values), scope, origin, failed)
        answer = await serve_page(
            engine,
            key,
            render,
            route.policy(key),
            failed,
            if_none_match=_header(scope, b"if-none-match"),
            head=scope["method"] == "HEAD",
            accept_encoding=_header(scope, b"accept-encoding"),
        )
        if answer is None:
            # The page belongs to its visitor: the app answers this one itself.
            await _send_no_store(self.app, scope, receive, send)
            return
        await self._send_answer(answer, scope, send)

    def _rewarm_with_lifespan(self, receive: Receive, send: Send) -> tuple[Receive, Send]:
        """The lifespan's channels, watched: the re-warmer starts once the app's start-up
        completed (its engine is configured by then) and stops when shutdown begins."""

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown" and self.rewarmer is not None:
                rewarmer, self.rewarmer = self.rewarmer, None
                await rewarmer.stop()
            return message

        async def watched_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and self.rewarmer is None:
                self.rewarmer = Rewarmer(self._install(), self.rewarm_rate)
                self.rewarmer.start()
            await send(message)

        return watched_receive, watched_send

    def _bypassed(self, scope: Scope, route: ISRRoute) -> bool:
        """Draft mode, the middleware's ``bypass`` or the route's: the visitor renders fresh."""
        checks = [b for b in (self.bypass, route.bypass) if b is not None]
        cookies = _header(scope, b"cookie")
        if not checks and cookies is None:
            return False
        from starlette.requests import Request

        def either(request: Any) -> bool:
            return any(check(request) for check in checks)

        return is_bypassed(Request(scope), either if checks else None, cookies)

    async def _send_answer(self, answer: PageAnswer, scope: Scope, send: Send) -> None:
        """Send a cached answer, through the CORS middleware inside us when there is one."""
        out: Send = send
        if self._cors:
            from starlette.datastructures import Headers

            request_headers = Headers(scope=scope)
            for cors in self._cors:  # outermost first: each wraps the send of the one outside it
                out = functools.partial(cors.send, send=out, request_headers=request_headers)
        await out({"type": "http.response.start", "status": answer.status, "headers": list(answer.headers)})
        await out({"type": "http.response.body", "body": answer.body})

    def _render_scope(self, original: Scope, path: str, origin: Origin) -> tuple[Scope, _SessionProbe | None]:
        """A scope built from nothing but the path, the canonical origin and allowed headers.

        Also returns the empty session given to the render when the app has sessions.
        """
        raw = quote(path, safe=_PATH_SAFE + "%")
        scope: Scope = {k: original[k] for k in _KEPT_SCOPE_KEYS if k in original}
        scope.update(
            type="http",
            method="GET",
            scheme=origin.scheme,
            server=(origin.hostname, origin.port),
            client=None,
            path=unquote(raw),
            raw_path=raw.encode("ascii"),
            query_string=b"",
            headers=[(b"host", origin.host.encode("latin-1"))]
            + [(k, v) for k, v in original.get("headers", ()) if k.lower() in self.allow_headers],
            # No zero-copy or path-send: the render must hand us the bytes.
            extensions={},
        )
        if "state" in original or self._lifespan_state is not None:
            scope["state"] = dict(self._lifespan_state or {})
        session = None
        if "session" in original:
            session = scope["session"] = _SessionProbe()
        if "user" in original or "auth" in original:
            from starlette.authentication import AuthCredentials, UnauthenticatedUser

            scope["user"] = UnauthenticatedUser()
            scope["auth"] = AuthCredentials()
        return scope, session

    def _renderer(self, path: str, original: Scope, origin: Origin, failed: FailedResponse) -> RenderFn:
        async def render() -> Rendered:
            scope, session = self._render_scope(original, path, origin)
            capture = _Capture()
            try:
                await self.app(scope, capture.receive, capture.send)
            except Exception:
                if capture.status is None or capture.status < 500:
                    raise
                # Starlette's ServerErrorMiddleware sends its 500 page, then re-raises.
                logger.error("%s: the app raised while rendering", path, exc_info=True)
            finally:
                capture.done.set()
            if capture.status is None:
                raise RuntimeError(f"the app sent no response for {path}")
            body = b"".join(capture.body)
            if capture.status >= 500:
                failed.response = (capture.status, capture.headers, body)
            private = "reads the session" if session is not None and session.touched else None
            return Rendered(body, status=capture.status, headers=capture.headers, private=private)

        return render

    async def _resolve(self, key: str) -> tuple[str, RenderFn, RenderPolicy] | None:
        """``pyisr.revalidate(path)``: render a matching path like a request would."""
        root_path = str(self._base.get("root_path", "") or "")
        found = self.match(key, key_for_decoded_path(root_path).rstrip("/") if root_path else "")
        if found is None:
            return None
        route, values, prefix = found
        origin = self.origin.default(self._trusted or ())
        render = self._renderer(prefix + route.render_path(values), self._base, origin, FailedResponse())
        return key, render, route.policy(key)


__all__ = ["AppRoutes", "EndpointOptions", "ISRMiddleware", "ISRRoute", "compile_route", "discover", "isr"]
