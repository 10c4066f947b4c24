"""The dashboard as an ASGI app: what the site server routes ``/_pyisr/`` to, and what a
Starlette or FastAPI app mounts::

    app.mount("/_pyisr", dashboard_app(secret=os.environ["PYISR_DASHBOARD_SECRET"]))

With no secret it answers 404 to everything, as if it were not there.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from pyisr.dashboard.views import Dashboard, EngineSource
from pyisr.dashboard.web import MAX_FORM_BYTES, DashboardRequest, DashboardResponse, parse_cookies

_NOT_FOUND = DashboardResponse(404, b"Not Found", "text/plain; charset=utf-8")
_TOO_LARGE = DashboardResponse(413, b"Payload Too Large", "text/plain; charset=utf-8")


class DashboardApp:
    """An ASGI app serving :class:`~pyisr.dashboard.views.Dashboard` below ``mount_path``."""

    def __init__(self, dashboard: Dashboard | None, mount_path: str) -> None:
        self.dashboard = dashboard
        self.mount_path = mount_path.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if self.dashboard is None:
            await _send(_NOT_FOUND, send)
            return
        path = scope["path"]
        for prefix in (self.mount_path, scope.get("root_path", "")):
            if prefix and (path == prefix or path.startswith(prefix + "/")):
                path = path[len(prefix) :]
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = b""
        if scope["method"] == "POST":
            read = await _read_body(receive, MAX_FORM_BYTES)
            if read is None:
                await _send(_TOO_LARGE, send)
                return
            body = read
        client = scope.get("client")
        forwarded_proto = headers.get("x-forwarded-proto", "")
        request = DashboardRequest(
            method=scope["method"],
            path=path or "/",
            mount=self.mount_path,
            query=_query(scope.get("query_string", b"")),
            headers=headers,
            client=client[0] if client else "unknown",
            host=headers.get("host", ""),
            # Only ever adds the cookie's Secure flag: trusting the proxy's word costs nothing.
            secure=scope.get("scheme") == "https" or forwarded_proto == "https",
            body=body,
            cookies=parse_cookies(headers.get("cookie", "")),
        )
        await _send(await self.dashboard.handle(request), send)


def dashboard_app(
    engine: EngineSource = None,
    *,
    secret: str | None,
    mount_path: str = "/_pyisr",
    secure: bool | None = None,
) -> DashboardApp:
    """The dashboard as an ASGI app mounted at ``mount_path``; off (404) without a secret.

    ``engine`` defaults to pyisr's process engine (looked up per request); ``secure``
    forces the session cookie's ``Secure`` flag on or off (default: on over https). A
    secret shorter than 16 characters is refused with ``ValueError``.
    """
    dashboard = Dashboard(engine, secret=secret, secure=secure) if secret else None
    return DashboardApp(dashboard, mount_path)


def _query(raw: bytes) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send(response: DashboardResponse, send: Send) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.all_headers()]
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})
