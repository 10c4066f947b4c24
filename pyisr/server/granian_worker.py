"""One granian worker serving the site over RSGI on a listening socket it inherited.

Why not granian's own process manager: on Linux it gives each worker a listening socket
of its own (SO_REUSEPORT), and a worker that exits takes the connections queued on its
socket with it (they are reset); its SIGHUP respawn waits a fixed 3.5 s instead of for the
new worker to be ready, and stops the old one with a shutdown that closes idle keep-alive
connections at once. Measured under load, each costs failed requests. So pyisr's
supervisor (``pyisr/server/supervisor.py``) owns the one listening socket and the
processes, and each process runs exactly one granian worker on that socket: granian's own
worker routine, given the socket through the attributes its process manager uses for a
shared one. Those are granian internals, tested with the version pinned in pyproject.toml.

Retiring (SIGUSR1 from the supervisor) is done in three steps, so that no request is
lost: stop accepting (:func:`stop_accepting`), answer every further request with
``Connection: close`` (:func:`pyisr.server.rsgi.start_draining`), and once no request
has come for :data:`LINGER` seconds, let granian shut down (SIGTERM to this process),
which finishes any request still running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyisr.server import rsgi
from pyisr.server.limits import HTTPLimits, granian_http1_settings

#: A retiring worker shuts down once no request came for this long.
LINGER = 0.5


def stop_accepting(listen_fd: int) -> int:
    """Stop this process accepting on the shared listening socket, leaving it open for others.

    granian has no call to stop accepting short of shutting the worker down, and the
    socket must not be shut down or closed for everyone (the new workers accept on it).
    So every descriptor this process holds on it is pointed (``dup2``) at a non-blocking
    listening socket nobody connects to: granian's next accept finds nothing there and
    waits, and connections go on queueing on the real socket for the other workers.
    Returns how many descriptors were replaced.
    """
    target = os.fstat(listen_fd)
    idle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    idle.bind(("127.0.0.1", 0))
    idle.listen(1)
    idle.setblocking(False)  # granian's accept must get EAGAIN, never block its thread
    fd_dir = Path("/proc/self/fd") if Path("/proc/self/fd").is_dir() else Path("/dev/fd")
    replaced = 0
    for name in os.listdir(fd_dir) if fd_dir.is_dir() else [str(listen_fd)]:
        fd = int(name)
        try:
            info = os.fstat(fd)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino) and fd != idle.fileno():
            os.dup2(idle.fileno(), fd)
            replaced += 1
    idle.close()  # its duplicates stay open where the listening socket was
    return replaced


class _Target:
    """What granian loads: the App's own ``__rsgi__`` (no wrapper per request), plus the
    start-up that reports readiness and the SIGUSR1 that retires the worker."""

    def __init__(self, listen_fd: int, graceful_timeout: float, on_ready: Callable[[], None]) -> None:
        from pyisr.server.entry import create_app

        self.app = create_app()
        self.__rsgi__ = self.app.__rsgi__
        self._listen_fd = listen_fd
        self._graceful_timeout = graceful_timeout
        self._on_ready = on_ready
        self._retiring_since = 0.0

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.app.__rsgi_init__(loop)
        loop.add_signal_handler(signal.SIGUSR1, self._retire, loop)
        self._on_ready()

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.app.__rsgi_del__(loop)

    def _retire(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._retiring_since:
            return
        self._retiring_since = time.monotonic()
        stop_accepting(self._listen_fd)
        rsgi.start_draining(self.app)
        loop.call_later(0.1, self._drained, loop)

    def _drained(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        quiet = now - rsgi.DRAIN.last_request >= LINGER and not rsgi.DRAIN.in_flight
        if quiet or now - self._retiring_since > self._graceful_timeout:
            os.kill(os.getpid(), signal.SIGTERM)  # granian's own shutdown: running requests finish
        else:
            loop.call_later(0.1, self._drained, loop)


def serve(
    listen_fd: int,
    limits: HTTPLimits,
    graceful_timeout: float,
    on_ready: Callable[[], None],
    *,
    index: int = 0,
    backlog: int = 1024,
) -> None:
    """Run one granian worker (RSGI, HTTP/1, ``limits``) on ``listen_fd`` until it stops."""
    from granian._granian import SocketHolder
    from granian.constants import HTTPModes, Interfaces, RuntimeModes
    from granian.server.mp import MPServer

    server: Any = MPServer(
        "pyisr.server.entry:create_app",  # (unused: the worker loads _Target)
        interface=Interfaces.RSGI,  # a cached page is answered in one call (rsgi.py)
        workers=1,
        http=HTTPModes.http1,  # "auto" waits with no timeout for the first bytes
        http1_settings=granian_http1_settings(limits),
        backpressure=limits.max_connections,  # connections at once in this worker
        backlog=backlog,
        websockets=False,
        runtime_mode=RuntimeModes.st,  # what granian's "auto" picks for RSGI, 1 thread
    )
    # The shared socket, as granian's process manager hands one to its workers (its type
    # stub omits the constructor's arguments: descriptor, is-unix-socket, backlog).
    holder = SocketHolder(listen_fd, False, backlog)  # type: ignore[call-arg]
    server._ssp, server._shd, server._sso = None, holder, None

    def load() -> _Target:
        return _Target(listen_fd, graceful_timeout, on_ready)

    worker = server._spawn_worker(idx=index, target=server._spawn_rsgi_worker, callback_loader=load)
    # granian built the process object with its worker routine and arguments; run them here.
    worker.inner._target(*worker.inner._args)
