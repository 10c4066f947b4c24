"""A crawler against a real ``pyisr start`` with a 20 MB cap (issue: "A capped cache").

20,000 unknown ids (each a 404 the site caches) and 2,000 requests with 64 kB paths: the
cache's bytes on disk stay under the cap, the server's memory does not grow with the
traffic, the site's real pages keep being served, and nothing fails.
"""

from __future__ import annotations

import os
import socket
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from e2e_support import Server, run_cli

pytestmark = pytest.mark.slow

CAP = 20 * 1024 * 1024

ITEM = textwrap.dedent(
    """
    from pyisr import not_found

    revalidate = 3600

    def generate_static_params():
        return [{"id": str(i)} for i in range(1, 6)]

    def page(params):
        if not params["id"].isdigit() or int(params["id"]) > 5:
            not_found()
        return "<p>item " + params["id"] + "</p>" + "x" * 2000
    """
)


def disk_bytes(root: Path) -> int:
    """Bytes on disk under ``root`` (blocks, as the cap counts them)."""
    total = 0
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except FileNotFoundError:
                pass  # evicted meanwhile
    return total


def raw_get(port: int, path: str) -> int | None:
    """The status a GET of ``path`` gets, or ``None`` when the server closed the connection."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
            head = sock.recv(64)
        except (BrokenPipeError, ConnectionResetError):
            return None
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None


def tree_rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` and its children (the supervisor and its workers)."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    total = 0
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def test_a_crawler_never_fills_the_disk_nor_the_memory(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "app" / "item" / "[id]").mkdir(parents=True)
    (site / "app" / "item" / "[id]" / "page.py").write_text(ITEM)
    env = {"PYISR_CACHE_MAX_BYTES": "20MB", "PYISR_MEMORY_TIER": "4MB"}
    assert run_cli(["build", str(site)], env).returncode == 0
    server = Server(site, env).start()
    try:
        assert server.proc is not None
        client = httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=16))

        def crawl(ids: range) -> list[int]:
            return [client.get(f"{server.url}/item/n{i}").status_code for i in ids]

        def crawl_all(first: int, last: int) -> list[int]:
            step = (last - first) // 16
            with ThreadPoolExecutor(16) as pool:
                chunks = pool.map(crawl, [range(first + k * step, first + (k + 1) * step) for k in range(16)])
            return [status for chunk in chunks for status in chunk]

        statuses = crawl_all(0, 8_000)
        rss_early = tree_rss_kb(server.proc.pid)
        statuses += crawl_all(8_000, 20_000)
        rss_late = tree_rss_kb(server.proc.pid)
        assert len(statuses) == 20_000 and set(statuses) == {404}, "every unknown id answers 404"

        long_path = "/item/" + "a" * 64 * 1024  # past what an HTTP client sends: raw sockets
        with ThreadPoolExecutor(8) as pool:
            long_statuses = list(pool.map(lambda _: raw_get(server.port, long_path), range(2_000)))
        assert set(long_statuses) <= {414, 431, None}, set(long_statuses)  # None: closed at once

        cache = site / ".pyisr" / "cache"
        assert disk_bytes(cache) <= CAP, f"{disk_bytes(cache)} bytes on disk for a {CAP} byte cap"
        assert rss_late - rss_early < 25_000, f"RSS grew from {rss_early} kB to {rss_late} kB"
        real = [server.get(f"/item/{i}") for i in range(1, 6)]
        assert all(r.status_code == 200 and f"item {i}" in r.text for i, r in enumerate(real, 1))
        assert server.get("/_pyisr/health").status_code == 200
        client.close()
    finally:
        server.stop()
