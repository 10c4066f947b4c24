"""What the HTTP adapters share: a client per event loop, and what a CDN's answer means.

The purge queue runs every adapter on its own thread's loop, but a process that forks
after a purge (a pre-forking server) starts that loop afresh: an ``httpx.AsyncClient``
belongs to the loop it was made in, so :class:`LoopClient` makes one per loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from pyisr.cdn.base import PurgeFailed

#: Seconds a purge request may take (connect, send, answer): a CDN that hangs costs a retry.
TIMEOUT = 5.0
#: Client errors a later attempt may get past (timeout, too early, rate limited); any other
#: 4xx answer (a bad token, a malformed request) is the same next time: not retried.
RETRYABLE_4XX = frozenset({408, 425, 429})


class LoopClient:
    """An ``httpx.AsyncClient`` for the running loop, made on first use."""

    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def request(self, method: str, url: str, **options: Any) -> httpx.Response:
        """Send one request; a connection error or a timeout is a retryable :class:`PurgeFailed`."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
            self._loop = loop
        try:
            return await self._client.request(method, url, **options)
        except httpx.HTTPError as exc:
            raise PurgeFailed(f"{type(exc).__name__}: {exc}", kind=type(exc).__name__) from exc

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()


def check_status(response: httpx.Response, who: str) -> None:
    """Raise :class:`PurgeFailed` unless ``response`` is 2xx (401/403 and most 4xx: not retried)."""
    status = response.status_code
    if 200 <= status < 300:
        return
    retry = not (400 <= status < 500) or status in RETRYABLE_4XX
    raise PurgeFailed(f"{who} answered {status}: {excerpt(response)}", retry=retry, kind=f"HTTP {status}")


def excerpt(response: httpx.Response, limit: int = 200) -> str:
    """The start of an answer's body, on one line (what a CDN said went wrong)."""
    text = " ".join(response.text.split())
    return (text[:limit] + "…") if len(text) > limit else (text or "(no body)")
