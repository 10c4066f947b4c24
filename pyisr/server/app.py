"""The ASGI application that serves a site through the engine: start-up and dispatch.

A request is answered by the first of: the fast path (a hot page's ready response,
``server/fast_path.py``), the ``/_pyisr/`` endpoints (``server/endpoints.py``), the
trailing-slash redirect, the site's middleware, then the route it matches: pages and
cached route handlers go through :class:`~pyisr.engine.Engine` with the headers of
SPEC.md (``Cache-Control``, ``x-pyisr-cache``, ``Cache-Status``, ``Age``, ``ETag``,
304 on ``If-None-Match``, HEAD without a body); API routes and uncached handlers get a
Starlette ``Request``; ``public/`` files are served by Starlette's ``StaticFiles``.

An ``App`` serves one build for its whole life (``pyisr.deploys``): the one current when
it was constructed, with that build's code, templates, manifest and cache namespace,
which it marks as in use so no cleanup removes it. When another build becomes current
it logs how to switch, and keeps serving its own. ``public/`` files are not part of a
build: they are served from disk as they are now.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from pyisr import draft
from pyisr.cache.shareable import visitor_headers
from pyisr.cdn import attach_cdn
from pyisr.cdn.deploys import purge_if_superseded, purge_other_builds
from pyisr.config import Config, load_config
from pyisr.deploys import BuildLease, BuildWatcher, remove_unused_builds
from pyisr.engine import (
    CacheStatus,
    Engine,
    OnMissing,
    RenderFn,
    RenderPolicy,
    RenderSlotsExhausted,
    Served,
)
from pyisr.http import (
    DEV_NOSTORE,
    HTML,
    NOSTORE,
    age_header,
    answer_body,
    answer_coding,
    not_modified,
    not_modified_headers,
    private_headers,
    served_headers,
)
from pyisr.log import configure_fetch_logging, configure_log_format, enable_debug_logging
from pyisr.origin import LOCALHOST, CanonicalOrigin, Origin
from pyisr.paths import BadPath, normalize_path
from pyisr.rewarm import Rewarmer, process_share
from pyisr.runtime import set_engine
from pyisr.server import rsgi
from pyisr.server.endpoints import PREFIX, Endpoints, draft_secret_of
from pyisr.server.fast_path import FastPath
from pyisr.server.responses import send_not_found, send_response, send_server_error
from pyisr.site import templates
from pyisr.site.route import MethodNotAllowed, Route, RouteKind, call_maybe_async
from pyisr.site.site import Site
from pyisr.site_store import UNBUILT, open_site_cache

#: Seconds shutdown waits for the last activity report to reach the store.
FINAL_REPORT_WAIT = 2.0

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


class App:
    """``pyisr.App("mysite")`` is an ASGI (and RSGI) application serving that site.

    Constructing it changes nothing outside it. Starting it (ASGI lifespan, RSGI init,
    or the first request) learns the site's paths, seeds a shared cache, and makes its
    engine the process default, so ``revalidate_tag`` and friends called by the site's
    API routes reach this server's cache.
    """

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
        self.site = Site.load(self.site_dir, dev=dev)
        if require_build and self.site.read_manifest() is None:
            raise FileNotFoundError(
                f"no build found in {self.site_dir / '.pyisr'}: run `pyisr build {site_dir}` first"
            )
        build_id = self.site.build_id
        #: Marks this process's build as in use (released by ``shutdown()``).
        self.lease = BuildLease(self.site_dir, build_id) if build_id is not None else None
        #: Tells the log when another build becomes current (started by ``startup()``).
        self.build_watcher = BuildWatcher(self.site_dir, build_id) if build_id is not None else None
        if engine is None:
            handler = open_site_cache(self.site_dir, self.config, build_id=build_id or UNBUILT)
            engine = Engine(
                handler,
                render_timeout=self.config.render_timeout,
                max_concurrent_renders=self.config.render_concurrency,
                debug=self.config.debug_cache or None,
                cdn_tag_headers=self.config.cdn_tag_headers,
                compress=self.config.compress,
            )
        self.engine = engine
        self.engine.add_resolver(self._resolve_for_revalidate)
        #: The CDN purges this App attached (closed at shutdown). A dev server attaches none:
        #: its pages are never cached at an edge, and the site's CDN is production's.
        self.cdn = None if dev or engine.cdn is not None else attach_cdn(engine, self.config.cdn)
        if not dev and build_id is not None:
            # Every cacheable answer names its build, for the purges that follow a deploy.
            self.engine.edge_build = build_id
        #: The scheme and host cached route handlers see (site_url / allowed_hosts).
        self.origin = CanonicalOrigin(self.config.site_url, self.config.allowed_hosts)
        if not dev and not self.origin.configured and self._has_cached_handlers():
            self.origin.warn_once()
        public = self.site.public_dir
        self.static = StaticFiles(directory=str(public)) if public.is_dir() else None
        self.public_files = self._scan_public()
        self.endpoints = Endpoints(self.site, self.engine, self.config)
        # Middleware must see every request, so it turns the fast path off.
        self.fast = FastPath(self.engine, enabled=not dev and self.site.middleware is None)
        #: Draft mode (``/_pyisr/draft``) is on when a secret exists to sign its cookie.
        self.draft_secret = draft_secret_of(self.config)
        if self.draft_secret is not None:
            self.fast.use_draft_cookie(draft.COOKIE)
        self.started = False
        self._start_lock: asyncio.Lock | None = None
        self._cleanup: asyncio.Task[None] | None = None
        self._reporting: asyncio.Task[None] | None = None
        #: Renders the hottest pages again after a wide invalidation (pyisr.rewarm); not in
        #: dev, where every page renders per request.
        self.rewarmer = Rewarmer(self.engine, process_share(self.config.rewarm_rate)) if not dev else None

    # -- start-up and shutdown ------------------------------------------------------------

    async def startup(self) -> None:
        """Get ready to serve (idempotent): what lifespan, RSGI init and a first request call."""
        if self.started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.started:
                return
            set_engine(self.engine)
            configure_fetch_logging(self.config.log_fetches, self.config.log_fetches_full_url)
            build_id = self.site.build_id
            configure_log_format(self.config.log_format, build_id=build_id, cache_log=self.engine.log)
            if self.config.metrics_secret or self.config.metrics_allow:
                from pyisr.metrics import enable as enable_metrics

                enable_metrics(self.engine)  # counted from the start, not from the first scrape
            if self.site.read_manifest() is None:
                # No build (dev, or an app mounted without `pyisr build`): learn the static
                # paths so fallback rules and known paths behave as after a build.
                await self.site.prepare()
            else:
                await self._seed_shared_cache()
                self._cleanup = asyncio.get_running_loop().create_task(self._remove_unused_builds())
                if self.engine.cdn is not None and self.engine.edge_build is not None:
                    purge_other_builds(self.engine.cdn, self.site_dir, self.engine.edge_build)
            if self.build_watcher is not None:
                self.build_watcher.start()
            # The fast path's answers reach the events only when collected: report them
            # on a timer, not when some request happens to take the full path.
            self._reporting = asyncio.get_running_loop().create_task(self.engine.events.run())
            if self.rewarmer is not None:
                self.rewarmer.start()
            self.started = True

    async def shutdown(self) -> None:
        """Finish background regenerations, close the cache and let the build go."""
        if self.build_watcher is not None:
            await self.build_watcher.stop()
        if self._cleanup is not None:
            await asyncio.gather(self._cleanup, return_exceptions=True)
        if self.rewarmer is not None:
            await self.rewarmer.stop()  # before the drain, which waits for its renders
        await self.engine.drain()
        if self._reporting is not None:
            self._reporting.cancel()  # it reports what is left as it stops...
            # ...but a slow store must not hold up a reload or a deploy: the counts are
            # worth less than a server that stops when asked.
            await asyncio.wait([self._reporting], timeout=FINAL_REPORT_WAIT)
        if self.engine.cdn is not None and self.engine.edge_build is not None:
            purge_if_superseded(self.engine.cdn, self.site_dir, self.engine.edge_build)
        if self.cdn is not None:
            await self.cdn.aclose()  # the last purges, for a few seconds at most
        await self.engine.handler.close()
        if self.lease is not None:
            self.lease.release()

    async def _remove_unused_builds(self) -> None:
        """Builds no process serves any more (not the current, not the previous), off the loop."""
        try:
            await asyncio.to_thread(remove_unused_builds, self.site_dir, self.config, wait=False)
        except Exception as exc:  # noqa: BLE001 - a cleanup must never stop a server
            logger.warning("could not remove unused builds: %s: %s", type(exc).__name__, exc)

    async def _seed_shared_cache(self) -> None:
        """Copy the local build into an empty shared cache, once for all instances."""
        from pyisr.site_store import default_cache_dir, is_shared_cache

        if self.site.build_id is None:
            return
        local_dir = default_cache_dir(self.site_dir) / self.site.build_id
        if not is_shared_cache(self.config.cache or "") or not local_dir.is_dir():
            return
        from pyisr.cache.seed import seed_from_local

        copied = await seed_from_local(self.engine.handler, local_dir)
        if copied:
            logger.warning("seeded the shared cache with %d prerendered entries from %s", copied, local_dir)

    def _has_cached_handlers(self) -> bool:
        """Whether any cached render sees a request (and so a host): route handlers do."""
        return any(r.kind is RouteKind.ROUTE_HANDLER and r.is_isr for r in self.site.routes)

    def _scan_public(self) -> set[str]:
        public = self.site.public_dir
        if not public.is_dir():
            return set()
        return {"/" + p.relative_to(public).as_posix() for p in public.rglob("*") if p.is_file()}

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # noqa: BLE001 - reported to the server
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    # -- the two interfaces ---------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            hot = self.fast.by_raw_path.get(scope.get("raw_path"))  # type: ignore[arg-type]
            if hot is not None and await self.fast.serve_asgi(hot, scope, send):
                return
            if not self.started:
                await self.startup()
            token = templates.use(self.site.templates)  # this site's templates, for this request
            try:
                await self._http(scope, receive, send)
            finally:
                templates.reset(token)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # granian's RSGI interface (``pyisr start --server granian``): see pyisr/server/rsgi.py.

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        # The fast path inline (one coroutine less per request); the rest in rsgi.serve.
        hot = self.fast.by_path.get(scope.path)
        if (
            hot is not None
            and scope.proto == "http"
            and (self.fast.draft_cookie is None or not self.fast.may_be_draft(scope.headers.get("cookie")))
        ):
            headers = scope.headers
            # Accept-Encoding only matters to a page with stored encodings (pyisr.compression).
            accept = headers.get("accept-encoding") if hot.by_accept is not None else None
            found = self.fast.answer(hot, scope.method, headers.get("if-none-match"), accept)
            if found is not None:
                answer, body, age = found
                proto.response_bytes(answer.status, answer.rsgi_headers(age), body)
                return
        await rsgi.serve(self, scope, proto)

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self.startup())

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self.shutdown())

    # -- requests -----------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        path = raw.decode("latin-1") if raw else scope["path"]
        path = path.split("?", 1)[0]
        method = scope["method"]
        if path.startswith(PREFIX):
            await self.endpoints(path, scope, receive, send)
            return
        if len(path) > 1 and path.endswith("/") != self.config.trailing_slash:
            target = path.rstrip("/") if not self.config.trailing_slash else path + "/"
            query = scope.get("query_string", b"")
            location = target + ("?" + query.decode("latin-1") if query else "")
            await send_response(send, 308, [(b"location", location.encode("latin-1"))], b"", method)
            return
        if self.site.middleware is not None:
            rewritten = await self._run_middleware(scope, receive, send)
            if rewritten is None:
                return
            path = rewritten
        try:
            key = normalize_path(path)
        except BadPath as exc:  # 400, or 414 for a path too long to be a key
            phrase = b"URI Too Long" if exc.status == 414 else b"Bad Request"
            await send_response(send, exc.status, [(b"cache-control", NOSTORE.encode())], phrase, method)
            return
        found = self.site.match(key)
        if found is None:
            if self.static is not None and key in self.public_files or self.dev and self.static is not None:
                if method not in ("GET", "HEAD"):
                    await self._method_not_allowed(send, method)
                    return
                await self._static(scope, receive, send)
                return
            await send_not_found(send, method)
            return
        route, params = found
        if not route.is_isr or (route.kind is RouteKind.ROUTE_HANDLER and method not in ("GET", "HEAD")):
            if route.kind in (RouteKind.API, RouteKind.ROUTE_HANDLER):
                await self._handler(route, scope, receive, send)
                return
        if method not in ("GET", "HEAD"):
            await self._method_not_allowed(send, method)
            return
        if not route.is_isr or self.dev:
            await self._dynamic(route, key, params, send, method)
            return
        if self.draft_secret is not None and self._in_draft_mode(scope):
            await self._dynamic(route, key, params, send, method, origin=self._origin_for(scope), bypass=True)
            return
        await self._isr(route, key, params, scope, send, method)

    def _in_draft_mode(self, scope: Scope) -> bool:
        """A valid draft cookie (``/_pyisr/draft``): this visitor sees fresh renders, never stored."""
        return any(
            draft.is_draft_request(value.decode("latin-1"), self.draft_secret)
            for name, value in scope["headers"]
            if name == b"cookie"
        )

    @staticmethod
    async def _method_not_allowed(send: Send, method: str) -> None:
        """405 for a page or a public file asked with anything but GET or HEAD."""
        headers = [(b"allow", b"GET, HEAD"), (b"content-type", b"text/plain; charset=utf-8")]
        await send_response(send, 405, headers, b"Method Not Allowed", method)

    async def _run_middleware(self, scope: Scope, receive: Receive, send: Send) -> str | None:
        """Run ``SITE/middleware.py``: it may answer, rewrite the path, or let the request on.

        Returns the path to serve, or ``None`` when the middleware answered. As in Next.js,
        on-demand regeneration (``revalidate(path)``) does not run it: revalidate the
        path a rewrite leads to.
        """
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
            await send_server_error(send, scope["method"])
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
            self.engine.events.served(key, route.pattern, served.status.value)
        except RenderSlotsExhausted as exc:
            # Every render slot is stuck (the engine logs it once a minute): come back once
            # the renders running now have ended or are stuck too (the render timeout).
            unavailable = [
                (b"retry-after", str(exc.retry_after).encode()),
                (b"cache-control", NOSTORE.encode()),
                (b"content-type", b"text/plain; charset=utf-8"),
            ]
            await send_response(send, 503, unavailable, b"Service Unavailable: no free render slot", method)
            return
        except Exception as exc:  # noqa: BLE001 - a failing page is a 500, never a crash
            logger.error("%s render failed: %s: %s", key, type(exc).__name__, exc, exc_info=exc)
            await send_server_error(send, method)
            return
        if served.status is CacheStatus.PRIVATE and served.entry is None:
            # The page belongs to its visitor, and no render was made for this one yet.
            await self._dynamic(route, key, params, send, method, origin=self._origin_for(scope))
            return
        if served.status is CacheStatus.NOT_ALLOWED:
            await send_not_found(send, method)
            return
        if served.status is CacheStatus.FALLBACK:
            await self._fallback(route, key, params, send, method)
            return
        await self._send_entry(served, scope, send, method, headers, route.pattern)

    async def _fallback(
        self, route: Route, key: str, params: dict[str, Any], send: Send, method: str
    ) -> None:
        try:
            shell = await route.render(key, params, fallback_shell=True)
        except Exception as exc:  # noqa: BLE001
            logger.error("%s fallback shell failed: %s: %s", key, type(exc).__name__, exc)
            await send_server_error(send, method)
            return
        body = shell.body.encode() if isinstance(shell.body, str) else shell.body
        body = (
            body.replace(b"</body>", FALLBACK_SCRIPT.encode() + b"</body>", 1)
            if b"</body>" in body
            else body + FALLBACK_SCRIPT.encode()
        )
        await send_response(
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
        self,
        served: Served,
        scope: Scope,
        send: Send,
        method: str,
        request_headers: dict[str, str],
        route: str,
    ) -> None:
        entry = served.entry
        assert entry is not None
        now = self.engine.clock()
        if served.status is CacheStatus.BYPASS or served.status is CacheStatus.PRIVATE:
            await send_response(send, entry.status, served_headers(served), entry.body, method)
            return
        # A stored encoding the request accepts (pyisr.compression): sent as it is.
        accept = request_headers.get("accept-encoding") if self.engine.compress else None
        coding = answer_coding(entry, served.status, accept)
        out = served_headers(served, self.engine.cdn_tag_headers, coding, self.engine.edge_build)
        if served.status is not CacheStatus.STALE and served.stored:
            # (A render the store refused is rendered again by the next request: not hot.)
            self.fast.remember(scope, entry, route)
        out.append(age_header(entry, now))
        if not_modified(entry, request_headers.get("if-none-match"), coding):
            await send_response(send, 304, not_modified_headers(out), b"", "HEAD")
            return
        await send_response(send, entry.status, out, answer_body(entry, coding), method)

    async def _dynamic(
        self,
        route: Route,
        key: str,
        params: dict[str, Any],
        send: Send,
        method: str,
        *,
        origin: Origin | None = None,
        bypass: bool = False,
    ) -> None:
        """``revalidate = 0`` pages, private ones, every page in dev, and every page in draft
        mode (``bypass``: said with ``x-pyisr-cache: BYPASS``): rendered for this request only."""
        try:
            rendered = await route.render(key, params, origin=origin or self.origin.default())
        except Exception as exc:  # noqa: BLE001
            logger.error("%s render failed: %s: %s", key, type(exc).__name__, exc, exc_info=exc)
            await send_server_error(send, method)
            return
        body = rendered.body.encode() if isinstance(rendered.body, str) else rendered.body
        out = private_headers(visitor_headers(rendered.headers), DEV_NOSTORE if self.dev else NOSTORE)
        if bypass:
            out.append((b"x-pyisr-cache", b"BYPASS"))
        await send_response(send, rendered.status, out, body, method)

    async def _handler(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await route.handle(request)
        except MethodNotAllowed as exc:
            allow = ", ".join(exc.allowed).encode()
            await send_response(
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
            await send_server_error(send, scope["method"])
            return
        await response(scope, receive, send)

    async def _static(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.static is not None
        await self.static(scope, receive, send)

    # -- revalidate(path) -------------------------------------------------------------------

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

    def _origin_for(self, scope: Scope) -> Origin:
        """The origin of a shared render caused by this request (see pyisr.origin)."""
        host = None
        for name, value in scope.get("headers", ()):
            if name == b"host":
                host = value.decode("latin-1")
                break
        return self.origin.for_request(scope.get("scheme", "http"), host)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
