"""ISR for Django views: ``@isr(revalidate=60, tags=["posts"])``.

::

    from pyisr.integrations.django import isr

    @isr(revalidate=60, tags=["posts"])
    def post(request, id):
        return render(request, "post.html", {"post": Post.objects.get(pk=id)})

GET and HEAD requests are served from the cache by normalised path (the query string
never makes a new entry), with stale-while-revalidate, single-flight renders and
keep-last-good; other methods call the view as usual. Sync and async views both work.
``pyisr.revalidate(path)`` regenerates the page of an ``@isr`` view now: the URLconf
resolves the path and the view renders for an anonymous GET with the last request's host.
Needs the ``django`` extra: ``pip install 'pyisr[django]'``.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

try:
    import django  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without Django
    raise ImportError(
        "pyisr.integrations.django needs Django: pip install 'pyisr[django]' (or 'django>=4.2')"
    ) from exc

from pyisr.cache.entry import Revalidate
from pyisr.engine import Engine, Rendered, RenderPolicy
from pyisr.integrations import (
    DEFAULT_ALLOW_HEADERS,
    FailedResponse,
    allow_list,
    check_options,
    key_for_decoded_path,
    no_store,
    on_bridge,
    page_policy,
    path_info_for,
    pattern_from_rule,
    response_parts,
    storable_headers,
)
from pyisr.paths import normalize_path
from pyisr.revalidation import register_view_resolver
from pyisr.runtime import get_engine, run_sync

View = Callable[..., Any]


def isr(
    revalidate: object = False,
    *,
    tags: Iterable[str] | None = None,
    engine: Engine | None = None,
    allow_headers: Iterable[str] = DEFAULT_ALLOW_HEADERS,
) -> Callable[[View], View]:
    """Cache a Django function view's GET/HEAD responses with ISR.

    ``revalidate``: seconds, ``False``/``None`` (until invalidated) or ``0`` (never
    cached). ``tags``: explicit tags for ``revalidate_tag``. Each page also carries its
    path's implicit tags and, for ``path()`` routes, its route pattern's
    (``revalidate_path("/blog/[id]", "page")``).

    One render is served to every visitor, so the view is called with a copy of the
    request that identifies no one: method GET, no query string, no cookies, only the
    ``allow_headers`` (default ``host``), an anonymous ``request.user`` and an empty
    session. Cookies the view sets are not stored. Views run in pyisr's render threads
    (sync views) or on its bridge loop (async views), outside the request's
    transaction; a 5xx or an exception is a failed render and never cached.
    """
    seconds, tag_tuple = check_options(revalidate, tags, "@isr")
    allowed = allow_list(allow_headers)

    def decorate(view: View) -> View:
        register_view_resolver(_resolve)  # revalidate(path) can reach this view now
        if inspect.iscoroutinefunction(view):
            return _async_wrapper(view, seconds, tag_tuple, engine, allowed)
        return _sync_wrapper(view, seconds, tag_tuple, engine, allowed)

    return decorate


@dataclass(frozen=True)
class _Options:
    """What ``@isr`` was given, kept on the wrapper so ``revalidate(path)`` can render it."""

    view: View
    seconds: Revalidate
    tags: tuple[str, ...]
    engine: Engine | None
    allowed: frozenset[str]


def _sync_render(view: View, clone: Any, args: Any, kwargs: Any, failed: FailedResponse) -> Any:
    def render() -> Rendered:
        from django.db import close_old_connections

        # Render threads are not request threads: close connections as Django would.
        close_old_connections()
        try:
            return _rendered(view(clone, *args, **kwargs), failed)
        finally:
            close_old_connections()

    return render


def _async_render(view: View, clone: Any, args: Any, kwargs: Any, failed: FailedResponse) -> Any:
    async def render() -> Rendered:
        from asgiref.sync import sync_to_async

        response = await view(clone, *args, **kwargs)
        if _needs_render(response):
            await sync_to_async(response.render)()
        if getattr(response, "streaming", False) and getattr(response, "is_async", False):
            body = b"".join([bytes(chunk) async for chunk in response.streaming_content])
            return _rendered(response, failed, body)
        return _rendered(response, failed)

    return render


def _sync_wrapper(
    view: View, seconds: Revalidate, tags: tuple[str, ...], engine: Engine | None, allowed: frozenset[str]
) -> View:
    @functools.wraps(view)
    def wrapper(request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.method not in ("GET", "HEAD"):
            return view(request, *args, **kwargs)
        _remember_site(request)
        eng = engine if engine is not None else get_engine()
        key, policy = _key_and_policy(request, seconds, tags)
        failed = FailedResponse()
        render = _sync_render(view, _anonymous_request(request, allowed), args, kwargs, failed)
        try:
            served = run_sync(eng.get(key, render, policy))
        except Exception:
            if failed.response is None:
                raise
            return _failed(failed.response)
        return _response(served, eng, request)

    wrapper.__pyisr_isr__ = _Options(view, seconds, tags, engine, allowed)  # type: ignore[attr-defined]
    return wrapper


def _async_wrapper(
    view: View, seconds: Revalidate, tags: tuple[str, ...], engine: Engine | None, allowed: frozenset[str]
) -> View:
    @functools.wraps(view)
    async def wrapper(request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.method not in ("GET", "HEAD"):
            return await view(request, *args, **kwargs)
        _remember_site(request)
        eng = engine if engine is not None else get_engine()
        key, policy = _key_and_policy(request, seconds, tags)
        failed = FailedResponse()
        render = _async_render(view, _anonymous_request(request, allowed), args, kwargs, failed)
        try:
            served = await on_bridge(eng.get(key, render, policy))
        except Exception:
            if failed.response is None:
                raise
            return _failed(failed.response)
        return _response(served, eng, request)

    wrapper.__pyisr_isr__ = _Options(view, seconds, tags, engine, allowed)  # type: ignore[attr-defined]
    return wrapper


# -- revalidate(path): regenerate a page of an @isr view now ---------------------------------

#: Host, scheme and script prefix of the last request an @isr view served: what a page
#: regenerated by ``revalidate(path)`` sees, as if that visitor had asked for it.
_site: dict[str, str] = {}


def _remember_site(request: Any) -> None:
    meta = request.META
    _site["host"] = meta.get("HTTP_HOST") or meta.get("SERVER_NAME") or "localhost"
    _site["scheme"] = request.scheme
    _site["script"] = meta.get("SCRIPT_NAME", "")


def _synthetic_request(path_info: str) -> Any:
    """A GET for ``path_info`` from no one: the last visitor's host, nothing of theirs."""
    import io

    from django.apps import apps
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIRequest

    host = _site.get("host", "localhost")
    name, _, port = host.partition(":")
    scheme = _site.get("scheme", "http")
    request = WSGIRequest(
        {
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": _site.get("script", ""),
            "PATH_INFO": path_info.encode("utf-8").decode("latin-1"),
            "QUERY_STRING": "",
            "SERVER_NAME": name,
            "SERVER_PORT": port or ("443" if scheme == "https" else "80"),
            "HTTP_HOST": host,
            "wsgi.input": io.BytesIO(b""),
            "wsgi.url_scheme": scheme,
        }
    )
    if apps.is_installed("django.contrib.auth"):
        from django.contrib.auth.models import AnonymousUser

        request.user = AnonymousUser()
    if apps.is_installed("django.contrib.sessions"):
        request.session = import_module(settings.SESSION_ENGINE).SessionStore()
    return request


async def _resolve(key: str) -> tuple[str, Any, RenderPolicy] | None:
    """``pyisr.revalidate(path)`` for Django: the @isr view the URLconf gives ``key``."""
    from django.conf import settings
    from django.urls import Resolver404, get_urlconf, resolve

    if not settings.configured or (get_urlconf() or getattr(settings, "ROOT_URLCONF", None)) is None:
        return None  # no Django site in this process (another framework's path)
    path = path_info_for(key, _site.get("script", ""))
    if path is None:
        return None
    try:
        match = resolve(path)
    except Resolver404:
        return None
    options = getattr(match.func, "__pyisr_isr__", None)
    if not isinstance(options, _Options) or options.engine not in (None, get_engine()):
        return None  # not an @isr view, or one caching in an engine of its own
    request = _synthetic_request(path)
    request.resolver_match = match
    resolved, policy = _key_and_policy(request, options.seconds, options.tags)
    clone = _anonymous_request(request, options.allowed)
    make = _async_render if inspect.iscoroutinefunction(options.view) else _sync_render
    return resolved, make(options.view, clone, match.args, match.kwargs, FailedResponse()), policy



def _key_and_policy(request: Any, seconds: Revalidate, tags: tuple[str, ...]) -> tuple[str, RenderPolicy]:
    key = key_for_decoded_path(request.path)
    pattern = None
    match = getattr(request, "resolver_match", None)
    route = getattr(match, "route", None)
    if isinstance(route, str):
        found = pattern_from_rule(route)
        if found is not None:
            # ``route`` is relative to the script prefix (SCRIPT_NAME); the key is not.
            prefix = request.path[: len(request.path) - len(request.path_info)]
            pattern = normalize_path(key_for_decoded_path(prefix).rstrip("/") + found)
    return key, page_policy(key, pattern, seconds, tags)


def _anonymous_request(request: Any, allowed: frozenset[str]) -> Any:
    """A shallow copy of ``request`` with everything that identifies the visitor removed."""
    from django.http import QueryDict

    clone = copy.copy(request)
    meta = {
        k: v
        for k, v in request.META.items()
        if not k.startswith("HTTP_") or k[5:].replace("_", "-").lower() in allowed
    }
    for name in ("CONTENT_LENGTH", "CONTENT_TYPE"):
        meta.pop(name, None)
    meta.update(REQUEST_METHOD="GET", QUERY_STRING="")
    clone.META = meta
    if hasattr(request, "environ"):  # WSGIRequest: META *is* the environ
        clone.environ = meta
    if isinstance(getattr(request, "scope", None), dict):  # ASGIRequest
        clone.scope = {
            **request.scope,
            "method": "GET",
            "query_string": b"",
            "headers": [
                (k, v) for k, v in request.scope.get("headers", ()) if k.decode("latin-1").lower() in allowed
            ],
        }
    clone.method = "GET"
    clone.COOKIES = {}
    clone.GET = QueryDict()
    clone.POST = QueryDict()
    clone.__dict__.pop("headers", None)  # cached HttpHeaders of the original META
    if hasattr(request, "user"):
        from django.contrib.auth.models import AnonymousUser

        anonymous = AnonymousUser()
        clone.user = anonymous

        async def auser() -> Any:
            return anonymous

        clone.auser = auser
    if hasattr(request, "session"):
        from django.conf import settings

        clone.session = import_module(settings.SESSION_ENGINE).SessionStore()
    if hasattr(request, "_messages"):
        from django.contrib.messages.storage import default_storage

        clone._messages = default_storage(clone)
    return clone


def _needs_render(response: Any) -> bool:
    return callable(getattr(response, "render", None)) and not getattr(response, "is_rendered", True)


def _rendered(response: Any, failed: FailedResponse, body: bytes | None = None) -> Rendered:
    """A Django response as the engine's render result (template responses rendered)."""
    if _needs_render(response):
        response.render()
    if body is None:
        if getattr(response, "streaming", False):
            body = b"".join(bytes(chunk) for chunk in response.streaming_content)
        else:
            body = bytes(response.content)
    status = int(response.status_code)
    if status >= 500:
        failed.response = (status, list(response.items()), body)
    return Rendered(body, status=status, headers=storable_headers(response.items()))


def _response(served: Any, engine: Engine, request: Any) -> Any:
    status, headers, body = response_parts(
        served, engine.clock(), request.headers.get("If-None-Match"), head=request.method == "HEAD"
    )
    return _build(status, headers, body)


def _failed(parts: tuple[int, list[tuple[str, str]], bytes]) -> Any:
    status, headers, body = parts
    return _build(status, no_store(headers), body)


def _build(status: int, headers: list[tuple[str, str]], body: bytes) -> Any:
    from django.http import HttpResponse

    response = HttpResponse(body, status=status)
    if not any(k.lower() == "content-type" for k, _ in headers):
        del response.headers["Content-Type"]
    for name, value in headers:
        response.headers[name] = value
    return response


__all__ = ["isr"]
