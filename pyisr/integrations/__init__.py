"""ISR for views of an existing app: Starlette/FastAPI (ASGI), Django and Flask.

Each integration is an adapter to the engine, like the server (DESIGN.md, "Layers"):
it turns a request into a cache key (the normalised path; the query string never makes
a new entry) and a render (the app's own view, called with a request built from nothing:
the path, the canonical host of ``pyisr.origin`` and the allowed headers), hands both to
:meth:`Engine.get`, and turns the answer back into the framework's response with pyisr's
headers (``pyisr.http``). A ``PRIVATE`` answer (the render belonged to its visitor, see
``pyisr.cache.shareable``) is the app's own answer to the visitor's real request instead.

- :class:`pyisr.integrations.asgi.ISRMiddleware` — any ASGI app (Starlette, FastAPI).
- :func:`pyisr.integrations.django.isr` — a Django view decorator (``pyisr[django]``).
- :func:`pyisr.integrations.flask.isr` — a Flask view decorator (``pyisr[flask]``).

This package only holds what the three share; it imports no framework.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from pyisr import lifetimes
from pyisr.cache.entry import EntryKind
from pyisr.cache.tags import implicit_tags, validate_tags
from pyisr.draft import is_draft_request
from pyisr.engine import CacheStatus, Engine, RenderFn, RenderPolicy, RenderSlotsExhausted
from pyisr.events import route_label
from pyisr.http import (
    NOSTORE,
    age_header,
    answer_body,
    answer_coding,
    not_modified,
    not_modified_headers,
    served_headers,
)
from pyisr.lifetimes import Lifetime
from pyisr.paths import MAX_KEY_BYTES, normalize_path
from pyisr.runtime import bridge

T = TypeVar("T")

#: Request headers a render sees besides ``Host`` (always the canonical host, see
#: ``pyisr.origin``): none by default. Cookies, authorization, accept-language,
#: user-agent... are dropped, because one render is served to everyone.
DEFAULT_ALLOW_HEADERS: tuple[str, ...] = ()

#: Never passed to a shared render, even when asked: they identify the visitor, or name
#: a host (behind a proxy) that would replace the canonical one.
_REFUSED_HEADERS = ("cookie", "authorization", "x-forwarded-host", "forwarded")

#: Why a render that read the visitor's session is not shared, as the warning says it.
SESSION_REASON = (
    "reads the session (render what depends on the visitor in an uncached view, or fetch it separately)"
)

#: Characters left as they are when re-encoding a decoded request path (RFC 3986 pchar + "/").
_PATH_SAFE = "/!$&'()*+,;=:@~"


def key_for_decoded_path(path: str) -> str:
    """The cache key for a path a framework has already percent-decoded.

    Re-encoding first keeps a literal ``%`` (sent as ``%25``) from being decoded twice
    by :func:`normalize_path`; the result is the key the server would use for the URL.
    """
    return normalize_path(quote(path, safe=_PATH_SAFE))


def cacheable(method: str, path: str) -> bool:
    """Whether a request may be answered from the cache at all.

    Only GET and HEAD; and only a path that can be a key (``paths.MAX_KEY_BYTES``): a
    longer one is left to the app, uncached, so it can never fill the cache.
    """
    if method != "GET" and method != "HEAD":
        return False
    return len(path) <= MAX_KEY_BYTES // 4 or len(path.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES


def allow_list(headers: Iterable[str]) -> frozenset[str]:
    """Lower-cased header names, validated once when a view or middleware is set up."""
    names = frozenset(h.lower() for h in headers)
    for bad in _REFUSED_HEADERS:
        if bad in names:
            raise ValueError(
                f"allow_headers must not include {bad!r}: a page rendered for one visitor "
                "would be served to everyone"
            )
    return names


_CONVERTER = re.compile(r"<(?:(?P<conv>[^>:]+):)?(?P<name>[^>:]+)>")
_REGEX_HINTS = ("^", "$", "(?", "\\", "[")


def pattern_from_rule(rule: str) -> str | None:
    """A Django route or Flask rule (``blog/<int:id>/``) as pyisr's pattern (``/blog/[id]``).

    The pattern gives pages their implicit page tag, so
    ``revalidate_path("/blog/[id]", "page")`` reaches every post. ``None`` for regular
    expression routes (``re_path``), which have no such spelling.
    """
    if any(h in rule for h in _REGEX_HINTS):
        return None

    def repl(m: re.Match[str]) -> str:
        conv = (m.group("conv") or "").split("(", 1)[0]
        return f"[...{m.group('name')}]" if conv == "path" else f"[{m.group('name')}]"

    return normalize_path("/" + _CONVERTER.sub(repl, rule).lstrip("/"))


def page_policy(
    key: str, pattern: str | None, lifetime: Lifetime, tags: tuple[str, ...], *, route: str | None = None
) -> RenderPolicy:
    """The policy of one page: the view's lifetime and tags plus the implicit path tags.

    ``route`` names the view in warnings (its URL rule); the pattern or key by default.
    """
    name = route or pattern or key
    if pattern is not None and pattern == key:
        pattern = None
    return RenderPolicy(
        kind=EntryKind.PAGE,
        revalidate=lifetime.revalidate,
        expire=lifetime.expire,
        tags=tags + implicit_tags(key, pattern),
        route=name,
    )


def check_options(
    revalidate: object, tags: Iterable[str] | None, where: str, expire: object = None
) -> tuple[Lifetime, tuple[str, ...]]:
    """Validate a view's lifetime (``revalidate`` seconds, ``False`` or a profile name, and
    ``expire``) and ``tags`` once, at decoration time."""
    return lifetimes.parse(revalidate, expire, where=where), validate_tags(tags, where=f"{where} tags")


@dataclass(frozen=True, slots=True)
class PageAnswer:
    """The response an integration sends for a cached page (or a failed render's own).

    Headers stay bytes from the store to the wire (ASGI sends them as they are); the
    WSGI frameworks take :meth:`text_headers`.
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def text_headers(self) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.headers]


@dataclass
class FailedResponse:
    """The 5xx response a render produced, kept so a MISS can show the app's own error page.

    The engine never stores a 5xx; when nothing is cached yet the visitor still gets
    what the app answered (with ``no-store``) instead of a generic error.
    """

    response: tuple[int, list[tuple[str, str]], bytes] | None = None


async def serve_page(
    engine: Engine,
    key: str,
    render: RenderFn,
    policy: RenderPolicy,
    failed: FailedResponse,
    *,
    if_none_match: str | None,
    head: bool,
    accept_encoding: str | None = None,
) -> PageAnswer | None:
    """The one flow of every integration for a cached GET or HEAD.

    The engine answers ``key`` (HIT, STALE, MISS...) and the answer becomes a response
    with pyisr's headers: in a stored encoding ``accept_encoding`` accepts (with its
    ``Content-Encoding``, so no compressing middleware on the way encodes it again), a
    304 when ``If-None-Match`` matches, no body for HEAD (its ``Content-Length`` kept).
    A failed render with nothing cached answers the app's own 5xx (``no-store``, without
    the render's cookies); any other exception propagates.
    ``None`` means the page belongs to its visitor (``CacheStatus.PRIVATE``): the
    adapter lets the app answer the visitor's real request itself, marked no-store.
    """
    try:
        served = await engine.get(key, render, policy)
        engine.events.served(key, route_label(policy), served.status.value)
    except RenderSlotsExhausted as exc:
        # Every render slot is held by a hung render: say so at once, as the server does.
        busy = b"Service Unavailable: every render slot is busy"
        retry = [(b"retry-after", str(exc.retry_after).encode()), (b"cache-control", NOSTORE.encode())]
        return PageAnswer(503, [*retry, _length(busy)], b"" if head else busy)
    except Exception:
        if failed.response is None:
            raise
        status, headers, body = failed.response
        encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in no_store(headers)]
        return PageAnswer(status, [*encoded, _length(body)], b"" if head else body)
    if served.status is CacheStatus.PRIVATE:
        return None
    entry = served.entry
    assert entry is not None, "integrations render unknown paths, so an entry always exists"
    # Never for BYPASS (nor PRIVATE, answered above): pyisr.http.offered_codings.
    coding = answer_coding(entry, served.status, accept_encoding if engine.compress else None)
    out = served_headers(served, engine.cdn_tag_headers, coding, engine.edge_build)
    body = answer_body(entry, coding)
    if served.status is not CacheStatus.BYPASS:
        out.append(age_header(entry, engine.clock()))
        if not_modified(entry, if_none_match, coding):
            return PageAnswer(304, [*not_modified_headers(out), _length(b"")], b"")
    return PageAnswer(entry.status, [*out, _length(body)], b"" if head else body)


#: Decides, per request, that the visitor gets a fresh render of their own, never stored
#: (``bypass=`` of ``@isr`` and the middleware; Django's default: logged-in users).
Bypass = Callable[[Any], bool]

#: The headers of a bypassed answer, added to the app's own response.
BYPASS_HEADERS: tuple[tuple[str, str], ...] = (("cache-control", NOSTORE), ("x-pyisr-cache", "BYPASS"))


def is_bypassed(request: Any, bypass: Bypass | None, cookies: Mapping[str, str] | str | None) -> bool:
    """Whether ``request`` skips the cache: in draft mode (``pyisr.draft``: a valid signed
    cookie, in every framework), or ``bypass(request)`` says so. The app then answers the
    visitor's real request itself, with :data:`BYPASS_HEADERS`."""
    return is_draft_request(cookies) or (bypass is not None and bool(bypass(request)))


def _length(body: bytes) -> tuple[bytes, bytes]:
    return (b"content-length", str(len(body)).encode())


def no_store(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A shared render's (failed) response headers, made uncacheable for every cache on the way.

    Its cookies are dropped: they were set for the render's anonymous request, not for
    the visitor who gets this answer.
    """
    dropped = ("cache-control", "content-length", "set-cookie")
    return [(k, v) for k, v in headers if k.lower() not in dropped] + [("cache-control", NOSTORE)]


def path_info_for(key: str, script_root: str) -> str | None:
    """The decoded path an app mounted at ``script_root`` routes for page key ``key``,
    or ``None`` when the key lies outside that mount (``revalidate(path)``'s lookups)."""
    script = script_root.rstrip("/")
    path = unquote(key)
    if not script:
        return path
    if not (path == script or path.startswith(script + "/")):
        return None
    return path[len(script) :] or "/"


async def on_bridge(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` on pyisr's long-lived bridge loop.

    Async views of Django and Flask often run on a loop made for one request
    (``async_to_sync``), which cancels leftover tasks when it ends: a background
    regeneration started there would never finish. On the bridge loop it does, and
    sync and async views share one single-flight state.
    """
    loop = bridge.loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:  # pragma: no cover - always called from async code
        running = None
    if running is loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


def __getattr__(name: str) -> object:
    if name == "ISRMiddleware":
        from pyisr.integrations.asgi import ISRMiddleware

        return ISRMiddleware
    raise AttributeError(f"module 'pyisr.integrations' has no attribute {name!r}")


__all__ = [
    "BYPASS_HEADERS",
    "DEFAULT_ALLOW_HEADERS",
    "Bypass",
    "is_bypassed",
    "SESSION_REASON",
    "ISRMiddleware",
    "allow_list",
    "cacheable",
    "check_options",
    "key_for_decoded_path",
    "on_bridge",
    "page_policy",
    "path_info_for",
    "pattern_from_rule",
    "serve_page",
    "PageAnswer",
    "FailedResponse",
]
