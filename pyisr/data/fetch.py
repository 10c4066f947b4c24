"""``fetch``: an HTTP GET (or any method) through the data cache, on httpx.

Only successful (2xx) responses are cached; any other response is returned to the
caller uncached, and a stale cached response keeps being served while the origin
fails. ``cache`` follows Next.js: ``"force-cache"`` keeps the response until a tag is
revalidated, ``"no-store"`` never caches and makes the page around it dynamic.
With neither ``cache`` nor ``revalidate``, a fetch inside a page render takes the
page's revalidate, a fetch with ``tags`` is kept until they are revalidated, and a
plain fetch outside any page is not cached.

Responses are stored as JSON (status, headers, base64 body, URL and method), checked
field by field when read back: anyone who can write to the store can put bytes
there, and they must never be more than a response that is refetched.

A stored response is checked and decoded once, then kept beside its entry; identical
fetches in one render (or one build) share one request, a ``no-store`` GET included
(Next.js' request memoisation; :mod:`pyisr.data.memo`). Each caller gets an
``httpx.Response`` of its own over the same body.
"""

from __future__ import annotations

import base64
import binascii
import json as jsonlib
import time
import warnings
from collections.abc import Iterable, Mapping
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx

from pyisr import lifetimes
from pyisr.cache.entry import UNSET, CacheEntry, EntryKind, Revalidate, validate_revalidate
from pyisr.cache.tags import validate_tags
from pyisr.context import current_render
from pyisr.data import memo
from pyisr.data._lookup import DataRequest, data_key, read_through, record_in_render
from pyisr.data.memo import Decoded
from pyisr.data.serializer import UnreadableEntry
from pyisr.engine import CacheStatus, Rendered
from pyisr.lifetimes import Lifetime
from pyisr.log import enable_debug_logging, fetch_logger, fetch_logging
from pyisr.loop_local import LoopLocal
from pyisr.runtime import run_sync

CACHE_MODES = ("force-cache", "no-store", "no-cache", None)
_ENCODING_HEADERS = (b"content-encoding", b"transfer-encoding")
_IGNORED_KEY_HEADERS = {"traceparent", "tracestate"}


class UncacheableResponse(Exception):
    """A non-2xx response: returned to the caller, never stored."""

    #: Tells the engine this is an outcome to log quietly, not a render error.
    pyisr_expected = True

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.request.method} {response.request.url} returned {response.status_code}")
        self.response = response


def _resolve_lifetime(
    url: str, revalidate: Any, expire: Any, cache: str | None, tags: tuple[str, ...]
) -> Lifetime:
    """The revalidate (seconds, ``None`` forever, ``0`` no-store) and expire of this fetch."""
    seconds = _resolve_revalidate(url, revalidate, cache, tags)
    if isinstance(revalidate, str) or expire is not None:
        return lifetimes.parse(
            revalidate if isinstance(revalidate, str) else seconds, expire, where=f"fetch({url!r})"
        )
    return Lifetime(seconds)


def _resolve_revalidate(
    url: str, revalidate: Any, cache: str | None, tags: tuple[str, ...]
) -> Revalidate | None:
    """Seconds, ``None`` (forever) or ``0`` (no-store) for this fetch."""
    if cache not in CACHE_MODES:
        raise ValueError(
            f"fetch({url!r}): cache={cache!r} is not one of 'force-cache', 'no-store', 'no-cache'"
        )
    if revalidate is not UNSET:
        if isinstance(revalidate, str):
            seconds = lifetimes.profile(revalidate, where=f"fetch({url!r})").revalidate
        else:
            seconds = validate_revalidate(revalidate, where=f"fetch({url!r})")
        if cache is not None:
            conflicting = (cache == "force-cache" and seconds == 0) or (
                cache in ("no-store", "no-cache") and seconds != 0
            )
            if conflicting:
                warnings.warn(
                    f"fetch({url!r}) got cache={cache!r} and revalidate={revalidate!r}; only one "
                    "should be given. Both are ignored.",
                    stacklevel=4,
                )
                return _auto(tags)
        return seconds
    if cache == "force-cache":
        return None
    if cache in ("no-store", "no-cache"):
        return 0
    return _auto(tags)


def _auto(tags: tuple[str, ...]) -> Revalidate | None:
    """No ``cache``/``revalidate``: take the page's revalidate (Next.js' "auto cache");
    outside a page, keep tagged responses until their tag is revalidated, else don't cache."""
    ctx = current_render()
    if ctx is not None:
        return ctx.page_revalidate
    if tags:
        return None
    return 0


def _log_fetch(method: str, url: str, status: int, ms: float, outcome: str) -> None:
    enabled, full_url = fetch_logging()
    if not enabled:
        return
    shown = url
    if not full_url and len(url) > 48:
        shown = url[:48] + "…"
    enable_debug_logging()
    fetch_logger.debug("%s %s %s in %.0fms (cache %s)", method, shown, status, ms, outcome)


#: One client per event loop: a new client per call costs ~50 ms of TLS set-up.
def _new_client() -> httpx.AsyncClient:
    # The client is shared by every render in the process, so it keeps no cookies: a
    # Set-Cookie in one response must not be sent with another visitor's page's fetches.
    no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(follow_redirects=True, cookies=no_cookies)


_clients: LoopLocal[httpx.AsyncClient] = LoopLocal(_new_client)


def _client() -> httpx.AsyncClient:
    client = _clients.get()
    if client.is_closed:
        _clients.discard()
        client = _clients.get()
    return client


async def _send(
    method: str, url: str, headers: Mapping[str, str], content: bytes | None, timeout: float
) -> httpx.Response:
    response = await _client().request(method, url, headers=dict(headers), content=content, timeout=timeout)
    await response.aread()
    return response


#: Marks a stored response; another shape or version is never read as one.
_FORMAT = "pyisr-fetch/1"
_FIELDS = {"format", "status", "headers", "body", "url", "method"}


def _encode(response: httpx.Response) -> bytes:
    document = {
        "format": _FORMAT,
        "status": response.status_code,
        # Raw header bytes as latin-1 text: every byte maps to one character and back.
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in response.headers.raw],
        "body": base64.b64encode(response.content).decode("ascii"),
        "url": str(response.url),
        "method": response.request.method,
    }
    return jsonlib.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii")


#: A stored response checked and decoded: status, raw headers, body, method, URL.
_Parts = tuple[int, tuple[tuple[bytes, bytes], ...], bytes, str, str]


def _decode(body: bytes) -> httpx.Response:
    """The stored response; :class:`UnreadableEntry` unless every field has the shape we write."""
    return _response(_parts(body))


def _decoded(body: bytes) -> Decoded:
    parts = _parts(body)
    return Decoded(parts, len(parts[2]) + 100 * len(parts[1]) + 500, copy=_response)


def _response(parts: _Parts) -> httpx.Response:
    """A new response over checked parts (each caller gets its own object)."""
    status, headers, raw, method, url = parts
    return httpx.Response(status, headers=list(headers), content=raw, request=httpx.Request(method, url))


def _parts(body: bytes) -> _Parts:
    """The fields of a stored response; :class:`UnreadableEntry` unless each has the shape we write."""
    try:
        document = jsonlib.loads(body)
    except (ValueError, RecursionError):
        raise UnreadableEntry("not a stored response (malformed JSON)") from None
    if type(document) is not dict or document.get("format") != _FORMAT or set(document) != _FIELDS:
        raise UnreadableEntry("not a stored response (unknown format)")
    status, headers = document["status"], document["headers"]
    url, method, content = document["url"], document["method"], document["body"]
    if type(status) is not int or not 100 <= status <= 599:
        raise UnreadableEntry("stored response has no valid status")
    if type(headers) is not list or not all(
        type(pair) is list and len(pair) == 2 and type(pair[0]) is str and type(pair[1]) is str
        for pair in headers
    ):
        raise UnreadableEntry("stored response headers are not a list of name/value pairs")
    if type(url) is not str or type(method) is not str or not method.isascii() or not method.isalpha():
        raise UnreadableEntry("stored response has no valid URL or method")
    if type(content) is not str:
        raise UnreadableEntry("stored response body is not base64 text")
    try:
        raw = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise UnreadableEntry("stored response body is not valid base64") from None
    try:
        # The stored body is already decoded; drop encoding headers so httpx does not decode twice.
        kept = tuple(
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in headers
            if k.lower() not in ("content-encoding", "transfer-encoding")
        )
        parts = (status, kept, raw, method, url)
        _response(parts)  # refused now, not in a caller's hands
    except Exception as exc:  # noqa: BLE001 - e.g. a URL or header httpx refuses
        raise UnreadableEntry(f"stored response is not valid ({type(exc).__name__}: {exc})") from None
    return parts


async def fetch(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    content: bytes | str | None = None,
    json: Any = None,
    revalidate: int | bool | str | None = UNSET,
    tags: Iterable[str] | None = None,
    cache: str | None = None,
    timeout: float = 30.0,
    expire: int | None = None,
) -> httpx.Response:
    """Fetch ``url``, cached like Next.js' patched ``fetch`` (see the module docstring)."""
    request = httpx.Request(method, url, params=params, headers=headers, content=content, json=json)
    full_url = str(request.url)
    body = request.read() if request.stream is not None else b""
    send_headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    tag_tuple = validate_tags(tags, where=f"fetch({full_url!r}) tags")
    lifetime = _resolve_lifetime(full_url, revalidate, expire, cache, tag_tuple)
    seconds = lifetime.revalidate
    ctx = current_render()
    started = time.perf_counter()
    key_headers = sorted(
        (k.lower(), v) for k, v in send_headers.items() if k.lower() not in _IGNORED_KEY_HEADERS
    )
    key = data_key("fetch", method.upper(), full_url, key_headers, body.hex())
    memo_key = memo.memo_key(key, seconds, lifetime.expire, tag_tuple)
    if seconds == 0:
        if ctx is not None and (cache in ("no-store", "no-cache") or revalidate == 0):
            ctx.record((), 0)  # an explicit no-store makes the page dynamic, as in Next.js

        async def send_uncached() -> memo.Result:
            response = await _send(method, full_url, send_headers, body or None, timeout)
            # The body is already decoded; drop encoding headers so httpx does not decode twice.
            kept = tuple((k, v) for k, v in response.headers.raw if k.lower() not in _ENCODING_HEADERS)
            content = response.content
            parts = (response.status_code, kept, content, response.request.method, str(response.url))
            return Decoded(parts, len(content), copy=_response), _uncached_entry(key)

        if method.upper() in ("GET", "HEAD"):  # only reads are shared, as in Next.js
            decoded, _ = await memo.shared(memo.scopes(), memo_key, send_uncached)
        else:
            decoded, _ = await send_uncached()
        response = decoded.handout()
        _log_fetch(method, full_url, response.status_code, (time.perf_counter() - started) * 1000, "skip")
        return response

    async def compute() -> Rendered:
        response = await _send(method, full_url, send_headers, body or None, timeout)
        if not 200 <= response.status_code < 300:
            raise UncacheableResponse(response)
        return Rendered(_encode(response))

    outcome = "shared"

    async def read() -> memo.Result:
        nonlocal outcome
        decoded, entry, status = await read_through(
            key,
            compute,
            lifetime,
            tag_tuple,
            DataRequest.from_context(),
            _decoded,
            f"fetch({method} {full_url})",
        )
        outcome = "hit" if status in (CacheStatus.HIT, CacheStatus.STALE) else "miss"
        return decoded, entry

    try:
        decoded, entry = await memo.shared(memo.scopes(), memo_key, read)
    except UncacheableResponse as exc:
        _log_fetch(method, full_url, exc.response.status_code, (time.perf_counter() - started) * 1000, "miss")
        return exc.response
    record_in_render(entry, lifetime)
    response = decoded.handout()
    _log_fetch(method, full_url, response.status_code, (time.perf_counter() - started) * 1000, outcome)
    return response


def _uncached_entry(key: str) -> CacheEntry:
    """What a shared ``no-store`` response stands on: no tags, never stored."""
    return CacheEntry(key=key, body=b"", created_at=0.0, revalidate=0, kind=EntryKind.DATA)


def fetch_sync(url: str, **options: Any) -> httpx.Response:
    """``fetch`` for sync code (sync page functions, scripts, Django/Flask views)."""
    ctx = current_render()
    if ctx is None:
        return run_sync(fetch(url, **options))
    # Carry the render context into the bridge loop, then record what it collected here.
    return run_sync(_fetch_in_context(ctx, url, options))


async def _fetch_in_context(ctx: Any, url: str, options: dict[str, Any]) -> httpx.Response:
    from pyisr import context as render_context

    token = render_context.enter(ctx)
    try:
        return await fetch(url, **options)
    finally:
        render_context.leave(token)
