"""HTTP limits of ``pyisr start``, against the real server under both granian and uvicorn.

What a client may cost a worker before the application sees its request (README,
"Commands", ``pyisr start``): a request head over ``--max-header-bytes`` is answered 431,
more than 100 header lines 431, a head still arriving after ``--header-timeout`` (or an
idle connection after ``--keep-alive-timeout``) is closed; unfinished giant headers from
many connections never grow the server's memory. Timeouts are shortened by the flags so
each case takes a second or two. Raw sockets on 127.0.0.1: httpx would not send such
requests.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import Server, run_cli

pytestmark = pytest.mark.slow

HEADER_TIMEOUT = 2.0
KEEP_ALIVE = 1.0
#: The one timer granian has (the smaller of the two); uvicorn keeps them apart.
SLACK = 1.0  # how late a close may come: uvicorn checks deadlines every 0.1 s, and CI is slow
LIMIT = 32 * 1024
PAGE = "<html><body><h1>limits</h1></body></html>"


@pytest.fixture(scope="module", params=["granian", "uvicorn"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp(f"limits-{request.param}")
    site = root / "site"
    (site / "app").mkdir(parents=True)
    (site / "app" / "page.py").write_text(f"revalidate = 3600\n\n\ndef page(params):\n    return {PAGE!r}\n")
    built = run_cli(["build", str(site)], {})
    assert built.returncode == 0, built.stdout + built.stderr
    srv = Server(
        site,
        {},
        server=request.param,
        extra_args=(
            "--header-timeout",
            str(HEADER_TIMEOUT),
            "--keep-alive-timeout",
            str(KEEP_ALIVE),
            "--max-header-bytes",
            "32KB",
        ),
    ).start()
    yield srv
    srv.stop()


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def response_or_close(sock: socket.socket, timeout: float = 10) -> tuple[bytes, float]:
    """What the server sends until it closes (or ``timeout``), and when it closed."""
    sock.settimeout(timeout)
    started = time.monotonic()
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data, time.monotonic() - started


def status_of(data: bytes) -> int | None:
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data[9:12])


def send_head(sock: socket.socket, extra: bytes) -> None:
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused while sending: the answer (or the close) is read next


def tree_rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants, in kB (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def test_normal_requests_are_unaffected(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(3):  # one keep-alive connection
            response = client.get("/", headers={"x-large-but-fine": "v" * 8000})
            assert response.status_code == 200 and response.text == PAGE
    sock = connect(server)
    send_head(sock, b"".join(b"X-H%d: v\r\n" % i for i in range(90)) + b"Connection: close\r\n")
    data, _ = response_or_close(sock)
    assert status_of(data) == 200


def test_a_large_body_is_not_a_large_head(server: Server) -> None:
    """Only the head counts: a 200 kB body (sent with its head, and after it) gets the app's answer."""
    body = b"x" * 200_000
    for pause in (False, True):
        sock = connect(server)
        head = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        sock.sendall(head % len(body) + (b"" if pause else body))
        if pause:
            time.sleep(0.3)
            sock.sendall(body)
        data, _ = response_or_close(sock)
        assert status_of(data) == 405, data[:200]  # a page takes GET and HEAD only


def test_an_oversize_header_is_refused_at_once(server: Server) -> None:
    sock = connect(server)
    started = time.monotonic()
    send_head(sock, b"X-Big: " + b"a" * 100_000 + b"\r\n")
    data, _ = response_or_close(sock)
    assert status_of(data) in (431, None), data[:200]  # 431, or closed while it was sent
    assert time.monotonic() - started < 1.0


def test_too_many_headers_are_refused(server: Server) -> None:
    sock = connect(server)
    send_head(sock, b"".join(b"X-H%d: v\r\n" % i for i in range(200)))
    data, _ = response_or_close(sock)
    assert status_of(data) in (431, 400), data[:200]


def test_unfinished_giant_headers_do_not_grow_memory(server: Server) -> None:
    """The operator's case: 20 connections each pushing a 16 MB header that never ends."""
    assert server.proc is not None
    before = tree_rss_kb(server.proc.pid)
    sent: list[int] = []

    def push(pipelined: bool) -> None:
        sock = connect(server)
        total = 0
        try:
            if pipelined:  # the giant head behind a request being answered
                sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
            chunk = b"a" * 65536
            while total < 16 * 1024 * 1024:
                sock.sendall(chunk)
                total += len(chunk)
        except OSError:
            pass  # cut off: what this test wants
        finally:
            sent.append(total)
            sock.close()

    threads = [threading.Thread(target=push, args=(i % 2 == 1,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    after = tree_rss_kb(server.proc.pid)
    # Each connection was cut off early, not read to the end...
    assert max(sent) < 4 * 1024 * 1024, sent
    # ...and the server holds no more than a few MB for all of them.
    assert after - before < 20 * 1024, (before, after)
    assert httpx.get(server.url + "/", timeout=10).status_code == 200


def test_a_slow_header_is_cut_off(server: Server) -> None:
    """Slowloris: one header byte every half second; the head never completes."""
    sock = connect(server)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    started = time.monotonic()
    closed_after = None
    received = b""
    sock.settimeout(0.5)
    while time.monotonic() - started < HEADER_TIMEOUT + 5:
        try:
            sock.sendall(b"a")
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            closed_after = time.monotonic() - started
            break
        received += chunk
        if not chunk:
            closed_after = time.monotonic() - started
            break
    assert closed_after is not None, "a head that never completes kept its connection"
    assert closed_after <= HEADER_TIMEOUT + SLACK
    assert status_of(received) in (408, None)


def test_an_idle_keep_alive_connection_is_closed(server: Server) -> None:
    sock = connect(server)
    send_head(sock, b"")
    sock.settimeout(5)
    answer = b""
    while PAGE.encode() not in answer:
        answer += sock.recv(65536)
    assert status_of(answer) == 200 and b"connection: close" not in answer.lower()
    rest, idle = response_or_close(sock, timeout=10)  # then nothing, until the server closes
    assert rest == b""
    assert idle <= KEEP_ALIVE + SLACK, idle


def test_a_connection_that_sends_nothing_is_closed(server: Server) -> None:
    sock = connect(server)
    data, waited = response_or_close(sock, timeout=10)
    assert data == b""
    assert waited <= KEEP_ALIVE + SLACK, waited
