"""A small HTTP/1.1 load generator that sees every response's headers and latency.

wrk is the reference for requests per second, but it cannot tell a STALE response
from a HIT one. This client keeps one request in flight per keep-alive connection
(like wrk), records the latency of each response together with its
``x-pyisr-cache`` header, and talks only to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when available: the client should cost as little CPU as possible."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def run(coro: Any) -> Any:
    loop = new_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    latency: float


class Connection:
    """One keep-alive connection; ``get`` sends a request and reads the whole response."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        return self

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    def send(self, path: str, extra: str = "") -> None:
        assert self.writer is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n{extra}\r\n".encode("latin-1"))

    async def read(self) -> tuple[int, dict[str, str], bytes]:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        else:
            body = await self.reader.read()
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body

    async def get(self, path: str, extra: str = "") -> Response:
        if self.writer is None:
            await self.open()
        started = time.perf_counter()
        self.send(path, extra)
        status, headers, body = await self.read()
        return Response(status, headers, body, time.perf_counter() - started)


@dataclass
class Samples:
    """Latencies (seconds) grouped by ``x-pyisr-cache`` (or ``status <code>``), plus errors."""

    by_status: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0
    requests: int = 0
    seconds: float = 0.0
    bodies: dict[str, int] = field(default_factory=dict)

    def add(self, word: str, latency: float) -> None:
        self.requests += 1
        self.by_status.setdefault(word, []).append(latency)

    def all(self) -> list[float]:
        return [x for values in self.by_status.values() for x in values]


def cache_word(response: Response) -> str:
    word = response.headers.get("x-pyisr-cache")
    if response.status != 200:
        return f"status {response.status}" + (f" {word}" if word else "")
    return word or "none"


async def closed_loop(
    port: int,
    paths: Sequence[str],
    *,
    connections: int,
    duration: float,
    classify: Callable[[Response], str] = cache_word,
) -> Samples:
    """``connections`` keep-alive connections, each sending its next request when the last answered.

    Connection ``i`` walks ``paths`` starting at offset ``i``, so every path gets the same load.
    """
    samples = Samples()
    conns = [await Connection(port).open() for _ in range(connections)]
    started = time.perf_counter()
    deadline = started + duration

    async def worker(index: int, conn: Connection) -> None:
        n = index
        while time.perf_counter() < deadline:
            path = paths[n % len(paths)]
            n += 1
            try:
                response = await conn.get(path)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                samples.errors += 1
                await conn.close()
                continue
            samples.add(classify(response), response.latency)

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    samples.seconds = time.perf_counter() - started
    for conn in conns:
        await conn.close()
    return samples


async def burst(
    port: int, path: str, count: int, *, connect_timeout: float = 30, timeout: float = 60
) -> tuple[list[Response], int]:
    """``count`` requests to ``path`` at the same instant, each on its own connection.

    All connections are opened first; then every request is written in one go, so the
    server sees them together. Returns the responses and the number of failures.
    """
    conns = [Connection(port) for _ in range(count)]
    opened = await asyncio.wait_for(
        asyncio.gather(*(c.open() for c in conns), return_exceptions=True), connect_timeout
    )
    live = [c for c, r in zip(conns, opened, strict=True) if not isinstance(r, BaseException)]
    failures = count - len(live)
    gate = asyncio.Event()

    async def one(conn: Connection) -> Response | None:
        await gate.wait()
        started = time.perf_counter()
        conn.send(path)
        try:
            status, headers, body = await conn.read()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            return None
        return Response(status, headers, body, time.perf_counter() - started)

    tasks = [asyncio.ensure_future(one(c)) for c in live]
    await asyncio.sleep(0)
    gate.set()
    done = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    for conn in live:
        await conn.close()
    responses = [r for r in done if r is not None]
    return responses, failures + (len(done) - len(responses))


async def sweep(
    port: int,
    paths: Sequence[str],
    *,
    connections: int,
    deadline: float,
    on_progress: Callable[[int], None] | None = None,
    progress_every: int = 5000,
) -> tuple[int, int, dict[int, int]]:
    """Request every path once, over ``connections`` connections, until done or ``deadline``.

    Returns (requests answered, errors, status counts).
    """
    queue_index = 0
    answered = 0
    errors = 0
    statuses: dict[int, int] = {}

    async def worker() -> None:
        nonlocal queue_index, answered, errors
        conn = await Connection(port).open()
        try:
            while queue_index < len(paths) and time.monotonic() < deadline:
                path = paths[queue_index]
                queue_index += 1
                try:
                    response = await conn.get(path)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    await conn.close()
                    continue
                statuses[response.status] = statuses.get(response.status, 0) + 1
                answered += 1
                if on_progress is not None and answered % progress_every == 0:
                    on_progress(answered)
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return answered, errors, statuses
