"""``pyisr.revalidate(path)`` for Django: the ``@isr`` view the URLconf serves at a path.

Keys carry no trailing slash while Django's URLs usually do (``APPEND_SLASH``), so the
path is resolved as given and, failing that, with a slash: ``revalidate("/blog/2/")``
and ``revalidate("/blog/2")`` both regenerate the page served at ``/blog/2/``. A path
under ``i18n_patterns`` is resolved and rendered in its prefix's language; a language
variant's key (``/~fr/blog/2``) in that language.
"""

from __future__ import annotations

import contextlib
from typing import Any

from pyisr.engine import RenderPolicy
from pyisr.integrations import FailedResponse, path_info_for
from pyisr.integrations.django.i18n import language_for_path, split_variant, uses_locale_middleware
from pyisr.integrations.django.page import key_and_policy
from pyisr.integrations.django.render import Call, Options, make_render
from pyisr.integrations.django.shared_request import fresh_request, origin_for, script_name
from pyisr.runtime import get_engine


def match_path(path: str, language: str | None) -> tuple[Any, str] | None:
    """The URLconf's match for ``path`` (or ``path/``) in ``language``, and the path matched."""
    from django.urls import Resolver404, resolve
    from django.utils import translation

    candidates = [path] if path.endswith("/") else [path, path + "/"]
    scope = translation.override(language) if language else contextlib.nullcontext()
    with scope:
        for candidate in candidates:
            try:
                return resolve(candidate), candidate
            except Resolver404:
                continue
    return None


async def resolve_page(key: str) -> tuple[str, Any, RenderPolicy] | None:
    """What ``revalidate(key)`` renders: the key, render and policy of an @isr view's page."""
    from django.conf import settings
    from django.urls import get_urlconf

    if not settings.configured or (get_urlconf() or getattr(settings, "ROOT_URLCONF", None)) is None:
        return None  # no Django site in this process (another framework's path)
    plain, variant = split_variant(key)
    script = script_name()
    path = path_info_for(plain, script)
    if path is None:
        return None
    language = variant or language_for_path(path)
    found = match_path(path, language)
    if found is None:
        return None
    match, path = found
    options = getattr(match.func, "__pyisr_isr__", None)
    if not isinstance(options, Options) or options.engine not in (None, get_engine()):
        return None  # not an @isr view, or one caching in an engine of its own
    own_language = language if uses_locale_middleware() else None
    fresh = fresh_request(path, script, origin_for(options.origin_now(), None), {}, own_language)
    fresh.resolver_match = match
    resolved, policy = key_and_policy(fresh, options, variant)
    call = Call(options, fresh, tuple(match.args), dict(match.kwargs), FailedResponse(), language)
    return resolved, make_render(call), policy
