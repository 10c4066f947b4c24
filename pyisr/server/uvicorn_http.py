"""uvicorn (httptools) with pyisr's HTTP limits, and a shutdown that drops no request.

Why a protocol of our own: uvicorn with httptools puts no bound on a request's head (an
unfinished 16 MB header is 16 MB held) and no time limit on receiving it (a client that
sends a byte every few seconds holds its connection forever); h11 bounds the size only.
:class:`LimitedHttpTools` adds both (see :class:`~pyisr.server.limits.HTTPLimits`) for
a few attribute tests per request and no timer of its own: deadlines are checked by the
server's 0.1 s tick (:class:`DrainingServer`), so a limit is enforced within 0.1 s of its
time (0.2 s for an idle connection, whose wait the tick notes).

Why a server of our own: uvicorn's graceful shutdown closes every idle keep-alive
connection at once, and a client that is sending its next request on it at that instant
gets "server disconnected" instead of an answer. :meth:`DrainingServer.retire` (the
supervisor's SIGUSR1, see ``pyisr/server/supervisor.py``) instead stops accepting (the
listening socket is shared: the other workers take the new connections), answers every
request still arriving with ``Connection: close``, closes a connection only once it has
been idle for :data:`LINGER` seconds, and exits when none is left.
"""

from __future__ import annotations

import asyncio
import math
import signal
import socket
from collections.abc import Callable
from typing import Any, ClassVar

from uvicorn import Config, Server
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from pyisr.server.limits import HTTPLimits

#: A connection idle this long while its worker retires is closed: its client is between
#: requests, not sending one. (Closing it the instant a response ends could cross a
#: request already on its way.)
LINGER = 0.5


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a request the limits refuse."""


class LimitedHttpTools(HttpToolsProtocol):
    """httptools' protocol with a bounded head (size, header count, time) and draining.

    A subclass per server carries its limits (:func:`protocol_for`). Two of uvicorn's
    methods are extended, the two every request goes through anyway (``data_received``,
    ``on_headers_complete``), calling uvicorn's own directly; whether a connection is
    waiting for a head is read from uvicorn's state (its request cycle), and when that wait
    began is noted by the server's tick if no byte came first. Per connection:
    ``_since`` (the wait for a head began; 0 unknown), ``_started`` (a byte of that head
    came), ``_deadline`` (the wait ends; 0 none; set by the tick, so a request costs no
    clock reading), ``_head_bytes`` (bytes of an unfinished head), ``_chunk`` (the size of
    the read being parsed).
    """

    limits: ClassVar[HTTPLimits] = HTTPLimits()
    draining: ClassVar[bool] = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._refusal: tuple[int, bytes] | None = None
        self._head_bytes = 0
        self._chunk = 0
        self._started = False
        self._since = self.loop.time()
        self._deadline = self._since + self.limits.idle_timeout
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, b"Service Unavailable: too many connections")

    def data_received(self, data: bytes) -> None:
        # (Never called once a refusal closed the transport: it stops reading at once.)
        cycle = self.cycle
        in_head = cycle is None or not cycle.more_body  # not reading a request's body
        if in_head and not self._started:  # the first byte of a head: the tick times it
            self._started = True
        self._chunk = len(data)
        _data_received(self, data)
        if in_head and self.cycle is cycle:
            # No head was completed by this read: all of it belongs to an unfinished head.
            self._head_bytes += self._chunk
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, b"Request Header Fields Too Large")

    def on_headers_complete(self) -> None:
        limits = self.limits
        if len(self.headers) > limits.max_headers or (
            self._head_bytes + self._chunk > limits.max_header_bytes
            and self._head_size() > limits.max_header_bytes
        ):
            # (The exact size is measured only when the reads that held it were large.)
            self._refusal = (431, b"Request Header Fields Too Large")
            raise _Refused
        self._head_bytes = 0
        self._started = False
        self._since = self._deadline = 0.0
        _headers_complete(self)
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered with Connection: close

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) + 16

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers 400 to a parser error; a callback that raised _Refused set why.
        if self._refusal is not None:
            self._send_refusal()
        else:
            super().send_400_response(msg)

    def _refuse(self, status: int, text: bytes) -> None:
        self._refusal = (status, text)
        self._send_refusal()

    def _send_refusal(self) -> None:
        assert self._refusal is not None
        status, text = self._refusal
        self._deadline = 0.0
        if self.transport.is_closing():
            return
        self.transport.write(
            b"".join(
                (
                    STATUS_LINE[status],
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(text),
                    text,
                )
            )
        )
        self.transport.close()

    # -- called by the server's tick, every 0.1 s -------------------------------------------

    def check(self, now: float) -> None:
        """Close the connection if it waited too long for a head (or, retiring, is idle)."""
        if self._refusal is not None or self.transport.is_closing():
            return
        if not self._started and not self._since:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:  # idle since its last response
                self._since = now
                self._deadline = now + self.limits.idle_timeout
            return
        if self._started and self._deadline < self._since + self.limits.header_timeout:
            # A head began: its whole time runs from the start of the wait (or from now,
            # when its first byte came before the tick noted the wait).
            self._deadline = (self._since or now) + self.limits.header_timeout
        if self._deadline and now >= self._deadline:
            if self._started:
                self._refuse(408, b"Request Timeout")
            else:
                self.transport.close()
        elif self.draining and not self._started and now - self._since >= LINGER:
            self.transport.close()


#: uvicorn's own methods, called directly (cheaper than ``super()`` on every request).
_data_received = HttpToolsProtocol.data_received
_headers_complete = HttpToolsProtocol.on_headers_complete


def protocol_for(limits: HTTPLimits) -> type[LimitedHttpTools]:
    """A protocol class carrying ``limits`` (uvicorn builds protocols from a class)."""

    class Protocol(LimitedHttpTools):
        pass

    Protocol.limits = limits
    return Protocol


class DrainingServer(Server):
    """uvicorn's server, ticking the limits' deadlines, retiring on SIGUSR1 without loss."""

    def __init__(self, config: Config, on_ready: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self._retire_asked = False
        self._retiring_since: float | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.should_exit:
            return
        # Set from the signal handler, acted on by the next tick (the loop runs Python
        # code at least every 0.1 s, so the handler runs promptly).
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "_retire_asked", True))
        if self._on_ready is not None:
            self._on_ready()

    async def on_tick(self, counter: int) -> bool:
        now = asyncio.get_running_loop().time()
        if self._retire_asked and self._retiring_since is None:
            self.retire(now)
        for connection in list(self.server_state.connections):
            if isinstance(connection, LimitedHttpTools):
                connection.check(now)
        if self._retiring_since is not None:
            graceful = self.config.timeout_graceful_shutdown or 30.0
            if not self.server_state.connections or now - self._retiring_since > graceful:
                self.should_exit = True
        return await super().on_tick(counter)

    def retire(self, now: float) -> None:
        """Stop accepting; let every connection finish what it is doing, then close it."""
        self._retiring_since = now
        for server in self.servers:
            server.close()
        protocol = self.config.http_protocol_class
        if isinstance(protocol, type) and issubclass(protocol, LimitedHttpTools):
            protocol.draining = True
        for connection in list(self.server_state.connections):
            cycle: Any = getattr(connection, "cycle", None)
            if cycle is not None and not cycle.response_started:
                cycle.keep_alive = False


def serve(listen_fd: int, limits: HTTPLimits, graceful_timeout: float, on_ready: Callable[[], None]) -> None:
    """Serve the site (``PYISR_SITE``) on the inherited listening socket until told to stop."""
    config = Config(
        "pyisr.server.entry:create_app",
        factory=True,
        http=protocol_for(limits),
        ws="none",
        lifespan="on",
        access_log=False,
        log_level="warning",
        # uvicorn's own keep-alive timer (whole seconds) runs too: whichever ends first
        # closes an idle connection.
        timeout_keep_alive=max(1, math.ceil(limits.keep_alive_timeout)),
        timeout_graceful_shutdown=max(1, math.ceil(graceful_timeout)),
    )
    sock = socket.socket(fileno=listen_fd)
    DrainingServer(config, on_ready=on_ready).run(sockets=[sock])
