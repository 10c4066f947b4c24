"""The dashboard in a Django project: include these URLs where it should live::

    # urls.py
    path("_pyisr/", include("pyisr.integrations.django.dashboard_urls")),

    # settings.py
    PYISR = {..., "dashboard_secret": os.environ["PYISR_DASHBOARD_SECRET"]}

It serves the same views as the site server's ``/_pyisr/``, run on pyisr's sync bridge
(:func:`pyisr.runtime.run_sync`) over the engine ``@isr`` views use. The views do their
own CSRF check (a token bound to the dashboard's session), so Django's is not applied
to them. Without a secret (``PYISR["dashboard_secret"]``, else ``PYISR_DASHBOARD_SECRET``)
every path answers 404; a secret under 16 characters is ``ImproperlyConfigured``.
"""

from __future__ import annotations

import os
from http.cookies import SimpleCookie

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import re_path
from django.views.decorators.csrf import csrf_exempt

from pyisr.dashboard.views import Dashboard
from pyisr.dashboard.web import MAX_FORM_BYTES, DashboardRequest, DashboardResponse
from pyisr.runtime import run_sync

#: One dashboard per secret (settings may change under ``override_settings``).
_dashboards: dict[str, Dashboard] = {}


def _dashboard() -> Dashboard | None:
    pyisr_settings = getattr(settings, "PYISR", {})
    secret = (
        pyisr_settings.get("dashboard_secret") if isinstance(pyisr_settings, dict) else None
    ) or os.environ.get("PYISR_DASHBOARD_SECRET")
    if not secret:
        return None
    if secret not in _dashboards:
        try:
            _dashboards[secret] = Dashboard(secret=secret)
        except (ValueError, TypeError) as exc:
            raise ImproperlyConfigured(f"PYISR['dashboard_secret'] is refused: {exc}") from None
    return _dashboards[secret]


@csrf_exempt
def dashboard_view(request: HttpRequest, rest: str = "") -> HttpResponse:
    dashboard = _dashboard()
    if dashboard is None:
        raise Http404("the pyisr dashboard is off: set PYISR['dashboard_secret']")
    body = b""
    if request.method == "POST":
        if int(request.META.get("CONTENT_LENGTH") or 0) > MAX_FORM_BYTES:
            return HttpResponse("Payload Too Large", status=413, content_type="text/plain")
        body = request.body
    mount = request.path[: len(request.path) - len(rest)].rstrip("/")
    answer = run_sync(
        dashboard.handle(
            DashboardRequest(
                method=request.method or "GET",
                path="/" + rest,
                mount=mount,
                query=request.GET.dict(),
                headers={k.lower(): v for k, v in request.headers.items()},
                client=request.META.get("REMOTE_ADDR") or "unknown",
                host=request.META.get("HTTP_HOST", ""),
                secure=request.is_secure(),
                body=body,
                cookies=dict(request.COOKIES),
            )
        )
    )
    return _to_django(answer)


def _to_django(answer: DashboardResponse) -> HttpResponse:
    response = HttpResponse(answer.body, status=answer.status, content_type=answer.content_type)
    for name, value in answer.all_headers():
        if name == "set-cookie":  # Django keeps cookies apart, one Set-Cookie each
            cookie: SimpleCookie = SimpleCookie()
            cookie.load(value)
            response.cookies.update(cookie)
        elif name != "content-type":
            response.headers[name] = value
    return response


urlpatterns = [re_path(r"^(?P<rest>.*)$", dashboard_view, name="pyisr-dashboard")]
