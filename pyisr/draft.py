"""Draft mode: an editor sees pages rendered fresh, never the cached copy, and never stores one.

As Next.js' ``draftMode()``: something that knows a secret (a CMS's preview link to
``/_pyisr/draft?secret=…&path=…`` on the site server, or a view of the app calling
:func:`enable_draft_mode`) sets a cookie; every request carrying a valid one bypasses
the cache (``x-pyisr-cache: BYPASS``, no-store), in the site server and in every
integration.

The cookie is ``<expiry>.<HMAC-SHA256(secret, expiry)>``: nobody without the secret
can make one, and a stolen one stops working at its expiry. Checking it costs one HMAC,
paid only by requests that carry the cookie at all.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

#: The cookie's name (``__prerender_bypass`` in Next.js).
COOKIE = "__pyisr_draft"
#: How long draft mode lasts once enabled, unless told otherwise.
DEFAULT_MAX_AGE = 3600
_CONTEXT = b"pyisr draft mode v1:"


class DraftSecretMissing(RuntimeError):
    """Draft mode needs a secret and none was given or configured."""


def draft_secret(explicit: str | bytes | None = None) -> bytes:
    """The secret that signs draft cookies: ``explicit``, else ``PYISR_DRAFT_SECRET``, else
    ``PYISR_REVALIDATE_SECRET`` (whoever may revalidate may preview)."""
    value = explicit or os.environ.get("PYISR_DRAFT_SECRET") or os.environ.get("PYISR_REVALIDATE_SECRET")
    if not value:
        raise DraftSecretMissing(
            "draft mode needs a secret: set PYISR_DRAFT_SECRET (or PYISR_REVALIDATE_SECRET), "
            "or pass secret= explicitly"
        )
    return value.encode() if isinstance(value, str) else value


def _signature(secret: bytes, expiry: str) -> str:
    return hmac.new(secret, _CONTEXT + expiry.encode(), hashlib.sha256).hexdigest()


def draft_cookie_value(
    secret: str | bytes | None = None, *, max_age: int = DEFAULT_MAX_AGE, now: Callable[[], float] = time.time
) -> str:
    """A cookie value that turns draft mode on until ``max_age`` seconds from now."""
    if max_age <= 0:
        raise ValueError(f"draft mode max_age must be > 0 seconds, not {max_age!r}")
    expiry = str(int(now()) + int(max_age))
    return f"{expiry}.{_signature(draft_secret(secret), expiry)}"


def is_valid(
    value: str | None, secret: str | bytes | None = None, *, now: Callable[[], float] = time.time
) -> bool:
    """Whether a draft cookie value was made with the secret and has not expired.

    False (never an exception) for anything else, a missing secret included: a request
    can never turn draft mode on by itself.
    """
    if not value or "." not in value:
        return False
    expiry, _, signature = value.partition(".")
    if not expiry.isdigit() or int(expiry) <= now():
        return False
    try:
        expected = _signature(draft_secret(secret), expiry)
    except DraftSecretMissing:
        return False
    return hmac.compare_digest(expected, signature)


def cookie_from_header(cookie_header: str | None) -> str | None:
    """The draft cookie's value in a raw ``Cookie`` header (``None`` when absent)."""
    if not cookie_header or COOKIE not in cookie_header:
        return None
    for part in cookie_header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value.strip().strip('"')
    return None


def is_draft_request(cookies: Mapping[str, str] | str | None, secret: str | bytes | None = None) -> bool:
    """Whether a request is in draft mode: its cookies (a mapping, or the raw header) hold
    a valid draft cookie."""
    if cookies is None:
        return False
    value = cookie_from_header(cookies) if isinstance(cookies, str) else cookies.get(COOKIE)
    return is_valid(value, secret)


def enable_draft_mode(
    response: Any, *, secret: str | bytes | None = None, max_age: int = DEFAULT_MAX_AGE, secure: bool = True
) -> Any:
    """Set the draft cookie on a Django, Flask or Starlette response (any with ``set_cookie``).

    Call it only after checking who asks (a CMS's secret, a logged-in editor): anyone
    with the cookie sees unpublished renders. ``secure=False`` for plain-HTTP development.
    """
    response.set_cookie(
        COOKIE,
        draft_cookie_value(secret, max_age=max_age),
        max_age=max_age,
        httponly=True,
        secure=secure,
        samesite="lax",
        path="/",
    )
    return response


def disable_draft_mode(response: Any) -> Any:
    """Remove the draft cookie (any response with ``delete_cookie``)."""
    response.delete_cookie(COOKIE, path="/")
    return response
