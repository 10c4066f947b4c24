"""The server's own endpoints under ``/_pyisr/``.

- ``POST /_pyisr/revalidate?path=|tag=|type=|stale=``: on-demand revalidation (secret);
- ``GET /_pyisr/health``: for load balancers (``"degraded"`` while a shared store is down);
- ``GET /_pyisr/cache?path=``: one entry's state (secret);
- ``GET /_pyisr/metrics``: Prometheus metrics (``metrics_secret`` or ``metrics_allow``);
- ``GET /_pyisr/draft?secret=&path=``: draft mode on (``&disable=1``: off), then ``path``;
- ``GET /_pyisr/data/<build id>/<path>.json``: a Pages page's props (SPEC S-51);
- any other path: the dashboard (``pyisr.dashboard``) when ``dashboard_secret`` is set, else 404.

The revalidation secret is compared in constant time, and only ever accepted from the
``Authorization`` header or the query string, never logged.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import Receive, Scope, Send

from pyisr.cache.entry import CacheEntry
from pyisr.cache.shareable import visitor_headers
from pyisr.cache.tags import validate_tags
from pyisr.config import Config
from pyisr.draft import disable_draft_mode, enable_draft_mode
from pyisr.engine import CacheStatus, Engine, RevalidationError
from pyisr.http import NOSTORE, PROPS_HEADER, cache_control
from pyisr.paths import BadPath, normalize_path
from pyisr.render import window_end
from pyisr.revalidation import revalidate
from pyisr.server.responses import send_response
from pyisr.site.route import RouteKind
from pyisr.site.site import Site

PREFIX = "/_pyisr/"
#: The largest body the revalidate endpoint reads (a path or a tag needs far less).
MAX_REVALIDATE_BODY = 64 * 1024
_JSON = (b"content-type", b"application/json; charset=utf-8")
_NOT_FOUND = b'{"not_found": true}'


def draft_secret_of(config: Config) -> str | None:
    """The secret of the site's draft cookies: ``PYISR_DRAFT_SECRET``, else the revalidate secret."""
    return os.environ.get("PYISR_DRAFT_SECRET") or config.revalidate_secret


class Endpoints:
    """Answers every path under ``/_pyisr/`` for one site and engine."""

    def __init__(self, site: Site, engine: Engine, config: Config) -> None:
        self.site = site
        self.engine = engine
        self.config = config
        #: The dashboard, at every other path under ``/_pyisr/`` (only when a secret is set).
        self.dashboard = _dashboard(engine, config)

    async def __call__(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        if path.startswith(PREFIX + "data/"):
            await self._props(path, scope, send)
            return
        request = Request(scope, receive)
        if path == PREFIX + "revalidate":
            response = await self._revalidate(request)
        elif path == PREFIX + "health":
            response = self._health(request)
        elif path == PREFIX + "cache":
            response = await self._inspect(request)
        elif path == PREFIX + "metrics":
            response = await self._metrics(request)
        elif path == PREFIX + "draft":
            response = self._draft(request)
        elif self.dashboard is not None:
            await self.dashboard(scope, receive, send)
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

    def _draft(self, request: Request) -> Response:
        """``/_pyisr/draft?secret=…&path=/blog/1`` turns draft mode on and goes to ``path``;
        ``&disable=1`` turns it off. What a CMS's preview link calls (Next.js' draft route).

        Only a local path is followed (never ``//host`` or a URL): the endpoint must not
        become an open redirect to another site.
        """
        secret = draft_secret_of(self.config)
        if not secret:
            return JSONResponse(
                {"error": "draft mode is off: set PYISR_DRAFT_SECRET or PYISR_REVALIDATE_SECRET"},
                status_code=404,
            )
        given = request.query_params.get("secret", "")
        if not hmac.compare_digest(given.encode(), secret.encode()):
            return JSONResponse({"error": "invalid secret"}, status_code=401)
        target = request.query_params.get("path", "/")
        if not target.startswith("/") or target.startswith("//") or "\\" in target:
            return JSONResponse({"error": "path must be a local path such as /blog/1"}, status_code=400)
        response = RedirectResponse(target, status_code=307, headers={"cache-control": NOSTORE})
        secure = request.url.scheme == "https"
        if request.query_params.get("disable"):
            return disable_draft_mode(response)
        return enable_draft_mode(response, secret=secret, secure=secure)

    async def _revalidate(self, request: Request) -> Response:
        if not self.config.revalidate_secret:
            return JSONResponse(
                {"error": "on-demand revalidation is off: set PYISR_REVALIDATE_SECRET"}, status_code=404
            )
        if request.method != "POST":
            return JSONResponse({"error": "use POST"}, status_code=405, headers={"allow": "POST"})
        if not self._authorized(request):
            return JSONResponse({"error": "invalid or missing secret"}, status_code=401)
        params: dict[str, Any] = dict(request.query_params)
        body = await _read_limited(request, MAX_REVALIDATE_BODY)
        if body is None:
            return JSONResponse({"error": f"body over {MAX_REVALIDATE_BODY} bytes"}, status_code=413)
        if body:
            try:
                if request.headers.get("content-type", "").startswith("application/json"):
                    parsed = json.loads(body)
                    if not isinstance(parsed, dict):
                        raise ValueError("not an object")
                    params.update(parsed)
                else:
                    params.update({k: v[-1] for k, v in parse_qs(body.decode()).items()})
            except ValueError:
                return JSONResponse(
                    {"error": 'body must be a JSON object ({"path": "/blog/1"}) or form data'},
                    status_code=400,
                )
        path, tag, kind = params.get("path"), params.get("tag"), params.get("type")
        if not path and not tag:
            return JSONResponse({"error": "give a path or a tag to revalidate"}, status_code=400)
        if not all(isinstance(v, str) for v in (path or "", tag or "", kind or "")):
            return JSONResponse({"error": "path, tag and type must be strings"}, status_code=400)
        if path and not kind and "[" in path:
            return JSONResponse(
                {"error": f"{path} is a route pattern: add type=page (its pages) or type=layout (all below)"},
                status_code=400,
            )
        stale = _as_flag(params.get("stale"))
        if stale is None:
            return JSONResponse({"error": "stale must be true or false"}, status_code=400)
        by = _caller(request)
        try:
            if tag:
                tags = validate_tags([tag], where="tag")
                await self.engine.revalidate_tags(tags, stale=stale, kind="tag", target=tag, by=by)
            if path and (kind or stale):
                # A route, a subtree, or (stale) one path: marked, each page renders at its next visit.
                await self.engine.revalidate_path(path, kind, stale=stale, by=by)
            elif path:
                await revalidate(path, engine=self.engine, by=by)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except RevalidationError as exc:
            return JSONResponse({"revalidated": False, "error": str(exc)}, status_code=exc.status)
        return JSONResponse({"revalidated": True, "now": int(time.time() * 1000)})

    def _health(self, request: Request) -> Response:
        """``ok`` (200) or ``degraded`` (503, with the reasons), for load balancers.

        Paths, hosts, the build id and the engine's details are shown only with the
        secret: they tell a stranger where things are. Failing CDN purges make the answer
        ``degraded`` with their reasons but leave it 200: every instance purges the same
        CDN, and a load balancer that took them all out would answer nothing at all.
        """
        info = self.engine.handler.describe()
        serving = list(self.engine.degraded_reasons(edge=False))
        if info.get("degraded"):
            serving.insert(0, "the cache store is unreachable")
        cdn = self.engine.cdn
        reasons = serving + (cdn.degraded_reasons() if cdn is not None else [])
        body: dict[str, Any] = {"status": "degraded" if reasons else "ok"}
        if reasons:
            body["reasons"] = reasons
        if cdn is not None:
            body["cdn"] = cdn.public_health()
        if self._authorized(request):
            body.update(
                build_id=self.site.build_id,
                newest_build_id=self.site.current_build_id(),
                cache=info,
                engine=self.engine.health(),
            )
        return JSONResponse(body, status_code=503 if serving else 200, headers={"cache-control": NOSTORE})

    async def _metrics(self, request: Request) -> Response:
        """``GET /_pyisr/metrics``: Prometheus' text format (pyisr.metrics), to a bearer of
        ``metrics_secret`` or an address in ``metrics_allow``; 404 when neither is set."""
        from pyisr.metrics import MetricsAccess, metrics_answer

        if request.method not in ("GET", "HEAD"):
            return JSONResponse({"error": "use GET"}, status_code=405, headers={"allow": "GET, HEAD"})
        access = MetricsAccess(self.config.metrics_secret, self.config.metrics_allow)
        client = request.client.host if request.client else None
        status, headers, body = await metrics_answer(
            self.engine, access, request.headers.get("authorization"), client
        )
        return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})

    async def _inspect(self, request: Request) -> Response:
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

    async def _props(self, path: str, scope: Scope, send: Send) -> None:
        """``/_pyisr/data/<build id>/<path>.json``: a Pages page's props, cached with the page."""
        method = scope["method"]
        build_id, _, page_path = path[len(PREFIX + "data/") :].partition("/")
        if build_id != self.site.build_id or not page_path.endswith(".json"):
            await send_response(send, 404, [_JSON], _NOT_FOUND, method)
            return
        try:
            key = normalize_path("/" + page_path[: -len(".json")])
        except BadPath:
            await send_response(send, 400, [], b"Bad Request", method)
            return
        found = self.site.match(key)
        if found is None or found[0].kind is not RouteKind.PAGES_PAGE or not found[0].is_isr:
            await send_response(send, 404, [_JSON], _NOT_FOUND, method)
            return
        route, params = found
        nostore = (b"cache-control", NOSTORE.encode())
        try:
            served = await self.engine.get(key, route.renderer(key, params), route.policy(key, bot=True))
            if served.status is CacheStatus.PRIVATE:
                # A page that belongs to its visitor: its props are this visitor's too.
                rendered = await route.render(key, params)
                props = visitor_headers(rendered.headers).get(PROPS_HEADER, '{"props": {}}')
                await send_response(send, 200, [_JSON, nostore], props.encode(), method)
                return
        except Exception:  # noqa: BLE001 - a failing page is a 500, never a crash
            await send_response(send, 500, [nostore], b'{"error": true}', method)
            return
        entry = served.entry
        if entry is None:
            await send_response(send, 404, [_JSON, nostore], _NOT_FOUND, method)
            return
        headers = [
            _JSON,
            (b"cache-control", cache_control(entry.revalidate, entry.expire).encode()),
            (b"x-pyisr-cache", served.status.value.encode()),
            (b"age", str(entry.age(self.engine.clock())).encode()),
        ]
        body = entry.headers.get(PROPS_HEADER, '{"props": {}}').encode()
        await send_response(send, 404 if entry.status == 404 else 200, headers, body, method)


def _dashboard(engine: Engine, config: Config) -> Any:
    """The dashboard's ASGI app when ``dashboard_secret`` is set, else ``None`` (404 as before)."""
    if not config.dashboard_secret:
        return None
    from pyisr.dashboard import dashboard_app  # imported only by sites that turn it on

    return dashboard_app(engine, secret=config.dashboard_secret, mount_path=PREFIX.rstrip("/"))


def _as_flag(value: object) -> bool | None:
    """``stale`` as JSON, a query or form field: true/false, 1/0, yes/no, ``max`` (Next.js
    16's profile for it); ``None`` when it is none of these."""
    if value is None or value is False or value is True:
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", "max"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    return None


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or ``None`` as soon as it passes ``limit`` bytes (never read whole)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


#: The header a client of the revalidate endpoint may name itself with (``pyisr revalidate``
#: sends ``pyisr revalidate (CLI)``); only read from a caller that gave the secret.
BY_HEADER = "x-pyisr-by"


def _caller(request: Request) -> str:
    """Who asked, for the store's record: the endpoint, the client's address, and the name
    the client gave itself (printable characters only, cut short)."""
    address = request.client.host if request.client else "an unknown address"
    said = "".join(c for c in request.headers.get(BY_HEADER, "")[:80] if c.isprintable()).strip()
    via = f"POST {PREFIX}revalidate from {address}"
    return f"{said} via {via}" if said else via


def describe_entry(entry: CacheEntry, now: float) -> dict[str, Any]:
    """What ``pyisr cache inspect`` and the inspection endpoint show about one entry."""
    return {
        "key": entry.key,
        "cached": True,
        "kind": entry.kind.value,
        "status": entry.status,
        "size": len(entry.body),
        # Bytes of each stored encoding (pyisr.compression), e.g. {"br": 4211, "gzip": 5120}.
        "encodings": {coding: len(data) for coding, data in entry.encodings.items()},
        "etag": entry.etag,
        "created_at": entry.created_at,
        "age": entry.age(now),
        "revalidate": entry.revalidate,
        "expire": entry.expire,
        "expires_at": entry.expires_at(),
        "expired": entry.is_expired(now),
        "stale": (window := window_end(entry)) is not None and now >= window,
        "stale_at": window,
        "next_regeneration_at": entry.stale_at(),
        "tags": list(entry.tags),
        "retry_at": entry.retry_at,
        "last_failure": entry.last_failure.to_json() if entry.last_failure else None,
    }
