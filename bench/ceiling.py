"""The ceiling for a cached page in Python: a raw ASGI app answering one fixed ~1.5 KB page.

No routing, no cache, no logic: what uvicorn or granian alone can do per second on
this machine. ``hit`` runs it beside pyisr so the gap to the ceiling shows in one run.
"""

from __future__ import annotations

from typing import Any

from bench.sites import page_html

BODY = page_html("Post 1").encode()
HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"content-length", str(len(BODY)).encode()),
    (b"cache-control", b"s-maxage=3600, stale-while-revalidate=31532400"),
    (b"x-pyisr-cache", b"HIT"),
    (b"etag", b'"0123456789abcdef01234567-5dc"'),
]


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
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
