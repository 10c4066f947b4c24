"""External tools the benchmarks drive: wrk, nginx, granian, py-spy, redis-server.

Each ``ensure_*`` finds the tool, installs it if it is missing and installing is allowed
(``apt-get install -y wrk nginx`` as root, ``pip install granian`` into this
interpreter), and otherwise raises :class:`~bench.common.Skip` with a message saying
exactly what is missing and how to get it. Every process started here listens on
127.0.0.1 only and is stopped by its PID.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import Skip, first_line, free_port, log

SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def nginx_version() -> str | None:
    path = which("nginx")
    line = first_line([path, "-v"]) if path else None
    return line.split("/", 1)[-1] if line else None


def wrk_version() -> str | None:
    path = which("wrk")
    line = first_line([path, "-v"]) if path else None
    return line.split()[1] if line and len(line.split()) > 1 else line


def _apt_install(packages: list[str]) -> str | None:
    """Install Debian packages; returns None on success, else why it failed."""
    apt = which("apt-get")
    if apt is None:
        return "apt-get is not available on this machine"
    prefix: list[str] = []
    if os.geteuid() != 0:
        sudo = which("sudo")
        if sudo is None:
            return "not root and no sudo: cannot run apt-get"
        prefix = [sudo, "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = prefix + [apt, "install", "-y", "-q", "--no-install-recommends", *packages]
    log(f"installing {' '.join(packages)} with apt-get ...")
    try:
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            subprocess.run(prefix + [apt, "update", "-q"], capture_output=True, env=env, timeout=600)
            done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    except subprocess.TimeoutExpired:
        return "apt-get timed out"
    if done.returncode != 0:
        return f"apt-get install failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return None


def _ensure_debian(binary: str, package: str, install: bool) -> str:
    path = which(binary)
    if path:
        return path
    if not install:
        raise Skip(f"{binary} not found (install it: apt-get install -y {package}; --no-install was given)")
    why = _apt_install([package])
    path = which(binary)
    if path is None:
        raise Skip(
            f"{binary} not found and could not be installed ({why or 'unknown reason'}); "
            f"install it by hand: apt-get install -y {package}"
        )
    return path


def ensure_wrk(install: bool = True) -> str:
    return _ensure_debian("wrk", "wrk", install)


def ensure_nginx(install: bool = True) -> str:
    return _ensure_debian("nginx", "nginx", install)


def ensure_granian(install: bool = True) -> None:
    """granian importable by this interpreter (``pyisr start --server granian`` runs under it)."""
    if importlib.util.find_spec("granian") is not None:
        return
    if not install:
        raise Skip("granian is not installed (pip install granian; --no-install was given)")
    log("installing granian with pip ...")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "granian"], capture_output=True, text=True, timeout=600
    )
    importlib.invalidate_caches()
    if done.returncode != 0 or importlib.util.find_spec("granian") is None:
        raise Skip(f"granian is not installed and pip failed: {done.stderr.strip()[-300:]}")


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


# -- wrk ----------------------------------------------------------------------------------

#: Prints wrk's own numbers as one JSON line (latencies in microseconds).
WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"""


class WrkTimeout(RuntimeError):
    pass


@dataclass
class WrkResult:
    url: str
    rps: float
    requests: int
    errors: dict[str, int]
    latency_ms: dict[str, float]

    def as_row(self) -> dict[str, Any]:
        return {
            "rps": self.rps,
            "requests": self.requests,
            "errors": sum(self.errors.values()),
            **{f"{k}_ms": v for k, v in self.latency_ms.items()},
        }


def run_wrk(
    wrk: str,
    url: str,
    *,
    duration: float,
    connections: int = 50,
    threads: int = 2,
    script_dir: Path,
    headers: Mapping[str, str] | None = None,
) -> WrkResult:
    """``wrk -tT -cC -dDs --latency [-H 'name: value'] URL``, bounded by its duration (plus a
    hard timeout). ``headers``: sent with every request (``Accept-Encoding: br``: the edge)."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"load tests only target 127.0.0.1, not {url}")
    script = script_dir / "report.lua"
    if not script.exists():
        script.write_text(WRK_LUA)
    args = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        *[arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")],
        url,
    ]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired as exc:  # run() has killed it
        raise WrkTimeout(
            f"wrk did not finish a {duration:.0f}s run within {duration + 30:.0f}s "
            "(the machine is overloaded?)"
        ) from exc
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")
    data = json.loads(line[len("WRKJSON ") :])
    seconds = data["duration_us"] / 1e6
    lat = {k: round(v / 1000, 3) for k, v in data["latency_us"].items()}
    rps = data["requests"] / seconds if seconds else 0.0
    return WrkResult(url, rps, data["requests"], data["errors"], lat)


# -- nginx --------------------------------------------------------------------------------

NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    types {{ text/html html; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


class _Background:
    """A server in its own process group, started by a subclass, stopped by its PID."""

    url: str
    proc: subprocess.Popen[bytes] | None

    def _wait_until_up(self, what: str, log_path: Path, timeout: float) -> None:
        """Until it answers HTTP on ``url``; raises with the end of its log if it exits."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited: {log_path.read_text()[-2000:]}")
            try:
                httpx.get(self.url + "/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{what} did not start")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


class Nginx(_Background):
    """nginx with a generated config: 1 worker, daemon off, access_log off, on 127.0.0.1:PORT."""

    def __init__(self, binary: str, root: Path, prefix: Path) -> None:
        self.binary = binary
        self.root = root
        self.prefix = prefix
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        user = ""
        if os.geteuid() == 0:
            # As root nginx would switch its worker to "nobody"; keep the current user instead.
            import grp
            import pwd

            user = f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};\n"
        conf = self.prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user=user, prefix=self.prefix, port=self.port, root=self.root))
        log_file = open(self.prefix / "stderr.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.prefix), "-c", str(conf), "-e", str(self.prefix / "error.log")],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        self._wait_until_up("nginx", self.prefix / "stderr.log", 15)
        return self


# -- a raw app: the ceiling of a cached page in Python ----------------------------------------


class Ceiling(_Background):
    """``bench.ceiling`` (a fixed page, no logic) under uvicorn (ASGI) or granian (RSGI), 1 worker."""

    def __init__(self, server: str, log_dir: Path) -> None:
        self.server = server
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"ceiling-{server}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Ceiling:
        if self.server == "uvicorn":
            args = [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.ceiling:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
                "--log-level",
                "warning",
            ]
        else:
            args = [
                sys.executable,
                "-m",
                "granian",
                "--interface",
                "rsgi",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--no-ws",
                "bench.ceiling:rsgi_app",
            ]
        from bench.common import clean_env

        log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            args,
            env=clean_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        log_file.close()
        self._wait_until_up("ceiling app", self.log_path, 30)
        return self


# -- py-spy -------------------------------------------------------------------------------


@contextmanager
def profiling(pid: int, out: Path | None, name: str, duration: float) -> Iterator[None]:
    """Record ``pid`` (and its children) with py-spy while the body runs, if asked and available."""
    spy = py_spy() if out is not None else None
    if out is None or spy is None:
        if out is not None:
            log("py-spy not found (pip install py-spy): no profile")
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    name = name.strip().replace(" ", "-")
    procs = []
    for fmt, suffix in (("flamegraph", "svg"), ("raw", "txt")):
        target = out / f"{name}.{suffix}"
        procs.append(
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--subprocesses",
                    "--nonblocking",
                    "-r",
                    "200",
                    "-d",
                    str(max(1, int(duration))),
                    "-f",
                    fmt,
                    "-o",
                    str(target),
                    "-p",
                    str(pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    try:
        yield
    finally:
        for proc in procs:
            try:
                proc.wait(timeout=duration + 20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log(f"profile written to {out / (name + '.svg')} (collapsed stacks: {name}.txt)")
        raw = out / f"{name}.txt"
        if raw.exists():
            for line in summarize_stacks(raw):
                log("  " + line)


def _frame(raw: str) -> str:
    """``func (/long/path/pyisr/server/app.py:123)`` -> ``func (pyisr/server/app.py)``."""
    name, sep, where = raw.partition(" (")
    if not sep:
        return raw
    parts = where.rstrip(")").rsplit(":", 1)[0].split("/")
    if "pyisr" in parts:
        parts = parts[len(parts) - 1 - parts[::-1].index("pyisr") :]
    else:
        parts = parts[-2:]
    return f"{name} ({'/'.join(parts)})"


def summarize_stacks(path: Path, top: int = 12) -> list[str]:
    """The functions with most samples (self and inclusive) in py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples; top self time:"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    lines.append("top inclusive, pyisr frames:")
    mine = [(f, c) for f, c in inclusive.items() if "(pyisr/" in f]
    for frame, count in sorted(mine, key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    return lines


# -- redis --------------------------------------------------------------------------------


class RedisServer:
    """A throw-away ``redis-server`` on a free 127.0.0.1 port (no persistence)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        args = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        time.sleep(0.3)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None
