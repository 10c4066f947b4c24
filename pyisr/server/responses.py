"""Sending a whole response, and the error pages every part of the server answers with."""

from __future__ import annotations

from starlette.types import Send

from pyisr.http import HTML, NOSTORE, Headers
from pyisr.site.route import DEFAULT_404, DEFAULT_500
from pyisr.site.templates import has_template, render_template


async def send_response(send: Send, status: int, headers: Headers, body: bytes, method: str) -> None:
    """One response with its ``Content-Length``; a HEAD request gets no body."""
    headers = headers + [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


async def send_not_found(send: Send, method: str) -> None:
    """The site's ``404.html``, or a plain one; never cached by anyone."""
    body = render_template("404.html") if has_template("404.html") else DEFAULT_404
    headers = [(b"content-type", HTML.encode()), (b"cache-control", NOSTORE.encode())]
    await send_response(send, 404, headers, body.encode(), method)


async def send_server_error(send: Send, method: str) -> None:
    """The site's ``500.html``, or a plain one (also when the site's own page fails)."""
    try:
        body = render_template("500.html") if has_template("500.html") else DEFAULT_500
    except Exception:  # noqa: BLE001 - a broken error page must not hide the error
        body = DEFAULT_500
    headers = [(b"content-type", HTML.encode()), (b"cache-control", NOSTORE.encode())]
    await send_response(send, 500, headers, body.encode(), method)
