"""Finding a Redis (and a Redis Cluster) for the tests, and starting throwaway servers.

Where the Redis comes from, in order:

1. ``PYISR_TEST_REDIS_URL`` (and ``PYISR_TEST_REDIS_CLUSTER_URL`` for the cluster), if set;
2. ``redis-server`` from ``PATH``, started on a free port for this test session;
3. otherwise the Redis tests are skipped, except under ``CI=true``, where a missing
   Redis fails the run: a CI job that silently skips them proves nothing.

Every server started here is killed by its PID at teardown. Import the fixtures into
a test module to use them (``from redis_support import redis_url  # noqa: F401``).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def missing(reason: str) -> None:
    """Skip the test, or fail it under CI, because Redis is not available."""
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason} (CI=true: Redis tests must not be skipped)")
    pytest.skip(reason)


def redis_py() -> Any:
    """The ``pyisr.cache.redis`` module, or skip/fail when redis-py is not installed."""
    try:
        import pyisr.cache.redis as module
    except ImportError as exc:
        missing(f"redis-py is not installed ({exc}): pip install 'pyisr[redis]'")
    return module


def unique_prefix() -> str:
    """A key prefix no other test uses, so tests sharing one Redis never see each other."""
    return "t" + uuid.uuid4().hex[:12]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, cluster: bool = False) -> int:
    """A free port on 127.0.0.1; for a cluster node, ``port + 10000`` (its bus) is free too."""
    for _ in range(200):
        port = random.randint(20000, 50000)
        if _bindable(port) and (not cluster or _bindable(port + 10000)):
            return port
    raise RuntimeError("no free port found for a test Redis server")


def ping(port: int, timeout: float = 0.2) -> bool:
    """True if a Redis on ``port`` answers PING (raw socket: no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1 that a test controls (start, pause, kill)."""

    def __init__(self, directory: Path, port: int | None = None, *, cluster: bool = False) -> None:
        self.directory = directory
        self.cluster = cluster
        self.port = port or free_port(cluster=cluster)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            missing("redis-server is not on PATH and PYISR_TEST_REDIS_URL is not set")
        assert binary is not None
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / f"redis-{self.port}.log"),
        ]  # fmt: skip
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.directory / f"nodes-{self.port}.conf"),
            ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.directory / f"redis-{self.port}.log"
                detail = log.read_text()[-2000:] if log.exists() else ""
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{detail}")
            time.sleep(0.02)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (timeouts)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Kill the server by its PID (works on a paused one too) and reap it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=10)


#: Servers started for the session, by kind. Each test module that imports the
#: fixtures gets its own fixture definitions, so the servers are shared through here
#: rather than started once per module.
_session_servers: dict[str, tuple[str, list[RedisServer]]] = {}


def _kill_session_servers(kind: str) -> None:
    _url, servers = _session_servers.pop(kind, ("", []))
    for server in servers:
        server.kill()


def _single_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    if "single" not in _session_servers:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        _session_servers["single"] = (server.url, [server])
        server.start()
    return _session_servers["single"][0]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis URL for the session: ``PYISR_TEST_REDIS_URL`` or a server started here."""
    env = os.environ.get("PYISR_TEST_REDIS_URL")
    if env:
        yield env
        return
    if shutil.which("redis-server") is None:
        missing("redis-server is not on PATH and PYISR_TEST_REDIS_URL is not set")
    try:
        yield _single_server(tmp_path_factory)
    finally:
        _kill_session_servers("single")


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """Servers a test starts, pauses and kills itself (degraded mode); all killed at the end.

    Append ``RedisServer(tmp_path)`` objects; they need ``redis-server`` on ``PATH``
    whatever ``PYISR_TEST_REDIS_URL`` says, since the test must control the process.
    """
    if shutil.which("redis-server") is None:
        missing("redis-server is not on PATH; degraded-mode tests must start and kill their own")
    servers: list[RedisServer] = []
    try:
        yield servers
    finally:
        for server in servers:
            server.kill()


def _cli(port: int, *args: str, timeout: float = 10.0) -> str:
    result = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.stdout + result.stderr


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``redis+cluster://`` URL: ``PYISR_TEST_REDIS_CLUSTER_URL`` or three masters started here."""
    env = os.environ.get("PYISR_TEST_REDIS_CLUSTER_URL")
    if env:
        yield env
        return
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        missing("redis-server and redis-cli are needed on PATH for the Redis Cluster tests")
    try:
        yield _cluster(tmp_path_factory)
    finally:
        _kill_session_servers("cluster")


def _cluster(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three masters, one shard each, started once per session."""
    if "cluster" in _session_servers:
        return _session_servers["cluster"][0]
    directory = tmp_path_factory.mktemp("redis-cluster")
    servers = [RedisServer(directory, cluster=True) for _ in range(3)]
    url = f"redis+cluster://127.0.0.1:{servers[0].port}"
    _session_servers["cluster"] = (url, servers)
    for server in servers:
        server.start()
    nodes = [f"127.0.0.1:{s.port}" for s in servers]
    out = _cli(servers[0].port, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes")
    deadline = time.monotonic() + 20
    while not all("cluster_state:ok" in _cli(s.port, "cluster", "info") for s in servers):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Redis Cluster did not become ready:\n{out}")
        time.sleep(0.05)
    return url
