"""The one small interface every CDN adapter implements.

An adapter turns a batch of edge keys (:mod:`pyisr.cdn.keys`) into the request its CDN
understands and raises :class:`PurgeFailed` when the CDN did not take it. Everything
else (batching, retries with back-off, counting, health, never blocking a caller) is
the purge queue's, the same for every adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class PurgeFailed(Exception):
    """The CDN refused or never answered a purge.

    ``retry`` is False when sending the same request again cannot help (a rejected
    token, a malformed request): the queue then gives up on the batch at once.
    """

    def __init__(self, message: str, *, retry: bool = True, kind: str | None = None) -> None:
        super().__init__(message)
        self.retry = retry
        #: What went wrong in a word or two, fit to show anyone (``HTTP 403``, ``ConnectError``):
        #: never a host, a path or a token; the message may name them.
        self.kind = kind or type(self).__name__


class EdgePurger(Protocol):
    """A CDN (or reverse proxy) that can drop what it holds for some keys."""

    #: Safe to show anyone: the scheme and host (``varnish://127.0.0.1:6081``), never a token.
    name: str
    #: Keys one request may name; the queue splits larger batches.
    max_keys: int
    #: Bytes the keys of one request may take, one separator each included (they travel
    #: in a header whose line the CDN limits); ``None``: no limit but ``max_keys``.
    max_bytes: int | None

    async def purge(self, keys: Sequence[str], *, soft: bool) -> None:
        """Purge ``keys``; ``soft``: mark stale, served while refetched (where supported)."""
        ...

    async def close(self) -> None: ...
