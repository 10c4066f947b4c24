"""Django responses in and out of the engine.

In: a view's response (or the exception it raised) becomes a :class:`Rendered`.
``Http404``, ``ObjectDoesNotExist``, ``PermissionDenied``, ``SuspiciousOperation`` and
``BadRequest`` are answers, not failures: they become the project's own 404/403/400
pages (``response_for_exception``, so ``handler404`` and ``404.html`` apply). A 404 is
cached like any page (Next.js' ``notFound``), so a deleted object's page answers 404 as
soon as its tags are revalidated; a 400, 401 or 403 (raised or returned) is answered and
never stored. Any other exception, or a 5xx, is a failed render: the last good page stays.

Out: a :class:`PageAnswer` becomes an ``HttpResponse`` with pyisr's headers.
"""

from __future__ import annotations

from typing import Any

from pyisr.http import private_cache_control
from pyisr.integrations import SESSION_REASON, FailedResponse, PageAnswer
from pyisr.render import Rendered

#: Why a render that used the CSRF token is not shared, as the warning says it.
CSRF_REASON = (
    "uses the CSRF token ({% csrf_token %} or get_token(); move the form to an uncached view, "
    "or fetch the token separately)"
)

#: Statuses never stored: the anonymous render was refused, so the page is not public.
UNCACHED_STATUSES = frozenset({400, 401, 403})


def private_reason(fresh: Any) -> str | None:
    """What the render did that makes its page its visitor's own, if anything."""
    meta = fresh.META
    if "CSRF_COOKIE" in meta or meta.get("CSRF_COOKIE_NEEDS_UPDATE") or meta.get("CSRF_COOKIE_USED"):
        return CSRF_REASON
    session = getattr(fresh, "session", None)
    if getattr(session, "accessed", False) or getattr(session, "modified", False):
        return SESSION_REASON
    return None


def answered_exception(exc: BaseException) -> BaseException | None:
    """The exception Django answers for ``exc`` (404, 403, 400), or ``None`` for a failure."""
    from django.core.exceptions import (
        BadRequest,
        ObjectDoesNotExist,
        PermissionDenied,
        SuspiciousOperation,
    )
    from django.http import Http404

    if isinstance(exc, Http404 | PermissionDenied | SuspiciousOperation | BadRequest):
        return exc
    if isinstance(exc, ObjectDoesNotExist):
        # ``Post.objects.get()`` in a view is a missing page, as get_object_or_404 says.
        not_found = Http404(str(exc))
        not_found.__cause__ = exc
        return not_found
    return None


def exception_response(fresh: Any, exc: BaseException) -> Any:
    """The project's own response for an answered exception (its handler404/403/400)."""
    from django.core.handlers.exception import response_for_exception

    return response_for_exception(fresh, exc)


def needs_render(response: Any) -> bool:
    return callable(getattr(response, "render", None)) and not getattr(response, "is_rendered", True)


def rendered(response: Any, fresh: Any, failed: FailedResponse, body: bytes | None = None) -> Rendered:
    """A Django response as the engine's render result (template responses rendered)."""
    if needs_render(response):
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
    result = Rendered(body, status=status, headers=headers, private=private_reason(fresh))
    if status in UNCACHED_STATUSES:
        result.revalidate = 0  # answered to whoever asked, never stored
    return result


def no_store(response: Any) -> Any:
    """The view's own answer to its visitor, marked so no cache on the way keeps it."""
    response["Cache-Control"] = private_cache_control(response.get("Cache-Control"))
    return response


def bypassed(response: Any, headers: tuple[tuple[str, str], ...]) -> Any:
    """The view's own answer to a bypassed visitor, with pyisr's BYPASS headers."""
    for name, value in headers:
        response[name] = value
    return response


def build(answer: PageAnswer) -> Any:
    """An ``HttpResponse`` for what the engine answered."""
    from django.http import HttpResponse

    response = HttpResponse(answer.body, status=answer.status)
    headers = answer.text_headers()
    if not any(k.lower() == "content-type" for k, _ in headers):
        del response.headers["Content-Type"]
    for name, value in headers:
        response.headers[name] = value
    return response
