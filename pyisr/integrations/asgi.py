"""ISR for any ASGI app (Starlette, FastAPI): a middleware that caches chosen routes.

::

    from fastapi import FastAPI
    from pyisr.integrations.asgi import ISRMiddleware

    app = FastAPI()
    app.add_middleware(
        ISRMiddleware,
        routes={"/": False, "/blog/{id}": 60},   # pattern -> revalidate (False: until invalidated)
        tags={"/blog/{id}": ["posts"]},
    )

For GET and HEAD requests whose path matches a pattern, the app's response *is* the
render: the engine stores it and serves it with stale-while-revalidate, single-flight
renders and keep-last-good, exactly as for a pyisr site. Everything else (other paths,
other methods, websockets, lifespan) passes straight through.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from pyisr.engine import Engine, Rendered, RenderFn, RenderPolicy
from pyisr.http import private_cache_control
from pyisr.integrations import (
    _PATH_SAFE,
    DEFAULT_ALLOW_HEADERS,
    FailedResponse,
    allow_list,
    check_options,
    key_for_decoded_path,
    page_policy,
    serve_page,
)
from pyisr.lifetimes import Lifetime
from pyisr.origin import CanonicalOrigin, Origin
from pyisr.paths import BadPath, normalize_path
from pyisr.runtime import get_engine

logger = logging.getLogger("pyisr.integrations")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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


def compile_route(pattern: str, revalidate: object, tags: Iterable[str] | None) -> ISRRoute:
    """Compile ``/blog/{id}``, ``/files/{rest:path}``, ``/item/{n:int}``... for key matching.

    Starlette's own path compiler and convertors (custom ones registered with
    ``starlette.convertors.register_url_convertor`` included), so a pattern means here
    exactly what it means to the app's router.
    """
    from starlette.convertors import PathConvertor
    from starlette.routing import compile_path

    if not pattern.startswith("/"):
        raise ValueError(f"route pattern {pattern!r} must start with '/'")
    where = f"ISRMiddleware route {pattern!r}"
    lifetime, tag_tuple = check_options(revalidate, tags, where)
    try:
        regex, path_format, convertors = compile_path(pattern)
    except AssertionError as exc:  # Starlette asserts on unknown convertors and repeated names
        raise ValueError(
            f"{where}: {exc} (a custom convertor must be registered with "
            "starlette.convertors.register_url_convertor before the middleware is made)"
        ) from None
    isr = path_format
    for name, convertor in convertors.items():
        hole = "{" + name + "}"
        if isinstance(convertor, PathConvertor):
            optional = isr.endswith("/" + hole)
            isr = isr.replace(hole, f"[[...{name}]]" if optional else f"[...{name}]")
        else:
            isr = isr.replace(hole, f"[{name}]")
    return ISRRoute(
        pattern=pattern,
        regex=regex,
        path_format=path_format,
        isr_pattern=normalize_path(isr),
        lifetime=lifetime,
        tags=tag_tuple,
    )


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


class ISRMiddleware:
    """Serve the app's GET/HEAD responses for chosen routes through the ISR engine.

    ``routes`` maps Starlette-style patterns (``/blog/{id}``, ``/docs/{rest:path}``,
    ``/n/{n:int}``) to a revalidate: seconds, ``False``/``None`` (until invalidated) or
    ``0`` (never cached); the first matching pattern wins. ``tags`` maps a pattern to
    its explicit tags. ``engine`` defaults to pyisr's process-wide engine.

    The cache key is the normalised request path: the query string never makes a new
    entry, and trailing-slash variants share one. Because one render is served to every
    visitor, the app renders a *synthetic* request: a GET for the route's path with no
    query string, no body, and only the request headers in ``allow_headers`` (default:
    ``host`` only; cookies and ``authorization`` are refused). Response headers that are
    per-visitor or per-hop (``set-cookie``, ``vary``, ``date``...) are not stored.

    A 5xx response or an exception is a failed render: never stored, the last good page
    keeps being served; with nothing cached the visitor gets the app's own 5xx
    (``no-store``) or the exception propagates. Responses must be finite (a stream that
    never ends times out as a failed render).

    Patterns are matched against ``scope["path"]`` (which includes any ``root_path``).
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
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[str, object],
        tags: Mapping[str, Iterable[str]] | None = None,
        *,
        engine: Engine | None = None,
        allow_headers: Iterable[str] = DEFAULT_ALLOW_HEADERS,
        site_url: str | None = None,
        allowed_hosts: Iterable[str] = (),
    ) -> None:
        self.app = app
        tags = dict(tags or {})
        unknown = set(tags) - set(routes)
        if unknown:
            raise ValueError(f"ISRMiddleware tags given for patterns not in routes: {sorted(unknown)}")
        self.routes = [compile_route(p, rv, tags.get(p)) for p, rv in routes.items()]
        # The host a render sees is the canonical one, never a header passed along.
        self.allow_headers = {h.encode("latin-1") for h in allow_list(allow_headers)} - {b"host"}
        self.origin = CanonicalOrigin(site_url, allowed_hosts, where="ISRMiddleware site_url")
        self._engine = engine
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

    def match(self, key: str) -> tuple[ISRRoute, dict[str, str]] | None:
        """The first route whose pattern matches the cache key, and its parameters."""
        for route in self.routes:
            values = route.match(key)
            if values is not None:
                return route, values
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            if scope["type"] == "lifespan":
                if isinstance(scope.get("state"), dict):
                    self._lifespan_state = scope["state"]
                if not self.origin.configured:
                    self.origin.warn_once()
            await self.app(scope, receive, send)
            return
        try:
            key = key_for_decoded_path(scope["path"])
        except BadPath:  # a path too long to be a key: the app answers it, nothing is cached
            await self.app(scope, receive, send)
            return
        found = self.match(key)
        if found is None:
            await self.app(scope, receive, send)
            return
        route, values = found
        engine = self._install()
        failed = FailedResponse()
        if self._trusted is None:
            self._trusted = _trusted_hosts(scope)
            self._base = {k: scope[k] for k in _KEPT_SCOPE_KEYS if k in scope}
        origin = self.origin.for_request(scope.get("scheme", "http"), _header(scope, b"host"), self._trusted)
        render = self._renderer(route, values, scope, origin, failed)
        answer = await serve_page(
            engine,
            key,
            render,
            route.policy(key),
            failed,
            if_none_match=_header(scope, b"if-none-match"),
            head=scope["method"] == "HEAD",
        )
        if answer is None:
            # The page belongs to its visitor: the app answers this one itself.
            await _send_no_store(self.app, scope, receive, send)
            return
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        await send({"type": "http.response.body", "body": answer.body})

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

    def _renderer(
        self,
        route: ISRRoute,
        values: Mapping[str, str],
        original: Scope,
        origin: Origin,
        failed: FailedResponse,
    ) -> RenderFn:
        path = route.render_path(values)

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
        found = self.match(key)
        if found is None:
            return None
        route, values = found
        origin = self.origin.default(self._trusted or ())
        return key, self._renderer(route, values, self._base, origin, FailedResponse()), route.policy(key)


__all__ = ["ISRMiddleware", "ISRRoute", "compile_route"]
