"""Granian's RSGI interface for :class:`~pyisr.server.app.App`.

Why a second interface: a cached page is one dictionary lookup and one write, so what
the server costs per request is most of the time. Under granian, RSGI hands the whole
response over in one call (``response_bytes``) instead of two ASGI messages built as
dictionaries, which measurably raises the requests per second of the fast path
(bench/README.md has the numbers). Everything that is not a fast-path answer goes
through the same ASGI application, translated here, so both interfaces serve the same
site the same way, with one difference RSGI imposes: granian gives the application an
already-decoded path, so an encoded slash (``%2F``) separates segments like ``/`` and a
literal ``%25`` followed by two letters that are not hex digits reads as malformed.

It is also where a retiring granian worker drains (:func:`start_draining`): granian
closes a keep-alive connection after a response that says ``Connection: close``, so
answering every request that way lets each client leave the old worker between two
requests, not in the middle of one.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import quote

from starlette.types import ASGIApp

logger = logging.getLogger("pyisr.server")

#: Characters left as they are when the decoded path is encoded again for ASGI's raw_path;
#: ``%`` too, see :func:`raw_path`.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_PERCENT_ESCAPE = re.compile(r"%(?=[0-9A-Fa-f]{2})")


class Drain:
    """A retiring worker's state: answering ``Connection: close``, and its last request."""

    def __init__(self) -> None:
        self.active = False
        self.last_request = 0.0
        self.in_flight = 0


#: This process's drain (one App per granian worker process).
DRAIN = Drain()
_CLOSE = ("connection", "close")


def start_draining(app: Any) -> None:
    """From now on every answer of ``app`` says ``Connection: close``.

    The fast path answers hot pages before this module sees them, so it is emptied and
    turned off: a retiring worker's last requests take the full path (microseconds more,
    for the second or so a retirement lasts).
    """
    DRAIN.active = True
    DRAIN.last_request = time.monotonic()
    fast = app.fast
    fast.enabled = False
    fast.forget_all()


def raw_path(path: str) -> bytes:
    """Encode granian's decoded path again, as ASGI's ``raw_path``.

    A ``%`` that starts a valid escape was a ``%25`` and is encoded again; any other was
    left as it came by granian's decoding: a malformed escape such as ``%ZZ``, which must
    stay malformed so the request gets its 400 (SPEC S-27). (A literal ``%25ZZ`` is
    therefore answered 400 under RSGI too: the two cannot be told apart.)
    """
    return quote(_PERCENT_ESCAPE.sub("%25", path), safe=_PATH_SAFE).encode("ascii")


def _address(text: str | None) -> tuple[str, int] | None:
    """``"127.0.0.1:8000"`` or ``"[::1]:8000"`` -> ASGI's ``(host, port)``."""
    if not text:
        return None
    host, _, port = text.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


def asgi_scope(scope: Any) -> dict[str, Any]:
    """The ASGI HTTP scope of an RSGI request."""
    path = scope.path
    query = scope.query_string
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": scope.http_version,
        "method": scope.method,
        "scheme": scope.scheme,
        "path": path,
        "raw_path": raw_path(path),
        "query_string": query.encode("latin-1"),
        "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in scope.headers.items()],
        "client": _address(scope.client),
        "server": _address(scope.server),
        "state": {},
    }


async def call_asgi(app: ASGIApp, scope: Any, proto: Any) -> None:
    """Run the ASGI application for one RSGI request and answer with what it sends."""
    body_read = False
    status = 500
    headers: list[tuple[str, str]] = []
    started = finished = False
    stream: Any = None

    async def receive() -> dict[str, Any]:
        nonlocal body_read
        if body_read:
            await proto.client_disconnect()
            return {"type": "http.disconnect"}
        body_read = True
        return {"type": "http.request", "body": await proto(), "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status, headers, started, finished, stream
        kind = message["type"]
        if kind == "http.response.start":
            status = message["status"]
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", ())]
            if DRAIN.active:
                headers.append(_CLOSE)
            started = True
        elif kind == "http.response.body" and started and not finished:
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if stream is None and not more:
                proto.response_bytes(status, headers, body)
                finished = True
                return
            if stream is None:
                stream = proto.response_stream(status, headers)
            if body:
                await stream.send_bytes(body)
            finished = not more

    try:
        await app(asgi_scope(scope), receive, send)
    except Exception as exc:  # noqa: BLE001 - the server must still answer
        logger.error("%s %s failed: %s: %s", scope.method, scope.path, type(exc).__name__, exc, exc_info=exc)
        if not started:
            plain = [("content-type", "text/plain; charset=utf-8")]
            if DRAIN.active:
                plain.append(_CLOSE)
            proto.response_bytes(500, plain, b"Internal Server Error")
        return
    if started and stream is None and not finished:
        proto.response_bytes(status, headers, b"")


async def serve(app: ASGIApp, scope: Any, proto: Any) -> None:
    """An RSGI request the fast path did not answer (``App.__rsgi__`` tried it first).

    The app starts itself on its first request if ``__rsgi_init__`` has not.
    """
    if scope.proto != "http":
        proto.close(403)  # websockets: pyisr serves none
        return
    if not DRAIN.active:
        await call_asgi(app, scope, proto)
        return
    DRAIN.in_flight += 1
    DRAIN.last_request = time.monotonic()
    try:
        await call_asgi(app, scope, proto)
    finally:
        DRAIN.in_flight -= 1
        DRAIN.last_request = time.monotonic()
