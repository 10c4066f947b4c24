"""What one client may cost a ``pyisr start`` worker before the application sees a request.

Why here and not in the application: a request's head (request line and headers) is read
by the HTTP server, so only the server can bound it. Without bounds, 20 connections each
holding an unfinished 16 MB header took a worker from 47 to 399 MB, a 64 MB header held
its event loop for 2.7 s, and a client sending one header byte every few seconds held a
connection forever. Each bound below is enforced by both servers ``pyisr start`` runs:

- granian, natively (hyper's HTTP/1 settings: :func:`granian_http1_settings`);
- uvicorn, by pyisr's protocol (``pyisr/server/uvicorn_http.py``), since uvicorn with
  httptools bounds neither the size of a head nor the time it takes to arrive.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

KIB = 1024

#: Header lines a request may carry. Fixed: hyper's own limit under granian (granian does
#: not expose it), the same under uvicorn.
MAX_HEADERS = 100


@dataclass(frozen=True)
class HTTPLimits:
    """The HTTP limits of one worker (``pyisr start`` flags; defaults are the safe ones).

    ``max_header_bytes``: the request head (request line and headers) may be this long;
    longer is answered 431 and the connection closed. Under granian a head that arrives
    in one piece may be read up to twice this long before it is refused (hyper reads in
    chunks of up to this size), so a worker holds at most ``2 * max_header_bytes`` of head
    per connection.

    ``header_timeout``: a request's head must have arrived this many seconds after the
    connection opened or its previous response was sent; else the connection is closed
    (408 under uvicorn when part of a head came). This cuts off slow-header clients.

    ``keep_alive_timeout``: a connection that sends no byte of a next request for this
    many seconds is closed. Under granian one timer does both jobs (hyper has only the
    header read timeout): it runs for the smaller of the two, so neither bound is ever
    exceeded.

    ``max_connections``: connections one worker holds at once. Under granian further
    connections wait in the listening socket's backlog until one closes; under uvicorn
    they are answered 503 and closed. With the head limits this bounds a worker's memory
    for heads to about ``max_connections * 2 * max_header_bytes``.
    """

    max_header_bytes: int = 32 * KIB
    max_headers: int = MAX_HEADERS
    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1024

    def __post_init__(self) -> None:
        if self.max_header_bytes < 8 * KIB:
            # hyper's minimum read buffer; smaller heads would refuse ordinary browsers.
            raise ValueError("max_header_bytes must be at least 8 KiB")
        if self.header_timeout <= 0 or self.keep_alive_timeout <= 0:
            raise ValueError("header_timeout and keep_alive_timeout must be positive")
        if self.max_connections < 1 or self.max_headers < 1:
            raise ValueError("max_connections and max_headers must be at least 1")

    @property
    def idle_timeout(self) -> float:
        """The one timer of a server that cannot tell an idle connection from a slow head."""
        return min(self.header_timeout, self.keep_alive_timeout)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HTTPLimits:
        return cls(**data)


def granian_http1_settings(limits: HTTPLimits) -> Any:
    """granian's HTTP/1 settings for ``limits`` (hyper's header read timeout and read buffer).

    granian then runs in HTTP/1-only mode (see ``pyisr/server/granian_worker.py``): its
    "auto" mode reads the first bytes of a connection, to tell HTTP/2 from HTTP/1, with no
    timeout, so a client that connects and sends nothing was never cut off.
    """
    from granian.http import HTTP1Settings

    return HTTP1Settings(
        header_read_timeout=int(limits.idle_timeout * 1000),
        keep_alive=True,
        max_buffer_size=limits.max_header_bytes,
    )
