"""The request a shared render sees: built from nothing, never a copy of a visitor's.

One render is served to every visitor, so the view is called with a GET for the path
and nothing else of the visitor: no query string, cookies, ``REMOTE_ADDR``, session,
user, CSRF data or attribute a middleware set. Its host is the canonical one
(``pyisr.origin``); its language is the page's (``i18n``), since the language is part
of the page's URL or key.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from importlib import import_module
from typing import Any

from pyisr.integrations.django import conf
from pyisr.origin import CanonicalOrigin, Origin

#: The script prefix (``SCRIPT_NAME``) the site is mounted at, from the server's config as
#: the last request carried it: ``revalidate(path)`` strips it from page keys.
_script: dict[str, str] = {}


def remember_script(request: Any) -> None:
    _script["name"] = request.META.get("SCRIPT_NAME", "")


def script_name() -> str:
    return _script.get("name", "")


def allowed_hosts() -> list[str]:
    """``PYISR['allowed_hosts']``, else Django's ``ALLOWED_HOSTS``."""
    from django.conf import settings

    own = conf.get().allowed_hosts
    return list(own) if own is not None else list(getattr(settings, "ALLOWED_HOSTS", ()))


def origin_for(origin: CanonicalOrigin, request: Any | None) -> Origin:
    """The canonical origin, or the request's host when the allowed hosts vouch for it."""
    if request is None:
        return origin.default(allowed_hosts())
    return origin.for_request(request.scheme, request.META.get("HTTP_HOST"), allowed_hosts())


def fresh_request(
    path_info: str, script: str, origin: Origin, headers: dict[str, str], language: str | None = None
) -> Any:
    """A GET for ``path_info`` from no one, with an anonymous user and an empty session.

    Only the given ``HTTP_*`` headers are set; middleware does not run for it.
    ``LANGUAGE_CODE`` is set (to the page's language) only when ``LocaleMiddleware`` is
    installed, as it would be for a visitor.
    """
    from django.apps import apps
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIRequest

    request = WSGIRequest(
        {
            **headers,
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": script,
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
    if language is not None:
        request.LANGUAGE_CODE = language
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


def shared_request(
    request: Any, origin: CanonicalOrigin, allowed: Iterable[str], language: str | None
) -> Any:
    """The request a shared render of ``request``'s page sees (see :func:`fresh_request`)."""
    names = frozenset(allowed)
    meta = request.META
    headers = {
        k: v
        for k, v in meta.items()
        if k.startswith("HTTP_") and k != "HTTP_HOST" and k[5:].replace("_", "-").lower() in names
    }
    fresh = fresh_request(
        request.path_info, meta.get("SCRIPT_NAME", ""), origin_for(origin, request), headers, language
    )
    fresh.resolver_match = getattr(request, "resolver_match", None)
    return fresh
