"""The request and response the dashboard's views speak, whatever framework carries them.

The site server and Starlette/FastAPI hand the dashboard an ASGI request
(:mod:`pyisr.dashboard.app`), Django and Flask their own (``dashboard_urls``,
``flask_dashboard``); each turns it into a :class:`DashboardRequest` and sends back the
:class:`DashboardResponse`, so the views, the sign-in and the security headers exist once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

#: The largest form body read (a path or a tag needs far less).
MAX_FORM_BYTES = 16 * 1024

#: What every dashboard response carries: never cached, never framed, scripts and styles
#: from the dashboard's own files only (no inline script, so an injected one cannot run).
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("cache-control", "no-store"),
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "same-origin"),
    ("x-content-type-options", "nosniff"),
)


@dataclass
class DashboardRequest:
    """One request, relative to where the dashboard is mounted.

    ``path`` is what follows the mount (``/``, ``/entries``, ``/entry``); ``mount`` the
    path the dashboard lives at (``/_pyisr``), which its links and its cookie's ``Path``
    use; ``host`` the ``Host`` header; ``client`` the peer's address.
    """

    method: str
    path: str
    mount: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # lower-case names
    client: str
    host: str
    secure: bool
    body: bytes = b""
    cookies: Mapping[str, str] = field(default_factory=dict)

    def form(self) -> dict[str, str]:
        """The URL-encoded form of a POST (the last value of a repeated field)."""
        if not self.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return {}
        return dict(parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True))


@dataclass
class DashboardResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def all_headers(self) -> list[tuple[str, str]]:
        """Every header to send: the content type, the view's own, the security headers."""
        return [("content-type", self.content_type), *self.headers, *SECURITY_HEADERS]


def parse_cookies(header: str) -> dict[str, str]:
    """``name=value; ...`` (not ``SimpleCookie``: it stops at the first cookie it dislikes,
    and another app's cookie on the same host must not hide ours)."""
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in cookies:
            cookies[name] = value.strip().strip('"')
    return cookies


def set_cookie(name: str, value: str, *, path: str, max_age: int, secure: bool) -> tuple[str, str]:
    """A ``Set-Cookie`` header: HttpOnly and SameSite=Strict always; Secure over https."""
    parts = [f"{name}={value}", f"Path={path}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return ("set-cookie", "; ".join(parts))
