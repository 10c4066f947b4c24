"""The ASGI application that serves a site through the engine.

Pages and cached route handlers go through :class:`~pyisr.engine.Engine`; the
response carries the headers of SPEC.md (``Cache-Control``, ``x-pyisr-cache``,
``Cache-Status``, ``Age``, ``ETag``) and answers ``If-None-Match`` with 304 and HEAD
without a body. API routes and uncached handlers get a Starlette ``Request``;
``public/`` files are served by Starlette's ``StaticFiles``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from pyisr.cache.entry import CacheEntry
from pyisr.cache.shareable import visitor_headers
from pyisr.cache.tags import tags_for_revalidate_path, validate_tags
from pyisr.cache.urls import build_handler
from pyisr.config import Config, load_config
from pyisr.engine import (
    CacheStatus,
    Engine,
    NotShareable,
    OnMissing,
    RenderFn,
    RenderPolicy,
    RevalidationError,
    Served,
)
from pyisr.http import (
    DEV_NOSTORE,
    HTML,
    NOSTORE,
    PROPS_HEADER,
    age_header,
    cache_control,
    cache_status,
    entry_headers,
    etag_matches,
    not_modified,
    private_headers,
)
from pyisr.log import enable_debug_logging
from pyisr.origin import LOCALHOST, CanonicalOrigin, Origin
from pyisr.paths import BadPath, normalize_path
from pyisr.runtime import set_engine
from pyisr.server import rsgi
from pyisr.site.route import (
    DEFAULT_404,
    DEFAULT_500,
    MethodNotAllowed,
    Route,
    RouteKind,
)
from pyisr.site.site import Site
from pyisr.site.templates import has_template, render_template

logger = logging.getLogger("pyisr.server")


#: Crawlers get a blocking render instead of a fallback shell (Next.js' bot-aware ISR fallback).
BOT_UA = re.compile(
    r"Googlebot|Google-InspectionTool|Mediapartners-Google|AdsBot-Google|Storebot-Google|Bingbot|"
    r"BingPreview|Slurp|DuckDuckBot|Baiduspider|YandexBot|Sogou|Exabot|facebookexternalhit|"
    r"Facebot|Twitterbot|LinkedInBot|Applebot|WhatsApp|TelegramBot|Discordbot|Slackbot|"
    r"ia_archiver|Chrome-Lighthouse|Embedly|Pinterestbot|redditbot",
    re.IGNORECASE,
)

#: Polls the page until it is generated, then swaps it in (fallback: True, SPEC S-17).
FALLBACK_SCRIPT = (
    "<script>(function(){fetch(location.href,{headers:{'x-pyisr-wait':'1'}})"
    ".then(function(r){return r.text()}).then(function(h){document.open();document.write(h);"
    "document.close()}).catch(function(){setTimeout(function(){location.reload()},2000)})})();</script>"
)


class _HotAnswer:
    """One ready response of a hot entry, with its headers for the current ``Age``.

    The header list with ``Age`` is rebuilt once per second of age, not per request.
    RSGI's ``str`` form is made on its first use only, so a server that never uses it
    never holds it. (The lists handed out are never changed afterwards, only replaced.)
    """

    __slots__ = ("status", "headers", "body", "_text", "_asgi", "_asgi_age", "_rsgi", "_rsgi_age")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self._text: list[tuple[str, str]] | None = None
        self._asgi: list[tuple[bytes, bytes]] = []
        self._asgi_age = -1
        self._rsgi: list[tuple[str, str]] = []
        self._rsgi_age = -1

    def asgi_headers(self, age: int) -> list[tuple[bytes, bytes]]:
        if age != self._asgi_age:
            self._asgi = [*self.headers, (b"age", str(age).encode())]
            self._asgi_age = age
        return self._asgi

    def rsgi_headers(self, age: int) -> list[tuple[str, str]]:
        if age != self._rsgi_age:
            if self._text is None:
                self._text = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.headers]
            self._rsgi = [*self._text, ("age", str(age))]
            self._rsgi_age = age
        return self._rsgi


@dataclass(slots=True)
class _HotResponse:
    """A cached page with its responses built once (the fast path).

    ``answers`` holds the 200 (or cached status) and the 304, as HIT and as STALE:
    index ``2 * stale + not_modified``.
    """

    entry: CacheEntry
    stale_at: float | None
    tags_version: int
    etag: str
    answers: tuple[_HotAnswer, _HotAnswer, _HotAnswer, _HotAnswer]


#: Bounds of the fast path's index: it holds entries the memory tier may have evicted,
#: so it gets its own budget (bodies plus ~1 KB of headers each), outside the tier's.
HOT_LIMIT = 10_000
HOT_BYTES = 16 * 1024 * 1024


def _hot_size(entry: CacheEntry) -> int:
    """What one page costs the fast path's budget: its body and ~1 KB of ready headers."""
    return len(entry.body) + 1024


class App:
    """``pyisr.App("mysite")`` is an ASGI application serving that site."""

    def __init__(
        self,
        site_dir: str | Path,
        *,
        dev: bool = False,
        config: Config | None = None,
        engine: Engine | None = None,
        require_build: bool = False,
    ) -> None:
        self.site_dir = Path(site_dir).resolve()
        self.config = config or load_config(self.site_dir)
        self.dev = dev
        if self.config.debug_cache:
            enable_debug_logging()
        self.site = Site.load(self.site_dir)
        if require_build and self.site.read_manifest() is None:
            raise FileNotFoundError(
                f"no build found in {self.site_dir / '.pyisr'}: run `pyisr build {site_dir}` first"
            )
        if engine is None:
            handler = build_handler(
                self.cache_url(), base_dir=self.site_dir, memory_tier_bytes=self.config.memory_tier
            )
            engine = Engine(
                handler,
                render_timeout=self.config.render_timeout,
                max_concurrent_renders=self.config.render_concurrency,
                debug=self.config.debug_cache or None,
            )
        self.engine = engine
        #: The scheme and host cached route handlers see (site_url / allowed_hosts).
        self.origin = CanonicalOrigin(self.config.site_url, self.config.allowed_hosts)
        if not dev and not self.origin.configured and self._has_cached_handlers():
            self.origin.warn_once()
        self.engine.path_resolver = self._resolve_for_revalidate
        set_engine(self.engine)
        public = self.site.public_dir
        self.static = StaticFiles(directory=str(public)) if public.is_dir() else None
        self.public_files = self._scan_public()
        self._prepared = False
        self._prepare_lock: asyncio.Lock | None = None
        #: raw request path -> ready responses of a cached page; see ``_hot_answer``.
        self._hot: dict[bytes, _HotResponse] = {}
        #: The same, by decoded path: what RSGI gives (see pyisr/server/rsgi.py).
        self._hot_by_path: dict[str, _HotResponse] = {}
        self._hot_bytes = 0
        #: Bound once: it is asked on every fast-path answer.
        self._tags_version = self.engine.handler.tags_version
        # Middleware must see every request, so it turns the fast path off.
        self._hot_enabled = not dev and self.site.middleware is None

    # -- start-up -----------------------------------------------------------------------

    def cache_url(self) -> str:
        """The configured cache, scoped to this build when it is shared (Redis)."""
        url = self.config.cache or str(self.site_dir / ".pyisr" / "cache")
        if is_shared_cache(url) and "build_id=" not in url:
            # Two deployments never read each other's pages: the build id is in every key.
            url += ("&" if "?" in url else "?") + f"build_id={self.site.build_id or 'dev'}"
        return url

    async def _seed_shared_cache(self) -> None:
        """Copy the local build into an empty shared cache, once for all instances."""
        handler = self.engine.handler
        local_dir = self.site_dir / ".pyisr" / "cache"
        if not is_shared_cache(self.config.cache or "") or not local_dir.is_dir():
            return
        from pyisr.cache.seed import seed_from_local

        copied = await seed_from_local(handler, local_dir)
        if copied:
            logger.warning("seeded the shared cache with %d prerendered entries from %s", copied, local_dir)

    def _has_cached_handlers(self) -> bool:
        """Whether any cached render sees a request (and so a host): route handlers do."""
        return any(r.kind is RouteKind.ROUTE_HANDLER and r.is_isr for r in self.site.routes)

    def _origin_for(self, scope: Scope) -> Origin:
        """The origin of a shared render caused by this request (see pyisr.origin)."""
        host = None
        for name, value in scope.get("headers", ()):
            if name == b"host":
                host = value.decode("latin-1")
                break
        return self.origin.for_request(scope.get("scheme", "http"), host)

    def _scan_public(self) -> set[str]:
        public = self.site.public_dir
        if not public.is_dir():
            return set()
        return {"/" + p.relative_to(public).as_posix() for p in public.rglob("*") if p.is_file()}

    async def _prepare(self) -> None:
        if self._prepared:
            return
        if self._prepare_lock is None:
            self._prepare_lock = asyncio.Lock()
        async with self._prepare_lock:
            if self._prepared:
                return
            if self.site.read_manifest() is None:
                # No build (dev, or an app mounted without `pyisr build`): learn the static
                # paths so fallback rules and known paths behave as after a build.
                await self.site.prepare()
            else:
                await self._seed_shared_cache()
            self._prepared = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            hot = self._hot.get(scope.get("raw_path"))  # type: ignore[arg-type]
            if hot is not None and await self._serve_hot(hot, scope, send):
                return
            if not self._prepared:
                await self._prepare()
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # granian's RSGI interface (``pyisr start --server granian``): see pyisr/server/rsgi.py.

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        # The fast path inline (one coroutine less per request); the rest in rsgi.serve.
        hot = self._hot_by_path.get(scope.path)
        if hot is not None and scope.proto == "http":
            found = self._hot_answer(hot, scope.method, scope.headers.get("if-none-match"))
            if found is not None:
                answer, body, age = found
                proto.response_bytes(answer.status, answer.rsgi_headers(age), body)
                return
        await rsgi.serve(self, scope, proto)

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        rsgi.startup(self, loop)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        rsgi.shutdown(self, loop)

    # -- the fast path --------------------------------------------------------------------

    def _hot_answer(
        self, hot: _HotResponse, method: str, if_none_match: str | None
    ) -> tuple[_HotAnswer, bytes, int] | None:
        """The ready answer to a request for a hot entry, its body and its Age, or ``None``.

        Valid while the handler's tag state is the one the entry was checked against, and
        while the entry is fresh or this process is regenerating it (the engine would say
        STALE and start nothing). Anything else (stale with no regeneration under way, a
        tag revalidated anywhere, a method other than GET/HEAD) goes the full way, which
        re-validates.
        """
        now = time.time()
        stale = hot.stale_at is not None and now >= hot.stale_at
        if stale and not self.engine.regenerating(hot.entry.key):
            return None
        if self._tags_version() != hot.tags_version:
            return None
        if method != "GET" and method != "HEAD":
            return None
        not_modified = if_none_match is not None and etag_matches(if_none_match, hot.etag)
        answer = hot.answers[2 * stale + (not_modified and hot.entry.status == 200)]
        age = max(0, int(now - hot.entry.created_at))
        if self.engine.log.enabled:
            self.engine.log.decision(hot.entry.key, "STALE" if stale else "HIT", f"age={age}s")
        return answer, b"" if method == "HEAD" else answer.body, age

    async def _serve_hot(self, hot: _HotResponse, scope: Scope, send: Send) -> bool:
        """Answer from a hot entry with no route matching, engine call or header building."""
        if_none_match = None
        for name, value in scope["headers"]:
            if name == b"if-none-match":
                if_none_match = value.decode("latin-1")
                break
        found = self._hot_answer(hot, scope["method"], if_none_match)
        if found is None:
            return False
        answer, body, age = found
        headers = answer.asgi_headers(age)
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return True

    def _remember_hot(self, scope: Scope, entry: CacheEntry, headers: list[tuple[bytes, bytes]]) -> None:
        raw = scope.get("raw_path")
        version = self._tags_version()
        if not self._hot_enabled or raw is None or version is None:
            return
        size = _hot_size(entry)
        replaced = self._hot.get(raw)
        if replaced is not None:
            self._hot_bytes -= _hot_size(replaced.entry)
        if len(self._hot) >= HOT_LIMIT or self._hot_bytes + size > HOT_BYTES:
            # Start over rather than track recency on every hit: pages that are really
            # hot come back at their next request.
            self._hot.clear()
            self._hot_by_path.clear()
            self._hot_bytes = 0
        self._hot_bytes += size
        common = [h for h in headers if h[0] != b"x-pyisr-cache" and h[0] != b"cache-status"]
        skip_in_304 = (b"content-type", b"content-length")
        answers = []
        for status in (CacheStatus.HIT, CacheStatus.STALE):
            full = [
                *common,
                (b"content-length", str(len(entry.body)).encode()),
                (b"x-pyisr-cache", status.value.encode()),
                (b"cache-status", cache_status(status).encode()),
            ]
            bare = [h for h in full if h[0] not in skip_in_304]
            answers.append(_HotAnswer(entry.status, full, entry.body))
            answers.append(_HotAnswer(304, bare, b""))
        hot = _HotResponse(entry, entry.stale_at(), version, entry.etag, tuple(answers))  # type: ignore[arg-type]
        self._hot[raw] = hot
        if b"%2f" not in raw.lower():
            # RSGI hands over the decoded path; an encoded slash would make it ambiguous.
            self._hot_by_path[scope["path"]] = hot

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._prepare()
                except Exception as exc:  # noqa: BLE001 - reported to the server
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self._shutdown()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    async def _shutdown(self) -> None:
        await self.engine.drain()
        await self.engine.handler.close()

    # -- requests -----------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        path = raw.decode("latin-1") if raw else scope["path"]
        path = path.split("?", 1)[0]
        method = scope["method"]
        if path.startswith("/_pyisr/"):
            await self._internal(path, scope, receive, send)
            return
        if len(path) > 1 and path.endswith("/") != self.config.trailing_slash:
            target = path.rstrip("/") if not self.config.trailing_slash else path + "/"
            query = scope.get("query_string", b"")
            location = target + ("?" + query.decode("latin-1") if query else "")
            await self._send(send, 308, [(b"location", location.encode("latin-1"))], b"", method)
            return
        if self.site.middleware is not None:
            rewritten = await self._run_middleware(scope, receive, send)
            if rewritten is None:
                return
            path = rewritten
        try:
            key = normalize_path(path)
        except BadPath:
            await self._send(send, 400, [(b"cache-control", NOSTORE.encode())], b"Bad Request", method)
            return
        found = self.site.match(key)
        if found is None:
            if self.static is not None and key in self.public_files or self.dev and self.static is not None:
                await self._static(scope, receive, send)
                return
            await self._not_found(send, method)
            return
        route, params = found
        if not route.is_isr or (route.kind is RouteKind.ROUTE_HANDLER and method not in ("GET", "HEAD")):
            if route.kind in (RouteKind.API, RouteKind.ROUTE_HANDLER):
                await self._handler(route, scope, receive, send)
                return
        if method not in ("GET", "HEAD"):
            await self._send(
                send,
                405,
                [(b"allow", b"GET, HEAD"), (b"content-type", b"text/plain; charset=utf-8")],
                b"Method Not Allowed",
                method,
            )
            return
        if not route.is_isr or self.dev:
            await self._dynamic(route, key, params, send, method)
            return
        await self._isr(route, key, params, scope, send, method)

    async def _run_middleware(self, scope: Scope, receive: Receive, send: Send) -> str | None:
        """Run ``SITE/middleware.py``: it may answer, rewrite the path, or let the request on.

        Returns the path to serve, or ``None`` when the middleware answered. As in Next.js,
        on-demand regeneration (``revalidate(path)``) does not run it: revalidate the
        path a rewrite leads to.
        """
        from pyisr.site.route import call_maybe_async

        request = Request(scope, receive)
        try:
            result = await call_maybe_async(self.site.middleware, request)
            if isinstance(result, str) and not result.startswith("/"):
                raise ValueError(f"middleware rewrote to {result!r}: return a path such as '/blog/1'")
            if result is not None and not isinstance(result, str | Response):
                raise TypeError(
                    f"middleware returned {type(result).__name__}: return None, a path or a Response"
                )
        except Exception as exc:  # noqa: BLE001 - a broken middleware is a 500, never a crash
            logger.error("middleware failed for %s: %s: %s", scope["path"], type(exc).__name__, exc)
            await self._error(send, scope["method"])
            return None
        if result is None:
            raw = scope.get("raw_path")
            return str((raw.decode("latin-1") if raw else scope["path"]).split("?", 1)[0])
        if isinstance(result, str):
            return result
        await result(scope, receive, send)
        return None

    async def _isr(
        self, route: Route, key: str, params: dict[str, Any], scope: Scope, send: Send, method: str
    ) -> None:
        headers = _headers(scope)
        bot = bool(BOT_UA.search(headers.get("user-agent", "")))
        wait = headers.get("x-pyisr-wait") == "1"
        policy = route.policy(key, bot=bot or wait)
        # Only a route handler's render sees a request, and so a host.
        handler = route.kind is RouteKind.ROUTE_HANDLER
        render = route.renderer(key, params, origin=self._origin_for(scope) if handler else LOCALHOST)
        try:
            served = await self.engine.get(key, render, policy)
        except Exception as exc:  # noqa: BLE001 - a failing page is a 500, never a crash
            logger.error("%s render failed: %s: %s", key, type(exc).__name__, exc, exc_info=exc)
            await self._error(send, method)
            return
        if served.status is CacheStatus.PRIVATE and served.entry is None:
            # The page belongs to its visitor, and no render was made for this one yet.
            await self._dynamic(route, key, params, send, method, origin=self._origin_for(scope))
            return
        if served.status is CacheStatus.NOT_ALLOWED:
            await self._not_found(send, method)
            return
        if served.status is CacheStatus.FALLBACK:
            await self._fallback(route, key, params, send, method)
            return
        await self._send_entry(served, scope, send, method, headers)

    async def _fallback(
        self, route: Route, key: str, params: dict[str, Any], send: Send, method: str
    ) -> None:
        try:
            shell = await route.render(key, params, fallback_shell=True)
        except Exception as exc:  # noqa: BLE001
            logger.error("%s fallback shell failed: %s: %s", key, type(exc).__name__, exc)
            await self._error(send, method)
            return
        body = shell.body.encode() if isinstance(shell.body, str) else shell.body
        body = (
            body.replace(b"</body>", FALLBACK_SCRIPT.encode() + b"</body>", 1)
            if b"</body>" in body
            else body + FALLBACK_SCRIPT.encode()
        )
        await self._send(
            send,
            200,
            [
                (b"content-type", HTML.encode()),
                (b"cache-control", NOSTORE.encode()),
                (b"x-pyisr-cache", b"MISS"),
            ],
            body,
            method,
        )

    async def _send_entry(
        self, served: Served, scope: Scope, send: Send, method: str, request_headers: dict[str, str]
    ) -> None:
        entry = served.entry
        assert entry is not None
        now = self.engine.clock()
        out = entry_headers(entry, served.status)
        if served.status is CacheStatus.BYPASS or served.status is CacheStatus.PRIVATE:
            await self._send(send, entry.status, out, entry.body, method)
            return
        if served.status is not CacheStatus.STALE:
            self._remember_hot(scope, entry, out)
        out.append(age_header(entry, now))
        if not_modified(entry, request_headers.get("if-none-match")):
            await self._send(send, 304, [h for h in out if h[0] != b"content-type"], b"", "HEAD")
            return
        await self._send(send, entry.status, out, entry.body, method)

    async def _dynamic(
        self,
        route: Route,
        key: str,
        params: dict[str, Any],
        send: Send,
        method: str,
        *,
        origin: Origin | None = None,
    ) -> None:
        """``revalidate = 0`` pages, private ones, every page in dev: rendered for this request only."""
        try:
            rendered = await route.render(key, params, origin=origin or self.origin.default())
        except Exception as exc:  # noqa: BLE001
            logger.error("%s render failed: %s: %s", key, type(exc).__name__, exc, exc_info=exc)
            await self._error(send, method)
            return
        body = rendered.body.encode() if isinstance(rendered.body, str) else rendered.body
        out = private_headers(visitor_headers(rendered.headers), DEV_NOSTORE if self.dev else NOSTORE)
        await self._send(send, rendered.status, out, body, method)

    async def _handler(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await route.handle(request)
        except MethodNotAllowed as exc:
            allow = ", ".join(exc.allowed).encode()
            await self._send(
                send,
                405,
                [(b"allow", allow), (b"content-type", b"text/plain; charset=utf-8")],
                b"Method Not Allowed",
                scope["method"],
            )
            return
        except Exception as exc:  # noqa: BLE001
            logger.error(
                "%s %s failed: %s: %s", scope["method"], scope["path"], type(exc).__name__, exc, exc_info=exc
            )
            await self._error(send, scope["method"])
            return
        await response(scope, receive, send)

    async def _static(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.static is not None
        await self.static(scope, receive, send)

    # -- error pages --------------------------------------------------------------------

    async def _not_found(self, send: Send, method: str) -> None:
        body = render_template("404.html") if has_template("404.html") else DEFAULT_404
        await self._send(
            send,
            404,
            [(b"content-type", HTML.encode()), (b"cache-control", NOSTORE.encode())],
            body.encode(),
            method,
        )

    async def _error(self, send: Send, method: str) -> None:
        try:
            body = render_template("500.html") if has_template("500.html") else DEFAULT_500
        except Exception:  # noqa: BLE001 - a broken error page must not hide the error
            body = DEFAULT_500
        await self._send(
            send,
            500,
            [(b"content-type", HTML.encode()), (b"cache-control", NOSTORE.encode())],
            body.encode(),
            method,
        )

    @staticmethod
    async def _send(
        send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes, method: str
    ) -> None:
        headers = headers + [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    # -- /_pyisr/ endpoints -------------------------------------------------------------

    async def _internal(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        if path == "/_pyisr/revalidate":
            response = await self._revalidate_endpoint(request)
        elif path == "/_pyisr/health":
            response = self._health()
        elif path == "/_pyisr/cache":
            response = await self._inspect_endpoint(request)
        elif path.startswith("/_pyisr/data/"):
            await self._data_route(path, scope, send)
            return
        else:
            response = JSONResponse({"error": "not found"}, status_code=404)
        await response(scope, receive, send)

    def _authorized(self, request: Request) -> bool:
        secret = self.config.revalidate_secret
        if not secret:
            return False
        given = request.headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else request.query_params.get("secret", "")
        return hmac.compare_digest(given.encode(), secret.encode())

    async def _revalidate_endpoint(self, request: Request) -> Response:
        if not self.config.revalidate_secret:
            return JSONResponse(
                {"error": "on-demand revalidation is off: set PYISR_REVALIDATE_SECRET"}, status_code=404
            )
        if request.method != "POST":
            return JSONResponse({"error": "use POST"}, status_code=405, headers={"allow": "POST"})
        if not self._authorized(request):
            return JSONResponse({"error": "invalid or missing secret"}, status_code=401)
        params: dict[str, Any] = dict(request.query_params)
        body = await request.body()
        if body:
            try:
                if request.headers.get("content-type", "").startswith("application/json"):
                    params.update(json.loads(body))
                else:
                    params.update({k: v[-1] for k, v in parse_qs(body.decode()).items()})
            except ValueError:
                return JSONResponse({"error": "body must be JSON or form data"}, status_code=400)
        path, tag, kind = params.get("path"), params.get("tag"), params.get("type")
        if not path and not tag:
            return JSONResponse({"error": "give a path or a tag to revalidate"}, status_code=400)
        try:
            if tag:
                await self.engine.revalidate_tags(validate_tags([tag], where="tag"))
            if path and kind:
                await self.engine.revalidate_tags(tags_for_revalidate_path(path, kind))
            elif path:
                from pyisr.revalidation import revalidate

                await revalidate(path)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except NotShareable as exc:
            return JSONResponse({"revalidated": False, "error": str(exc)}, status_code=409)
        except RevalidationError as exc:
            status = 404 if "(404)" in str(exc) else 500
            return JSONResponse({"revalidated": False, "error": str(exc)}, status_code=status)
        return JSONResponse({"revalidated": True, "now": int(time.time() * 1000)})

    async def _resolve_for_revalidate(self, key: str) -> tuple[str, RenderFn, RenderPolicy] | None:
        found = self.site.match(key)
        if found is None:
            return None
        route, params = found
        if not route.is_isr:
            return None
        policy = route.policy(key, bot=True)
        if policy.on_missing is OnMissing.NOT_FOUND:
            return None
        return key, route.renderer(key, params, origin=self.origin.default()), policy

    def _health(self) -> Response:
        info = self.engine.handler.describe()
        degraded = bool(info.get("degraded"))
        return JSONResponse(
            {"status": "degraded" if degraded else "ok", "build_id": self.site.build_id, "cache": info},
            headers={"cache-control": NOSTORE},
        )

    async def _inspect_endpoint(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"error": "invalid or missing secret"}, status_code=401)
        path = request.query_params.get("path")
        if not path:
            return JSONResponse({"error": "give ?path=/some/page"}, status_code=400)
        try:
            key = normalize_path(path)
        except BadPath as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        entry = await self.engine.inspect(key)
        if entry is None:
            return JSONResponse({"key": key, "cached": False}, status_code=404)
        return JSONResponse(describe_entry(entry, self.engine.clock()))

    async def _data_route(self, path: str, scope: Scope, send: Send) -> None:
        """``/_pyisr/data/<build id>/<path>.json``: a Pages page's props (SPEC S-51)."""
        method = scope["method"]
        rest = path[len("/_pyisr/data/") :]
        build_id, _, page_path = rest.partition("/")
        if build_id != self.site.build_id or not page_path.endswith(".json"):
            await self._send(
                send, 404, [(b"content-type", b"application/json")], b'{"not_found": true}', method
            )
            return
        try:
            key = normalize_path("/" + page_path[: -len(".json")])
        except BadPath:
            await self._send(send, 400, [], b"Bad Request", method)
            return
        found = self.site.match(key)
        if found is None or found[0].kind is not RouteKind.PAGES_PAGE or not found[0].is_isr:
            await self._send(
                send, 404, [(b"content-type", b"application/json")], b'{"not_found": true}', method
            )
            return
        route, params = found
        policy = route.policy(key, bot=True)  # data requests always block
        try:
            served = await self.engine.get(key, route.renderer(key, params), policy)
            if served.status is CacheStatus.PRIVATE:
                # A page that belongs to its visitor: its props are this visitor's too.
                rendered = await route.render(key, params)
                props = visitor_headers(rendered.headers).get(PROPS_HEADER, '{"props": {}}')
                headers = [(b"content-type", b"application/json; charset=utf-8")]
                await self._send(
                    send, 200, [*headers, (b"cache-control", NOSTORE.encode())], props.encode(), method
                )
                return
        except Exception:  # noqa: BLE001
            await self._send(send, 500, [(b"cache-control", NOSTORE.encode())], b'{"error": true}', method)
            return
        if served.entry is None:
            await self._send(
                send,
                404,
                [(b"content-type", b"application/json"), (b"cache-control", NOSTORE.encode())],
                b'{"not_found": true}',
                method,
            )
            return
        entry = served.entry
        body = entry.headers.get(PROPS_HEADER, '{"props": {}}').encode()
        status = 404 if entry.status == 404 else 200
        now = self.engine.clock()
        await self._send(
            send,
            status,
            [
                (b"content-type", b"application/json; charset=utf-8"),
                (b"cache-control", cache_control(entry.revalidate).encode()),
                (b"x-pyisr-cache", served.status.value.encode()),
                (b"age", str(entry.age(now)).encode()),
            ],
            body,
            method,
        )


def is_shared_cache(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "redis+cluster://", "rediss+cluster://"))


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def describe_entry(entry: CacheEntry, now: float) -> dict[str, Any]:
    """What ``pyisr cache inspect`` and the inspection endpoint show about one entry."""
    due = entry.stale_at()
    info: dict[str, Any] = {
        "key": entry.key,
        "cached": True,
        "kind": entry.kind.value,
        "status": entry.status,
        "size": len(entry.body),
        "etag": entry.etag,
        "created_at": entry.created_at,
        "age": entry.age(now),
        "revalidate": entry.revalidate,
        "stale": entry.is_stale(now),
        "stale_at": due,
        "tags": list(entry.tags),
        "retry_at": entry.retry_at,
        "last_failure": entry.last_failure.to_json() if entry.last_failure else None,
    }
    return info
