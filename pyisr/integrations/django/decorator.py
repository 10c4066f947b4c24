"""``@isr``: a Django view's GET and HEAD answered from the cache.

The wrappers are the one flow every integration shares (``pyisr.integrations.serve_page``)
plus what is Django's own: who bypasses the cache (logged-in users, draft mode), the
page's language, and, for sync views, the render in the waiting request's thread.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from pyisr.app_builds import begin_serving
from pyisr.draft import is_draft_request
from pyisr.engine import Engine
from pyisr.integrations import (
    BYPASS_HEADERS,
    DEFAULT_ALLOW_HEADERS,
    FailedResponse,
    allow_list,
    cacheable,
    check_options,
    on_bridge,
    serve_page,
)
from pyisr.integrations.django import conf
from pyisr.integrations.django.i18n import page_language, uses_locale_middleware
from pyisr.integrations.django.invalidation import remember_engine
from pyisr.integrations.django.page import key_and_policy
from pyisr.integrations.django.render import DEFAULT, Call, Options, View, make_render
from pyisr.integrations.django.request_thread import RequestThread
from pyisr.integrations.django.resolver import resolve_page
from pyisr.integrations.django.responses import build, bypassed, no_store
from pyisr.integrations.django.shared_request import remember_script, shared_request
from pyisr.lifetimes import validate_expire
from pyisr.origin import CanonicalOrigin


def isr(
    revalidate: object = DEFAULT,
    *,
    expire: int | None = None,
    tags: Iterable[str] | None = None,
    engine: Engine | None = None,
    allow_headers: Iterable[str] = DEFAULT_ALLOW_HEADERS,
    site_url: str | None = None,
    bypass: Callable[[Any], bool] | None = DEFAULT,
    orm_tags: bool | None = None,
) -> Callable[[View], View]:
    """Cache a Django view's GET/HEAD responses with ISR (sync or async, function or
    ``MyView.as_view()``).

    ``revalidate``: seconds, ``False`` (until invalidated), a profile name (``"hours"``)
    or ``0`` (never cached); default ``PYISR['revalidate']``, else ``False``. ``expire``:
    seconds after which a page is never served. ``tags``: explicit tags for
    ``revalidate_tag``. Each page also carries its path's implicit tags, its route
    pattern's for ``path()`` routes, and the ORM tags of what it read (``orm_tags=False``
    turns those off for this view). ``bypass``: a callable of the request; ``True`` means
    this visitor gets a fresh render of their own, never stored (default
    ``PYISR['bypass']``: logged-in users); draft mode always bypasses.

    One render is served to everyone, so the view gets a request built from nothing (see
    :mod:`pyisr.integrations.django.shared_request`); a render that sets a cookie, uses the
    CSRF token or touches the session is never stored. ``Http404`` and ``DoesNotExist``
    answer (and cache) the project's 404 page; ``PermissionDenied`` and bad requests
    answer 403/400, never stored; other exceptions and 5xx are failed renders.
    """
    if revalidate is DEFAULT:
        validate_expire(expire, where="@isr")
        lifetime, tag_tuple = None, check_options(False, tags, "@isr")[1]
    else:
        lifetime, tag_tuple = check_options(revalidate, tags, "@isr", expire)
    if bypass is not DEFAULT and bypass is not None and not callable(bypass):
        raise TypeError(f"@isr bypass must be a callable of the request or None, not {bypass!r}")
    allowed = allow_list(allow_headers)
    origin = CanonicalOrigin(site_url, where="@isr site_url") if site_url is not None else None
    if engine is not None:
        remember_engine(engine)

    def decorate(view: View) -> View:
        from asgiref.sync import iscoroutinefunction

        _refuse_bound_dispatch(view)
        # revalidate(path) can reach this view now (and from every engine it later serves with).
        (engine if engine is not None else _default_engine()).add_resolver(resolve_page)
        options = Options(
            view=view,
            is_async=iscoroutinefunction(view),
            lifetime=lifetime,
            expire=expire,
            tags=tag_tuple,
            engine=engine,
            allowed=allowed,
            origin=origin,
            bypass=bypass,
            orm_tags=orm_tags,
        )
        wrapper = _async_wrapper(options) if options.is_async else _sync_wrapper(options)
        wrapper.__pyisr_isr__ = options  # type: ignore[attr-defined]
        return wrapper

    return decorate


def _default_engine() -> Engine:
    from pyisr.runtime import get_engine

    return get_engine()


def _refuse_bound_dispatch(view: View) -> None:
    """``method_decorator(isr(...), name="dispatch")`` would render with the visitor's view
    instance (``self.request`` is the visitor's): refuse it and say what works."""
    bound = getattr(getattr(view, "func", None), "__self__", None)
    if bound is None:
        return
    from django.views import View as DjangoView

    if isinstance(bound, DjangoView):
        raise TypeError(
            "@isr cannot decorate a class-based view's dispatch() (method_decorator): the page "
            "would be rendered with the visitor's view instance. Use ISRMixin, or wrap the view "
            "in the URLconf: path('blog/<int:pk>/', isr(revalidate=60)(PostView.as_view()))"
        )


class _Page:
    """What one cached GET needs: engine, key, policy, the shared render's call."""

    __slots__ = ("engine", "key", "policy", "call")

    def __init__(self, request: Any, options: Options, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        remember_script(request)
        self.engine = options.engine_now()
        self.engine.add_resolver(resolve_page)
        begin_serving(self.engine)
        language, in_key = page_language(request)
        variant = language if in_key else None
        self.key, self.policy = key_and_policy(request, options, variant)
        own = language if uses_locale_middleware() else None
        fresh = shared_request(request, options.origin_now(), options.allowed, own)
        self.call = Call(options, fresh, args, kwargs, FailedResponse(), language)


def _is_bypassed(request: Any, options: Options, settings: conf.ISRSettings) -> bool:
    """Draft mode (a cookie signed with the project's secret), or the view's bypass rule."""
    if settings.draft_mode and is_draft_request(request.COOKIES, settings.draft_secret):
        return True
    rule = settings.bypass if options.bypass is DEFAULT else options.bypass
    return rule is not None and bool(rule(request))


async def _ais_bypassed(request: Any, options: Options, settings: conf.ISRSettings) -> bool:
    """:func:`_is_bypassed` from async code: the rule may read the session (a sync query)."""
    if settings.draft_mode and is_draft_request(request.COOKIES, settings.draft_secret):
        return True
    rule = settings.bypass if options.bypass is DEFAULT else options.bypass
    if rule is None:
        return False
    from asgiref.sync import sync_to_async

    return bool(await sync_to_async(rule)(request))


def _conditions(request: Any) -> dict[str, Any]:
    return {
        "if_none_match": request.headers.get("If-None-Match"),
        "head": request.method == "HEAD",
        "accept_encoding": request.headers.get("Accept-Encoding"),
    }


def _sync_wrapper(options: Options) -> View:
    view = options.view

    @functools.wraps(view)
    def wrapper(request: Any, *args: Any, **kwargs: Any) -> Any:
        if not cacheable(request.method, request.path):
            return view(request, *args, **kwargs)
        settings = conf.checked()
        if _is_bypassed(request, options, settings):
            return bypassed(view(request, *args, **kwargs), BYPASS_HEADERS)
        page = _Page(request, options, args, kwargs)
        caller = RequestThread()
        render = make_render(page.call, caller)
        flow = serve_page(
            page.engine, page.key, render, page.policy, page.call.failed, **_conditions(request)
        )
        answer = caller.run(flow)
        if answer is None:  # the page belongs to its visitor: the view answers them itself
            return no_store(view(request, *args, **kwargs))
        return build(answer)

    return wrapper


def _async_wrapper(options: Options) -> View:
    view = options.view

    @functools.wraps(view)
    async def wrapper(request: Any, *args: Any, **kwargs: Any) -> Any:
        if not cacheable(request.method, request.path):
            return await view(request, *args, **kwargs)
        settings = conf.checked()
        if await _ais_bypassed(request, options, settings):
            return bypassed(await view(request, *args, **kwargs), BYPASS_HEADERS)
        page = _Page(request, options, args, kwargs)
        render = make_render(page.call)
        flow = serve_page(
            page.engine, page.key, render, page.policy, page.call.failed, **_conditions(request)
        )
        answer = await on_bridge(flow)
        if answer is None:  # the page belongs to its visitor: the view answers them itself
            return no_store(await view(request, *args, **kwargs))
        return build(answer)

    return wrapper
