"""Running a real ``pyisr start`` process for end-to-end tests.

The server is a subprocess on 127.0.0.1 and a free port; tests speak HTTP to it with
httpx and read its log. Every process started here is stopped by its PID.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

PYISR = [sys.executable, "-m", "pyisr.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_group(proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Stop a process started in its own session, with its children (a server's workers,
    varnishd's child): SIGTERM to its group by its PID, SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def copy_site(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".pyisr", "__pycache__"))
    return dest


def run_cli(
    args: list[str], env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        PYISR + args, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


class Server:
    """A ``pyisr start`` subprocess and its log."""

    def __init__(
        self,
        site: Path,
        env: Mapping[str, str],
        *,
        workers: int = 1,
        port: int | None = None,
        command: str = "start",
        server: str = "uvicorn",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.site = site
        self.server = server
        self.extra_args = extra_args
        # No re-warm unless a test asks (PYISR_REWARM_RATE): after an invalidation it renders
        # hot pages in the background, and the status a test expects next would be a race.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYISR_REWARM_RATE": "0", **env}
        self.workers = workers
        self.port = port or free_port()
        self.command = command
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = site.parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # One pooled client: creating a client per request costs more than the request.
        self.client = httpx.Client(
            timeout=30,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
        )

    def start(self) -> Server:
        log = open(self.log_path, "ab")
        args = [self.command, str(self.site), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.command == "start":
            args += ["--workers", str(self.workers), "--server", self.server]
        args += self.extra_args
        self.proc = subprocess.Popen(
            PYISR + args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                # Up means answering: a server that starts degraded (its Redis down) says 503.
                if httpx.get(self.url + "/_pyisr/health", timeout=1).status_code in (200, 503):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def restart(self) -> Server:
        self.stop()
        return self.start()

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return self.client.get(self.url + path, **kwargs)  # type: ignore[arg-type]

    def request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        return self.client.request(method, self.url + path, **kwargs)  # type: ignore[arg-type]


@contextmanager
def running(site: Path, env: Mapping[str, str], **kwargs: object) -> Iterator[Server]:
    server = Server(site, env, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


class DataServer:
    """A tiny local JSON origin for ``fetch``: counts requests, body changes on demand."""

    def __init__(self) -> None:
        self.hits = 0
        self.version = 1
        self.status = 200
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                owner.hits += 1
                body = f'{{"version": {owner.version}, "hit": {owner.hits}}}'.encode()
                self.send_response(owner.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> DataServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def counts(folder: Path, name: str) -> int:
    path = folder / (name.strip("/").replace("/", "_") or "index")
    return len(path.read_text().splitlines()) if path.exists() else 0


# -- the example blog's pages and database (real-server and in-process tests alike) ----


def sql(db: Path, statement: str, *args: object) -> None:
    conn = sqlite3.connect(db, timeout=10)
    try:
        with conn:
            conn.execute(statement, args)
    finally:
        conn.close()


def heading(response: httpx.Response) -> str:
    match = re.search(r"<h1>(.*?)</h1>", response.text, re.S)
    assert match, response.text[:500]
    return match.group(1).strip()


def rendered_at(response: httpx.Response) -> str:
    match = re.search(r'id="rendered-at" datetime="([^"]+)"', response.text)
    assert match, response.text[:500]
    return match.group(1)
