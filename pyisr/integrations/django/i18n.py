"""The language of a shared render, and when the language is part of the page's key.

- ``i18n_patterns``: the language is in the URL (``/fr/blog/2/``), so in the key; the
  render activates the URL's language, as ``LocaleMiddleware`` would.
- ``LocaleMiddleware`` without a prefix (the language comes from the visitor's cookie or
  ``Accept-Language``): each language is its own page. The default language's page is
  keyed by its path; another language's by the path under ``/~<language>`` (``/~fr/blog/2``),
  carrying the path's tags too, so ``revalidate_path("/blog/2")`` and ``revalidate("/blog/2")``
  reach every language.
- Neither: the render runs in ``LANGUAGE_CODE``, the language Django itself would use.
"""

from __future__ import annotations

from typing import Any

#: Where a page's language variants live: ``/~fr`` + the path.
VARIANT_PREFIX = "/~"
LOCALE_MIDDLEWARE = "django.middleware.locale.LocaleMiddleware"


def uses_locale_middleware() -> bool:
    from django.conf import settings

    return LOCALE_MIDDLEWARE in getattr(settings, "MIDDLEWARE", ())


def default_language() -> str:
    """``LANGUAGE_CODE`` as ``LocaleMiddleware`` would activate it."""
    from django.conf import settings
    from django.utils.translation import get_supported_language_variant

    try:
        return str(get_supported_language_variant(settings.LANGUAGE_CODE))
    except LookupError:
        return str(settings.LANGUAGE_CODE)


def _language_in_path(path: str, urlconf: Any) -> str | None:
    """The language prefix of ``path``, when the URLconf uses ``i18n_patterns`` at all
    (asked first: it is memoised, the prefix lookup is not, and this runs per request)."""
    from django.conf.urls.i18n import is_language_prefix_patterns_used
    from django.utils.translation import get_language_from_path

    if urlconf is None or not is_language_prefix_patterns_used(urlconf)[0]:
        return None
    return get_language_from_path(path)


def page_language(request: Any) -> tuple[str | None, bool]:
    """The language a shared render of ``request``'s page runs in, and whether the key
    must name it (``None``: Django's default, nothing to activate)."""
    from django.conf import settings

    if not getattr(settings, "USE_I18N", True):
        return None, False
    urlconf = getattr(request, "urlconf", None) or settings.ROOT_URLCONF
    from_path = _language_in_path(request.path_info, urlconf)
    if from_path:
        return from_path, False
    if not uses_locale_middleware():
        return None, False
    language = getattr(request, "LANGUAGE_CODE", None) or default_language()
    return language, language != default_language()


def language_for_path(path: str) -> str | None:
    """The language to resolve and render ``path`` in for ``revalidate(path)``."""
    from django.conf import settings
    from django.urls import get_urlconf

    if not getattr(settings, "USE_I18N", True):
        return None
    from_path = _language_in_path(path, get_urlconf() or settings.ROOT_URLCONF)
    return from_path or (default_language() if uses_locale_middleware() else None)


def variant_key(key: str, language: str) -> str:
    """The key of ``key``'s page in ``language`` (not the default one)."""
    return VARIANT_PREFIX + language + (key if key != "/" else "")


def split_variant(key: str) -> tuple[str, str | None]:
    """``/~fr/blog/2`` -> ``("/blog/2", "fr")``; any other key -> ``(key, None)``."""
    from django.conf import settings

    if not key.startswith(VARIANT_PREFIX) or not getattr(settings, "USE_I18N", True):
        return key, None
    language, _, rest = key[len(VARIANT_PREFIX) :].partition("/")
    known = {code.lower() for code, _name in getattr(settings, "LANGUAGES", ())}
    if language.lower() not in known:
        return key, None
    return "/" + rest, language
