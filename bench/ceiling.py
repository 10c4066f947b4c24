"""The ceiling for a cached page in Python: an app answering one fixed ~1.5 KB page.

No routing, no cache, no logic, but the same response on the wire as pyisr's HIT
(the same headers, ``Age`` included): what uvicorn (ASGI, ``app``) or granian (RSGI,
``rsgi_app``, the interface ``pyisr start --server granian`` uses) alone can do per
second on this machine. ``hit`` runs it beside pyisr so the gap shows in one run.
"""

from __future__ import annotations

import time
from typing import Any

from bench.sites import page_html

BODY = page_html("Post 1").encode()
HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"s-maxage=3600, stale-while-revalidate=31532400"),
    (b"x-pyisr-cache", b"HIT"),
    (b"cache-status", b"pyisr; hit"),
    (b"etag", b'"0123456789abcdef01234567-5dc"'),
    (b"content-length", str(len(BODY)).encode()),
]
TEXT_HEADERS = [(k.decode(), v.decode()) for k, v in HEADERS]
STARTED = time.time()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    age = (b"age", str(int(time.time() - STARTED)).encode())
    await send({"type": "http.response.start", "status": 200, "headers": [*HEADERS, age]})
    await send({"type": "http.response.body", "body": BODY})


class _RSGICeiling:
    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        proto.response_bytes(200, [*TEXT_HEADERS, ("age", str(int(time.time() - STARTED)))], BODY)


rsgi_app = _RSGICeiling()
