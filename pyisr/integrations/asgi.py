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

from pyisr.cache.entry import Revalidate
from pyisr.engine import Engine, Rendered, RenderFn, RenderPolicy
from pyisr.integrations import (
    _PATH_SAFE,
    DEFAULT_ALLOW_HEADERS,
    FailedResponse,
    allow_list,
    check_options,
    install_resolver,
    key_for_decoded_path,
    no_store,
    page_policy,
    response_parts,
    storable_headers,
)
from pyisr.paths import BadPath, normalize_path
from pyisr.runtime import get_engine

logger = logging.getLogger("pyisr.integrations")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z_][A-Za-z0-9_]*))?}")
#: Starlette's convertors, as regular expressions over one cache key.
_CONVERTORS = {
    "str": "[^/]+",
    "path": ".*",
    "int": "[0-9]+",
    "float": r"[0-9]+(?:\.[0-9]+)?",
    "uuid": "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}


@dataclass(frozen=True)
class ISRRoute:
    """One cached route: its Starlette-style pattern compiled for matching cache keys."""

    pattern: str
    regex: re.Pattern[str]
    #: Literal text and ``(name,)`` holes, to rebuild the path the app itself routes.
    template: tuple[str | tuple[str], ...]
    #: The pattern in pyisr's spelling (``/blog/[id]``), for the implicit page tag.
    isr_pattern: str
    revalidate: Revalidate
    tags: tuple[str, ...]

    def render_path(self, values: Mapping[str, str | None]) -> str:
        """The path the render requests: the pattern filled in, trailing slash and all.

        Built from the pattern rather than taken from the request, so ``/blog/1`` and
        ``/blog/1/`` (one cache key) render alike and never as the app's slash redirect.
        """
        return "".join(part if isinstance(part, str) else values.get(part[0]) or "" for part in self.template)

    def policy(self, key: str) -> RenderPolicy:
        return page_policy(key, self.isr_pattern, self.revalidate, self.tags)


def compile_route(pattern: str, revalidate: object, tags: Iterable[str] | None) -> ISRRoute:
    """Compile ``/blog/{id}``, ``/files/{rest:path}``, ``/item/{n:int}``... for key matching.

    Keys have no trailing slash, so the pattern's is ignored when matching, and a
    trailing ``/{name:path}`` also matches the bare prefix (as Starlette's ``.*`` does).
    """
    if not pattern.startswith("/"):
        raise ValueError(f"route pattern {pattern!r} must start with '/'")
    where = f"ISRMiddleware route {pattern!r}"
    seconds, tag_tuple = check_options(revalidate, tags, where)
    template: list[str | tuple[str]] = []
    regex = ["^"]
    isr = []
    stripped = pattern.rstrip("/") or "/"
    pos = 0
    for m in _PARAM.finditer(pattern):
        name, conv = m.group(1), m.group(2) or "str"
        if conv not in _CONVERTORS:
            raise ValueError(f"{where}: unknown convertor {conv!r} (use one of {', '.join(_CONVERTORS)})")
        literal = pattern[pos : m.start()]
        template += [literal, (name,)]
        isr.append(literal)
        trailing_path = conv == "path" and m.end() >= len(stripped) and literal.endswith("/")
        if trailing_path:
            regex.append(re.escape(literal[:-1]) + f"(?:/(?P<{name}>.*))?")
            isr.append(f"[[...{name}]]")
        else:
            regex.append(re.escape(literal) + f"(?P<{name}>{_CONVERTORS[conv]})")
            isr.append(f"[...{name}]" if conv == "path" else f"[{name}]")
        pos = m.end()
    tail = pattern[pos:]
    template.append(tail)
    isr.append(tail)
    tail_match = tail.rstrip("/") if pos else stripped
    regex.append(re.escape(tail_match) + "$")
    return ISRRoute(
        pattern=pattern,
        regex=re.compile("".join(regex)),
        template=tuple(template),
        isr_pattern=normalize_path("".join(isr)),
        revalidate=seconds,
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


def _default_scope() -> Scope:
    """The scope ``revalidate(path)`` renders with before any request has come in."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "scheme": "http",
        "server": ("localhost", 80),
        "client": None,
        "root_path": "",
        "headers": [(b"host", b"localhost")],
    }


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
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[str, object],
        tags: Mapping[str, Iterable[str]] | None = None,
        *,
        engine: Engine | None = None,
        allow_headers: Iterable[str] = DEFAULT_ALLOW_HEADERS,
    ) -> None:
        self.app = app
        tags = dict(tags or {})
        unknown = set(tags) - set(routes)
        if unknown:
            raise ValueError(f"ISRMiddleware tags given for patterns not in routes: {sorted(unknown)}")
        self.routes = [compile_route(p, rv, tags.get(p)) for p, rv in routes.items()]
        self.allow_headers = {h.encode("latin-1") for h in allow_list(allow_headers)}
        self._engine = engine
        self._last_scope: Scope | None = None
        self._installed_on: Engine | None = None
        self._install()

    @property
    def engine(self) -> Engine:
        """The engine given, or the process default at the time of the request."""
        return self._engine if self._engine is not None else get_engine()

    def _install(self) -> Engine:
        engine = self.engine
        if engine is not self._installed_on:
            install_resolver(engine, self._resolve)
            self._installed_on = engine
        return engine

    def match(self, key: str) -> tuple[ISRRoute, dict[str, str | None]] | None:
        """The first route whose pattern matches the cache key, and its parameters."""
        for route in self.routes:
            m = route.regex.match(key)
            if m is not None:
                return route, m.groupdict()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        try:
            key = key_for_decoded_path(scope["path"])
        except BadPath:  # pragma: no cover - re-encoded paths always decode
            await self.app(scope, receive, send)
            return
        found = self.match(key)
        if found is None:
            await self.app(scope, receive, send)
            return
        route, values = found
        engine = self._install()
        self._last_scope = scope
        failed = FailedResponse()
        render = self._renderer(route, values, scope, failed)
        try:
            served = await engine.get(key, render, route.policy(key))
        except Exception:
            if failed.response is None:
                raise
            status, headers, body = failed.response
            await _send(send, status, no_store(headers), body, scope["method"])
            return
        if_none_match = None
        for name, value in scope.get("headers", ()):
            if name == b"if-none-match":
                if_none_match = value.decode("latin-1")
                break
        status, headers, body = response_parts(
            served, engine.clock(), if_none_match, head=scope["method"] == "HEAD"
        )
        await _send(send, status, headers, body, "GET")

    def _render_scope(self, original: Scope, path: str) -> Scope:
        """A copy of the request's scope that no longer identifies the visitor."""
        raw = quote(path, safe=_PATH_SAFE + "%")
        scope = dict(original)
        scope.update(
            method="GET",
            path=unquote(raw),
            raw_path=raw.encode("ascii"),
            query_string=b"",
            headers=[(k, v) for k, v in original.get("headers", ()) if k.lower() in self.allow_headers],
            # No zero-copy or path-send: the render must hand us the bytes.
            extensions={},
        )
        return scope

    def _renderer(
        self, route: ISRRoute, values: Mapping[str, str | None], original: Scope, failed: FailedResponse
    ) -> RenderFn:
        path = route.render_path(values)

        async def render() -> Rendered:
            scope = self._render_scope(original, path)
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
            return Rendered(body, status=capture.status, headers=storable_headers(capture.headers))

        return render

    async def _resolve(self, key: str) -> tuple[str, RenderFn, RenderPolicy] | None:
        """``pyisr.revalidate(path)``: render a matching path like a request would."""
        found = self.match(key)
        if found is None:
            return None
        route, values = found
        base = self._last_scope if self._last_scope is not None else _default_scope()
        return key, self._renderer(route, values, base, FailedResponse()), route.policy(key)


async def _send(send: Send, status: int, headers: list[tuple[str, str]], body: bytes, method: str) -> None:
    if not any(k.lower() == "content-length" for k, _ in headers):
        headers = headers + [("content-length", str(len(body)))]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        }
    )
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


__all__ = ["ISRMiddleware", "ISRRoute", "compile_route"]
