"""A real Varnish (``varnishd`` with varnish-modules' xkey) running the shipped VCL.

Used by ``tests/test_varnish_e2e.py`` and ``python -m bench edge`` (which loads this file
by its path): one place knows how to start Varnish for pyisr. It runs in the foreground
(``-F``) in its own process group, listening on 127.0.0.1 only, with a work directory
of its own (``-n``) and ``deploy/varnish/pyisr.vcl`` pointed at the backend's port; it
is stopped by its PID.

Where Varnish comes from: ``/usr/sbin/varnishd`` (Debian's ``varnish``) and the xkey
vmod (``varnish-modules``). When either is missing, :func:`require_varnish` installs
both with apt-get when it runs as root, else skips the test with the reason; under
``CI=true`` a missing Varnish fails the run instead (a CI job that skips the edge
tests proves nothing about the edge).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
VCL = REPO / "deploy" / "varnish" / "pyisr.vcl"
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
#: The environment variable that holds the purge secret, for varnishd and pyisr alike.
SECRET_ENV = "PYISR_VARNISH_PURGE_SECRET"


def which(name: str) -> str | None:
    """``name`` on PATH or in an sbin directory (varnishd lives in /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def compile_vcl(vcl: Path = VCL) -> subprocess.CompletedProcess[str]:
    """``varnishd -C -f vcl``: compiles the VCL (vmods included) without running anything."""
    varnishd = which("varnishd")
    if varnishd is None:
        raise FileNotFoundError("varnishd is not installed")
    with tempfile.TemporaryDirectory(prefix="pyisr-vcl-") as workdir:
        return subprocess.run(
            # No jail (as in Varnish.start): the compiler runs as the current user.
            [varnishd, "-C", "-j", "none", "-n", str(Path(workdir) / "n"), "-f", str(vcl.resolve())],
            capture_output=True,
            text=True,
            timeout=60,
        )


def missing_reason() -> str | None:
    """Why Varnish for pyisr cannot run here, or ``None`` when it can."""
    if which("varnishd") is None:
        return "varnishd is not installed (apt-get install varnish varnish-modules)"
    done = compile_vcl()
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith(("/*", " *"))]
        detail = " ".join(lines[:3])[:300]
        if "xkey" in done.stderr:
            return f"the xkey vmod is missing (apt-get install varnish-modules): {detail}"
        return f"deploy/varnish/pyisr.vcl does not compile: {detail}"
    return None


def install_varnish() -> str | None:
    """``apt-get install varnish varnish-modules`` when root; None on success, else why not."""
    apt = which("apt-get")
    if apt is None or os.geteuid() != 0:
        return "not root with apt-get: cannot install varnish varnish-modules"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = [apt, "install", "-y", "-q", "--no-install-recommends", "varnish", "varnish-modules"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            subprocess.run([apt, "update", "-q"], capture_output=True, env=env, timeout=600)
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    except subprocess.TimeoutExpired:
        return "apt-get timed out"
    if done.returncode != 0:
        return f"apt-get install failed: {(done.stderr or done.stdout).strip()[-300:]}"
    return None


def require_varnish() -> None:
    """Return when Varnish and xkey can run; else install them (root), skip, or fail under CI."""
    import pytest

    reason = missing_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason} (CI=true: the Varnish tests must not be skipped)", pytrace=False)
    why_not = install_varnish()
    reason = missing_reason()
    if reason is None:
        return
    pytest.skip(f"{reason}; {why_not or 'installing it did not help'}")


def vcl_for_backend(port: int, vcl: Path = VCL) -> str:
    """The shipped VCL with its backend (``pyisr``, 127.0.0.1:3000) on ``port``."""
    text = vcl.read_text()
    backend = re.compile(r'(backend pyisr \{[^}]*?\.port = ")\d+(";)', re.S)
    changed, count = backend.subn(rf"\g<1>{port}\g<2>", text)
    if count != 1:
        raise ValueError(f'{vcl}: no `backend pyisr {{ .port = "..."; }}` to point at port {port}')
    return changed


class Varnish:
    """``varnishd -F`` on 127.0.0.1:``port`` in front of 127.0.0.1:``backend_port``."""

    def __init__(
        self,
        backend_port: int,
        workdir: Path,
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        storage: str = "malloc,256m",
        params: Mapping[str, str] | None = None,
    ) -> None:
        self.backend_port = backend_port
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.storage = storage
        self.params = dict(params or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "varnishd.log"
        self.vcl_path = workdir / "pyisr.vcl"
        self.instance = workdir / "instance"

    def start(self, timeout: float = 30) -> Varnish:
        varnishd = which("varnishd")
        if varnishd is None:
            raise FileNotFoundError("varnishd is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.vcl_path.write_text(vcl_for_backend(self.backend_port))
        args = [
            varnishd,
            "-F",
            "-n",
            str(self.instance),
            "-a",
            f"127.0.0.1:{self.port}",
            "-T",
            "none",
            # No jail: run as the current user, so it reads the work directory it was given.
            "-j",
            "none",
            "-f",
            str(self.vcl_path),
            "-s",
            self.storage,
        ]
        for name, value in self.params.items():
            args += ["-p", f"{name}={value}"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"varnishd exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                # A PURGE naming no keys is answered by the VCL itself (400): up, whatever the backend.
                if httpx.request("PURGE", self.url + "/", timeout=1).status_code in (400, 403):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"varnishd did not start:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Its own process group: the manager and its child, signalled by the manager's PID.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def counters(self, *names: str) -> dict[str, int]:
        """Counters of ``varnishstat`` (``MAIN.backend_req``: requests sent to pyisr)."""
        varnishstat = which("varnishstat")
        if varnishstat is None:
            raise FileNotFoundError("varnishstat is not installed")
        args = [varnishstat, "-n", str(self.instance), "-1", "-j"]
        for name in names:
            args += ["-f", name]
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=True)
        data = json.loads(done.stdout)
        found = data.get("counters", data)  # varnishstat 7 nests them under "counters"
        return {name: int(found[name]["value"]) for name in names if name in found}

    def backend_requests(self) -> int:
        """Requests Varnish has sent to pyisr so far (fetches and passes)."""
        return self.counters("MAIN.backend_req").get("MAIN.backend_req", 0)


class Link:
    """A TCP link from 127.0.0.1:``port`` to 127.0.0.1:``target``, cut and restored at will.

    What a test puts between pyisr and Varnish to take Varnish out of pyisr's reach
    without losing what Varnish holds (a restarted Varnish starts empty, and a purge
    that arrives late would then prove nothing).
    """

    def __init__(self, target: int, port: int | None = None) -> None:
        self.target = target
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> Link:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        """Refuse new connections and close the open ones (pooled keep-alive ones included)."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, set()
        for sock in [listener, *sockets]:
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            # Either side closing ends both directions: the other pump sees it and stops.
            with self._lock:
                self._open -= {source, sink}
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
