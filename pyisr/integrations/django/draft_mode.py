"""Draft mode in a Django project: the cookie signed with ``PYISR['draft_secret']``.

A view that knows who asks (a staff member, a CMS's preview link) turns it on::

    @staff_member_required
    def preview(request):
        return enable_draft_mode(request, redirect(request.GET.get("next", "/")))

From then on every ``@isr`` page renders fresh for that browser, never stored, answered
``x-pyisr-cache: BYPASS``, until :func:`disable_draft_mode` or the cookie's expiry.
"""

from __future__ import annotations

from typing import Any

from pyisr import draft
from pyisr.integrations.django import conf


def _secret() -> str:
    settings = conf.get()
    if not settings.draft_mode or not settings.draft_secret:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(
            "draft mode needs a secret: set PYISR['draft_secret'] (or 'revalidate_secret')"
        )
    return settings.draft_secret


def enable_draft_mode(request: Any, response: Any, *, max_age: int = draft.DEFAULT_MAX_AGE) -> Any:
    """Set the draft cookie on ``response`` (``Secure`` when ``request`` came over HTTPS)."""
    return draft.enable_draft_mode(response, secret=_secret(), max_age=max_age, secure=request.is_secure())


def disable_draft_mode(response: Any) -> Any:
    """Remove the draft cookie."""
    return draft.disable_draft_mode(response)


def is_draft_mode(request: Any) -> bool:
    """Whether ``request`` carries a valid draft cookie (a template can show a banner)."""
    settings = conf.get()
    return bool(settings.draft_mode and draft.is_draft_request(request.COOKIES, settings.draft_secret))
