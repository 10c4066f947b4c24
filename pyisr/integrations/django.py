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
resolves the path and the view renders for an anonymous GET on the canonical host.
Needs the ``django`` extra: ``pip install 'pyisr[django]'``.
"""

from __future__ import annotations

import functools
import inspect
import io
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

from pyisr.engine import Engine, Rendered, RenderPolicy
from pyisr.http import private_cache_control
from pyisr.integrations import (
    DEFAULT_ALLOW_HEADERS,
    SESSION_REASON,
    FailedResponse,
    PageAnswer,
    allow_list,
    cacheable,
    check_options,
    key_for_decoded_path,
    on_bridge,
    page_policy,
    path_info_for,
    pattern_from_rule,
    serve_page,
)
from pyisr.lifetimes import Lifetime
from pyisr.origin import CanonicalOrigin, Origin
from pyisr.paths import normalize_path
from pyisr.runtime import get_engine, run_sync

View = Callable[..., Any]


def isr(
    revalidate: object = False,
    *,
    expire: int | None = None,
    tags: Iterable[str] | None = None,
    engine: Engine | None = None,
    allow_headers: Iterable[str] = DEFAULT_ALLOW_HEADERS,
    site_url: str | None = None,
) -> Callable[[View], View]:
    """Cache a Django function view's GET/HEAD responses with ISR.

    ``revalidate``: seconds, ``False``/``None`` (until invalidated), a profile name
    (``"hours"``, or one of ``pyisr.toml``'s) or ``0`` (never cached). ``expire``: seconds
    after which a page is never served (else the profile's, or one year). ``tags``:
    explicit tags for ``revalidate_tag``. Each page also carries its
    path's implicit tags and, for ``path()`` routes, its route pattern's
    (``revalidate_path("/blog/[id]", "page")``).

    One render is served to every visitor, so the view is called with a request built
    from nothing: a GET for the path with no query string, no cookies, no ``REMOTE_ADDR``,
    no attribute any middleware set, only the ``allow_headers`` (none by default), an
    ``AnonymousUser`` and an empty session. Its host is ``site_url`` (default
    ``PYISR_SITE_URL``), else the request's host when it is a concrete ``ALLOWED_HOSTS``
    entry, else the first concrete one, else ``localhost``. A render that sets a cookie,
    says ``private``/``no-store``/``Vary: *``, uses the CSRF token or touches the session
    is never stored: the view answers each visitor itself (``no-store``) and a shared
    render is tried again a minute later. Views run in pyisr's render threads (sync
    views) or on its bridge loop (async views), outside the request's transaction; a 5xx
    or an exception is a failed render and never cached.
    """
    lifetime, tag_tuple = check_options(revalidate, tags, "@isr", expire)
    options = dict(
        lifetime=lifetime,
        tags=tag_tuple,
        engine=engine,
        allowed=allow_list(allow_headers),
        origin=CanonicalOrigin(site_url, where="@isr site_url"),
    )

    def decorate(view: View) -> View:
        # revalidate(path) can reach this view now (and from every engine it later serves with).
        (engine if engine is not None else get_engine()).add_resolver(_resolve)
        wrap = _async_wrapper if inspect.iscoroutinefunction(view) else _sync_wrapper
        return wrap(_Options(view=view, **options))  # type: ignore[arg-type]

    return decorate


@dataclass(frozen=True)
class _Options:
    """What ``@isr`` was given, kept on the wrapper so ``revalidate(path)`` can render it."""

    view: View
    lifetime: Lifetime
    tags: tuple[str, ...]
    engine: Engine | None
    allowed: frozenset[str]
    origin: CanonicalOrigin

    def origin_for(self, request: Any | None) -> Origin:
        """The canonical origin, or the request's host when ``ALLOWED_HOSTS`` vouches for it."""
        from django.conf import settings

        allowed = list(getattr(settings, "ALLOWED_HOSTS", ()))
        if request is None:
            return self.origin.default(allowed)
        return self.origin.for_request(request.scheme, request.META.get("HTTP_HOST"), allowed)


#: Why a render that used the CSRF token is not shared, as the warning says it.
CSRF_REASON = (
    "uses the CSRF token ({% csrf_token %} or get_token(); move the form to an uncached view, "
    "or fetch the token separately)"
)


def _private_reason(fresh: Any) -> str | None:
    """What the render did that makes its page its visitor's own, if anything."""
    meta = fresh.META
    if "CSRF_COOKIE" in meta or meta.get("CSRF_COOKIE_NEEDS_UPDATE") or meta.get("CSRF_COOKIE_USED"):
        return CSRF_REASON
    session = getattr(fresh, "session", None)
    if getattr(session, "accessed", False) or getattr(session, "modified", False):
        return SESSION_REASON
    return None


def _sync_render(options: _Options, fresh: Any, args: Any, kwargs: Any, failed: FailedResponse) -> Any:
    def render() -> Rendered:
        from django.db import close_old_connections

        # Render threads are not request threads: close connections as Django would.
        close_old_connections()
        try:
            return _rendered(options.view(fresh, *args, **kwargs), fresh, failed)
        finally:
            close_old_connections()

    return render


def _async_render(options: _Options, fresh: Any, args: Any, kwargs: Any, failed: FailedResponse) -> Any:
    async def render() -> Rendered:
        from asgiref.sync import sync_to_async

        response = await options.view(fresh, *args, **kwargs)
        if _needs_render(response):
            await sync_to_async(response.render)()
        if getattr(response, "streaming", False) and getattr(response, "is_async", False):
            body = b"".join([bytes(chunk) async for chunk in response.streaming_content])
            return _rendered(response, fresh, failed, body)
        return _rendered(response, fresh, failed)

    return render


def _prepare(request: Any, options: _Options) -> tuple[Engine, str, RenderPolicy, Any, FailedResponse]:
    """What one cached GET needs: the engine (knowing this view), key, policy, render request."""
    _remember_script(request)
    eng = options.engine if options.engine is not None else get_engine()
    eng.add_resolver(_resolve)
    key, policy = _key_and_policy(request, options.lifetime, options.tags)
    return eng, key, policy, _shared_request(request, options), FailedResponse()


def _conditions(request: Any) -> dict[str, Any]:
    return {"if_none_match": request.headers.get("If-None-Match"), "head": request.method == "HEAD"}


def _sync_wrapper(options: _Options) -> View:
    view = options.view

    @functools.wraps(view)
    def wrapper(request: Any, *args: Any, **kwargs: Any) -> Any:
        if not cacheable(request.method, request.path):
            return view(request, *args, **kwargs)
        eng, key, policy, fresh, failed = _prepare(request, options)
        render = _sync_render(options, fresh, args, kwargs, failed)
        answer = run_sync(serve_page(eng, key, render, policy, failed, **_conditions(request)))
        if answer is None:  # the page belongs to its visitor: the view answers them itself
            return _no_store(view(request, *args, **kwargs))
        return _build(answer)

    wrapper.__pyisr_isr__ = options  # type: ignore[attr-defined]
    return wrapper


def _async_wrapper(options: _Options) -> View:
    view = options.view

    @functools.wraps(view)
    async def wrapper(request: Any, *args: Any, **kwargs: Any) -> Any:
        if not cacheable(request.method, request.path):
            return await view(request, *args, **kwargs)
        eng, key, policy, fresh, failed = _prepare(request, options)
        render = _async_render(options, fresh, args, kwargs, failed)
        answer = await on_bridge(serve_page(eng, key, render, policy, failed, **_conditions(request)))
        if answer is None:  # the page belongs to its visitor: the view answers them itself
            return _no_store(await view(request, *args, **kwargs))
        return _build(answer)

    wrapper.__pyisr_isr__ = options  # type: ignore[attr-defined]
    return wrapper


# -- the request a shared render sees -------------------------------------------------------

#: The script prefix (``SCRIPT_NAME``) the site is mounted at, from the server's config as
#: the last request carried it: ``revalidate(path)`` strips it from page keys.
_script: dict[str, str] = {}


def _remember_script(request: Any) -> None:
    _script["name"] = request.META.get("SCRIPT_NAME", "")


def _fresh_request(path_info: str, script_name: str, origin: Origin, headers: dict[str, str]) -> Any:
    """A GET for ``path_info`` from no one: built from nothing, never a copy of a request.

    It has an anonymous user and an empty session, and only the given ``HTTP_*`` headers;
    middleware does not run for it, so nothing a middleware sets for a visitor is there.
    """
    from django.apps import apps
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIRequest

    request = WSGIRequest(
        {
            **headers,
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": script_name,
            "PATH_INFO": path_info.encode("utf-8").decode("latin-1"),
            "QUERY_STRING": "",
            "SERVER_NAME": origin.hostname,
            "SERVER_PORT": str(origin.port),
            "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_HOST": origin.host,
            "wsgi.input": io.BytesIO(b""),
            "wsgi.url_scheme": origin.scheme,
        }
    )
    if apps.is_installed("django.contrib.auth"):
        from django.contrib.auth.models import AnonymousUser

        anonymous = AnonymousUser()
        request.user = anonymous

        async def auser() -> Any:
            return anonymous

        request.auser = auser
    if apps.is_installed("django.contrib.sessions"):
        request.session = import_module(settings.SESSION_ENGINE).SessionStore()
    return request


def _shared_request(request: Any, options: _Options) -> Any:
    """The request a shared render of ``request``'s page sees (see :func:`_fresh_request`)."""
    meta = request.META
    headers = {
        k: v
        for k, v in meta.items()
        if k.startswith("HTTP_") and k != "HTTP_HOST" and k[5:].replace("_", "-").lower() in options.allowed
    }
    fresh = _fresh_request(
        request.path_info, meta.get("SCRIPT_NAME", ""), options.origin_for(request), headers
    )
    fresh.resolver_match = getattr(request, "resolver_match", None)
    return fresh


async def _resolve(key: str) -> tuple[str, Any, RenderPolicy] | None:
    """``pyisr.revalidate(path)`` for Django: the @isr view the URLconf gives ``key``."""
    from django.conf import settings
    from django.urls import Resolver404, get_urlconf, resolve

    if not settings.configured or (get_urlconf() or getattr(settings, "ROOT_URLCONF", None)) is None:
        return None  # no Django site in this process (another framework's path)
    script = _script.get("name", "")
    path = path_info_for(key, script)
    if path is None:
        return None
    try:
        match = resolve(path)
    except Resolver404:
        return None
    options = getattr(match.func, "__pyisr_isr__", None)
    if not isinstance(options, _Options) or options.engine not in (None, get_engine()):
        return None  # not an @isr view, or one caching in an engine of its own
    fresh = _fresh_request(path, script, options.origin_for(None), {})
    fresh.resolver_match = match
    resolved, policy = _key_and_policy(fresh, options.lifetime, options.tags)
    make = _async_render if inspect.iscoroutinefunction(options.view) else _sync_render
    return resolved, make(options, fresh, match.args, match.kwargs, FailedResponse()), policy


def _key_and_policy(request: Any, lifetime: Lifetime, tags: tuple[str, ...]) -> tuple[str, RenderPolicy]:
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
    return key, page_policy(key, pattern, lifetime, tags)


def _needs_render(response: Any) -> bool:
    return callable(getattr(response, "render", None)) and not getattr(response, "is_rendered", True)


def _rendered(response: Any, fresh: Any, failed: FailedResponse, body: bytes | None = None) -> Rendered:
    """A Django response as the engine's render result (template responses rendered)."""
    if _needs_render(response):
        response.render()
    if body is None:
        if getattr(response, "streaming", False):
            body = b"".join(bytes(chunk) for chunk in response.streaming_content)
        else:
            body = bytes(response.content)
    status = int(response.status_code)
    headers = list(response.items())
    headers += [("set-cookie", morsel.OutputString()) for morsel in response.cookies.values()]
    if status >= 500:
        failed.response = (status, headers, body)
    return Rendered(body, status=status, headers=headers, private=_private_reason(fresh))


def _no_store(response: Any) -> Any:
    """The view's own answer to its visitor, marked so no cache on the way keeps it."""
    response["Cache-Control"] = private_cache_control(response.get("Cache-Control"))
    return response


def _build(answer: PageAnswer) -> Any:
    from django.http import HttpResponse

    response = HttpResponse(answer.body, status=answer.status)
    headers = answer.text_headers()
    if not any(k.lower() == "content-type" for k, _ in headers):
        del response.headers["Content-Type"]
    for name, value in headers:
        response.headers[name] = value
    return response


__all__ = ["isr"]
