"""``pyisr start`` as a process: SIGHUP switches to a new build without losing a request.

The deploy procedure of the README: ``pyisr build SITE && kill -HUP <pid>``. Under a
steady load of 8 client threads (half on keep-alive connections, half opening a
connection per request), the site is rebuilt with a new version string and the server
gets SIGHUP: no request may fail (a refused or reset connection counts), every answer is
wholly version A or wholly version B, A only before the signal, B only once the new
workers are up (after a short overlap while the old ones finish). Under both servers.
And a new generation that cannot start leaves the running one serving.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from e2e_support import Server, run_cli

pytestmark = pytest.mark.slow

#: Fresh bytecode for each edit: two versions of a page written within one second would
#: otherwise share a stale .pyc (the source's mtime and size are all Python checks).
ENV = {"PYTHONDONTWRITEBYTECODE": "1"}
PAGE = """
revalidate = 1


def page(params):
    return "<html><body><h1>version {version}</h1><p>{filler}</p></body></html>"
"""
FILLER = "x" * 2000
WHOLE = re.compile(r"<html><body><h1>version (A|B)</h1><p>" + FILLER + r"</p></body></html>")
THREADS = 8
#: After the supervisor says the new workers are ready, old workers may still answer the
#: requests they had, each once more with Connection: close; then only B.
OVERLAP = 1.0


def write_site(site: Path, version: str) -> None:
    (site / "app").mkdir(parents=True, exist_ok=True)
    (site / "app" / "page.py").write_text(PAGE.format(version=version, filler=FILLER))


def build(site: Path) -> None:
    done = run_cli(["build", str(site)], ENV)
    assert done.returncode == 0, done.stdout + done.stderr


@dataclass
class Load:
    """Client threads requesting ``/`` until stopped: what each answer was, and when."""

    url: str
    answers: list[tuple[float, float, str]] = field(default_factory=list)  # (sent, received, version)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, index: int) -> None:
        keep_alive = index % 2 == 0
        client = httpx.Client(timeout=10) if keep_alive else None
        try:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    if client is not None:
                        response = client.get(self.url)
                    else:
                        with httpx.Client(timeout=10) as once:  # a new connection each time
                            response = once.get(self.url)
                except httpx.HTTPError as exc:
                    with self.lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                received = time.monotonic()
                match = WHOLE.fullmatch(response.text)
                with self.lock:
                    if response.status_code != 200 or match is None:
                        self.failures.append(f"{response.status_code}: {response.text[:200]!r}")
                    else:
                        self.answers.append((sent, received, match.group(1)))
                time.sleep(0.002)
        finally:
            if client is not None:
                client.close()

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(THREADS)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def wait_for_log(server: Server, text: str, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in server.log():
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not in the log within {timeout} s:\n{server.log()[-3000:]}")


@pytest.fixture(params=["granian", "uvicorn"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    site = tmp_path / "site"
    write_site(site, "A")
    build(site)
    server = Server(site, ENV, server=request.param, extra_args=("--graceful-timeout", "10")).start()
    try:
        yield server
    finally:
        server.stop()


def test_sighup_switches_builds_without_dropping_a_request(served: Server) -> None:
    assert served.proc is not None
    assert served.get("/").status_code == 200
    with Load(served.url + "/") as load:
        time.sleep(1.5)
        write_site(served.site, "B")
        build(served.site)  # while A is served
        time.sleep(1.2)  # past A's revalidate: the old workers regenerate, still A
        hup_at = time.monotonic()
        os.kill(served.proc.pid, signal.SIGHUP)  # the PID we started: pyisr start itself
        ready_at = wait_for_log(served, "new workers ready")
        time.sleep(3)
    assert not load.failures, f"{len(load.failures)} failed requests, e.g. {load.failures[:3]}"
    before = [version for sent, received, version in load.answers if received < hup_at]
    after = [version for sent, received, version in load.answers if sent > ready_at + OVERLAP]
    assert before and set(before) == {"A"}, set(before)
    assert after and set(after) == {"B"}, set(after)
    assert len(load.answers) > 500  # the load really ran through the switch
    assert served.proc.poll() is None
    assert "pid" in served.log() and "retiring" in served.log()


def test_a_new_generation_that_cannot_start_leaves_the_old_one_serving(served: Server) -> None:
    assert served.proc is not None
    build_ok = served.get("/")
    assert WHOLE.fullmatch(build_ok.text)
    # The site's code broken after its build: a new worker cannot load it.
    (served.site / "app" / "page.py").write_text("raise RuntimeError('broken deploy')\n")
    with Load(served.url + "/") as load:
        time.sleep(0.5)
        os.kill(served.proc.pid, signal.SIGHUP)
        wait_for_log(served, "the running ones keep serving")
        time.sleep(1)
    assert not load.failures, load.failures[:3]
    assert {version for _, _, version in load.answers} == {"A"}
    assert served.proc.poll() is None


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_a_worker_that_dies_is_started_again(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_site(site, "A")
    build(site)
    server = Server(site, ENV, server="granian").start()
    try:
        assert server.proc is not None
        (worker,) = children(server.proc.pid)
        os.kill(worker, signal.SIGKILL)  # a worker of the server this test started
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            alive = [pid for pid in children(server.proc.pid) if pid != worker]
            if alive:
                try:
                    if WHOLE.fullmatch(httpx.get(server.url + "/", timeout=5).text):
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"no worker serves again:\n{server.log()[-2000:]}")
        assert "exited" in server.log() and server.proc.poll() is None
    finally:
        server.stop()
