"""The process that ``pyisr start`` runs: it owns the listening socket and the workers.

Why its own supervisor rather than uvicorn's or granian's: a deploy is ``pyisr build SITE
&& kill -HUP <pid>``, and it must drop no request. Measured on the installed versions,
under 8 client threads: uvicorn's SIGHUP (workers > 1 only) starts a new worker and waits
for it, but its old worker closes idle keep-alive connections at once (4 failed requests
in 6 reloads); granian's waits a fixed 3.5 s, gives each worker its own SO_REUSEPORT
socket whose queued connections are reset when it exits, and exits altogether if a new
worker fails to start (2 failed requests in 6 reloads). Here:

- one listening socket, bound once, shared by every worker of every generation: it is
  never closed while the server runs, so no connection is ever refused or reset;
- SIGHUP starts a new generation of workers (fresh interpreters: the site's current
  build and code), waits until each says it is ready, then retires the old ones: they
  stop accepting, answer what they are answering and close their connections between
  two requests (``Connection: close``), then exit. If a new worker fails to start, the
  old generation keeps serving and the error is logged;
- SIGTERM or SIGINT stop every worker with its server's graceful shutdown;
- a worker that dies is started again (at most once a second per worker);
- the workers write their metrics (pyisr/metrics.py) to a private directory made for the
  run (``PROMETHEUS_MULTIPROC_DIR``): a worker that exits has its gauges dropped, and the
  directory is removed when the server stops.

Workers are ``python -m pyisr.server.worker`` (see that module), in this process's
process group, so signalling the group reaches them all.

This module uses the standard library only: ``pyisr start`` checks the site, binds the
socket, forks the first workers (they start from what it has loaded: no second interpreter
start-up to wait for), then replaces itself (``exec``: the same PID, the one to
``kill -HUP``) with ``python -I supervisor.py``, an interpreter that imports nothing of
pyisr's, so the supervisor holds ~13 MB instead of the ~45 MB of a process that loaded
pyisr and the site. It adopts those first workers (``exec`` keeps children).
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

logger = logging.getLogger("pyisr.supervisor")

#: The supervisor's settings (JSON: host, port, workers, worker), set by ``pyisr start``.
SUPERVISOR_ENV = "PYISR_SUPERVISOR"
#: A worker's settings (JSON: ``pyisr.server.worker.WorkerSpec``), set for each worker.
WORKER_ENV = "PYISR_WORKER"

#: prometheus_client's multi-process directory (pyisr/metrics.py): where every worker's
#: metrics are written, so the one answering a scrape adds them all up.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: ``<pid>:<directory>``: the directory the server of that PID made for its run (and removes).
OWN_METRICS_DIR_ENV = "PYISR_METRICS_DIR"

#: How long a new worker may take to load the site and report ready.
STARTUP_TIMEOUT = 120.0
#: Beyond its graceful timeout, how long a retiring worker gets before SIGKILL.
KILL_MARGIN = 5.0
#: A worker that died is not started again sooner than this after its last start.
RESPAWN_INTERVAL = 1.0


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket every worker inherits (address reuse, but not SO_REUSEPORT:
    one socket, one queue, shared by all)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def prepare_metrics_dir() -> str:
    """The run's directory for the workers' metrics, made fresh and private (0700) on the first
    call and exported (``PROMETHEUS_MULTIPROC_DIR``) before any worker starts, so each
    imports ``prometheus_client`` in multi-process mode. ``pyisr start`` calls it before it
    forks its first workers; the supervisor (the same PID) finds it again.

    Never one left from another run, nor one the environment named: values of workers
    that are gone would be added to this run's.
    """
    pid, _, owned = os.environ.get(OWN_METRICS_DIR_ENV, "").partition(":")
    if pid == str(os.getpid()) and os.path.isdir(owned) and os.environ.get(METRICS_DIR_ENV) == owned:
        return owned
    _remove_orphaned_metrics_dirs()
    path = tempfile.mkdtemp(prefix=f"pyisr-metrics-{os.getpid()}-")  # mode 0700
    os.environ[METRICS_DIR_ENV] = path
    os.environ[OWN_METRICS_DIR_ENV] = f"{os.getpid()}:{path}"
    return path


def _remove_orphaned_metrics_dirs() -> None:
    """Directories of this user's earlier runs whose server is gone without removing its own
    (SIGKILL): their PID is in their name."""
    for path in glob.glob(os.path.join(glob.escape(tempfile.gettempdir()), "pyisr-metrics-*-*")):
        pid = os.path.basename(path).split("-")[2]
        try:
            if not pid.isdigit() or os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # alive but not ours to signal, or gone meanwhile


def mark_dead(pid: int, metrics_dir: str | None) -> None:
    """Drop the gauges of a worker that exited (its counters stay: they are totals).

    What ``prometheus_client.multiprocess.mark_process_dead`` does, in the standard library:
    the files of the ``live*`` gauge modes of that PID.
    """
    if metrics_dir:
        for path in glob.glob(os.path.join(glob.escape(metrics_dir), f"gauge_live*_{pid}.db")):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


class Child:
    """A child process this process did not start through ``subprocess``: a worker that
    ``pyisr start`` forked before it became the supervisor (``exec`` keeps children).
    The same ``pid`` / ``poll`` / ``wait`` as :class:`subprocess.Popen`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 0
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode


class Worker:
    """One worker process and the pipe it reports readiness on.

    Started here (``python -m pyisr.server.worker``), or adopted: ``adopt`` is the PID and
    readiness pipe of a worker ``pyisr start`` forked (see :func:`exec_supervisor`).
    """

    def __init__(
        self,
        spec: dict[str, Any],
        listen_fd: int,
        index: int,
        generation: int,
        adopt: tuple[int, int] | None = None,
    ) -> None:
        self.generation = generation
        self.ready = False
        self.started_at = time.monotonic()
        self.retire_deadline: float | None = None
        self.proc: subprocess.Popen[bytes] | Child
        self.ready_pipe: int | None
        if adopt is not None:
            self.proc, self.ready_pipe = Child(adopt[0]), adopt[1]
            return
        read_end, write_end = os.pipe()
        self.ready_pipe = read_end
        spec = {**spec, "listen_fd": listen_fd, "ready_fd": write_end, "index": index}
        env = {**os.environ, WORKER_ENV: json.dumps(spec)}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyisr.server.worker"],
                env=env,
                pass_fds=(listen_fd, write_end),
            )
        finally:
            os.close(write_end)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_ready(self) -> bool | None:
        """After select said the pipe is readable: True ready, False died before ready."""
        assert self.ready_pipe is not None
        try:
            data = os.read(self.ready_pipe, 1)
        except OSError:
            data = b""
        os.close(self.ready_pipe)
        self.ready_pipe = None
        self.ready = data == b"R"
        return self.ready

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def retire(self, graceful_timeout: float) -> None:
        """Finish what it is doing, close its connections between requests, exit.

        A worker still starting has nothing to finish (and ignores SIGUSR1 until it
        serves): it is stopped.
        """
        self.retire_deadline = time.monotonic() + graceful_timeout + KILL_MARGIN
        self.signal(signal.SIGUSR1 if self.ready else signal.SIGTERM)

    def close(self) -> None:
        if self.ready_pipe is not None:
            os.close(self.ready_pipe)
            self.ready_pipe = None


class Supervisor:
    """Run ``workers`` workers on ``host:port`` until stopped; see the module's doc.

    ``spec`` is a worker's settings (``pyisr.server.worker.WorkerSpec`` as a dict, without
    its descriptors): ``server``, ``limits``, ``graceful_timeout``, ``backlog``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        workers: int,
        spec: dict[str, Any],
        *,
        listen_fd: int | None = None,
        adopted: list[tuple[int, int]] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.count = workers
        self.spec = spec
        #: The socket and first workers, when ``pyisr start`` made them (exec_supervisor).
        self._inherited_fd = listen_fd
        self._adopted = list(adopted or [])
        self.server = str(spec["server"])
        self.graceful_timeout = float(spec.get("graceful_timeout", 30.0))
        self.backlog = int(spec.get("backlog", 1024))
        self.listen_fd = -1
        self.generation = 0
        self.current: list[Worker] = []
        self.retiring: list[Worker] = []
        self._stop = False
        self._reload = False
        #: The run's metrics directory (:func:`prepare_metrics_dir`), removed on exit.
        self.metrics_dir: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- signals ------------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload", True))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "_stop", True))

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    # -- the run ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code."""
        _configure_logging()
        if self._inherited_fd is not None:
            sock = socket.socket(fileno=self._inherited_fd)
        else:
            sock = bind(self.host, self.port, self.backlog)
        self.listen_fd = sock.fileno()
        self._install_signals()
        self.metrics_dir = prepare_metrics_dir()
        try:
            self.current = self._start_generation()
            if not self._await_ready(self.current):
                if not self._stop:
                    logger.error("the workers did not start: see the errors above")
                return 0 if self._stop else 1
            logger.warning(
                "ready: %d %s worker(s) on %s:%d; deploy with `pyisr build SITE && kill -HUP %d`",
                self.count,
                self.server,
                self.host,
                self.port,
                os.getpid(),
            )
            while not self._stop:
                self._wait(0.5)
                if self._reload and not self._stop:
                    self._reload = False
                    self._switch()
                self._reap()
            return 0
        finally:
            self._shutdown(sock)

    def _start_generation(self) -> list[Worker]:
        self.generation += 1
        if self._adopted:
            adopted, self._adopted = self._adopted, []
            return [
                Worker(self.spec, self.listen_fd, index, self.generation, adopt=(pid, pipe))
                for index, (pid, pipe) in enumerate(adopted)
            ]
        return [self._spawn(index) for index in range(self.count)]

    def _spawn(self, index: int) -> Worker:
        worker = Worker(self.spec, self.listen_fd, index, self.generation)
        logger.info("started worker %d (pid %d), generation %d", index + 1, worker.pid, self.generation)
        return worker

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal (or ``timeout``), noting workers started again that are ready."""
        starting = {w.ready_pipe: w for w in self.current if w.ready_pipe is not None}
        try:
            readable, _, _ = select.select([self._wake_r, *starting], [], [], timeout)
        except InterruptedError:
            readable = []
        for fd in readable:
            if fd in starting:
                starting[fd].read_ready()
        self._drain_wakeups()

    def _await_ready(self, workers: list[Worker], timeout: float = STARTUP_TIMEOUT) -> bool:
        """Wait until every worker reported ready; False if one died or it took too long."""
        deadline = time.monotonic() + timeout
        pending = {w.ready_pipe: w for w in workers if w.ready_pipe is not None}
        while pending and not self._stop:
            left = deadline - time.monotonic()
            if left <= 0:
                logger.error("new workers not ready after %.0f s", timeout)
                return False
            try:
                readable, _, _ = select.select([self._wake_r, *pending], [], [], min(left, 0.5))
            except InterruptedError:
                continue
            for fd in readable:
                if fd == self._wake_r:
                    self._drain_wakeups()
                    continue
                worker = pending.pop(fd)
                if not worker.read_ready():
                    logger.error("worker pid %d exited before it was ready", worker.pid)
                    return False
        return not pending

    def _switch(self) -> None:
        """SIGHUP: a new generation; once it is ready, the old one retires."""
        logger.warning("SIGHUP: starting %d new worker(s) on the current build", self.count)
        new = self._start_generation()
        if not self._await_ready(new):
            for worker in new:
                worker.signal(signal.SIGKILL)
                worker.proc.wait()
                worker.close()
                mark_dead(worker.pid, self.metrics_dir)
            if not self._stop:
                logger.error("the new workers did not start; the running ones keep serving")
            return
        old, self.current = self.current, new
        for worker in old:
            worker.retire(self.graceful_timeout)
        self.retiring.extend(old)
        logger.warning(
            "new workers ready (pids %s); retiring pids %s",
            ", ".join(str(w.pid) for w in new),
            ", ".join(str(w.pid) for w in old),
        )

    def _reap(self) -> None:
        now = time.monotonic()
        for worker in list(self.retiring):
            if not worker.alive():
                self.retiring.remove(worker)
                mark_dead(worker.pid, self.metrics_dir)
            elif worker.retire_deadline is not None and now > worker.retire_deadline:
                logger.warning("retired worker pid %d did not exit in time: killing it", worker.pid)
                worker.signal(signal.SIGKILL)
        for index, worker in enumerate(self.current):
            if worker.alive() or self._stop:
                continue
            if now - worker.started_at < RESPAWN_INTERVAL:
                continue
            logger.error("worker pid %d exited (%s): starting another", worker.pid, worker.proc.returncode)
            worker.close()
            mark_dead(worker.pid, self.metrics_dir)
            self.current[index] = self._spawn(index)

    def _shutdown(self, sock: socket.socket) -> None:
        """Stop every worker (their servers' graceful shutdown), then the socket."""
        workers = self.current + self.retiring
        for worker in workers:
            worker.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.graceful_timeout + KILL_MARGIN
        for worker in workers:
            try:
                worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.signal(signal.SIGKILL)
                worker.proc.wait()
            worker.close()
        sock.close()
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError as exc:  # pragma: no cover - closed already
                if exc.errno != errno.EBADF:
                    raise


def _configure_logging() -> None:
    """The supervisor's lines on stderr, whatever the servers do with their own loggers."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pyisr[%(process)d]: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if os.environ.get("PYISR_DEBUG_SERVER") else logging.WARNING)
        logger.propagate = False


def exec_supervisor(
    host: str,
    port: int,
    workers: int,
    spec: dict[str, Any],
    *,
    sock: socket.socket | None = None,
    started: list[tuple[int, int]] | None = None,
) -> None:
    """Replace this process (same PID) with a lean interpreter running :func:`main`.

    ``sock`` and ``started`` (PID and readiness pipe of each worker) hand over a socket
    this process bound and the first workers it forked: they are kept across ``exec``,
    and the supervisor adopts them instead of starting its first generation itself.
    """
    settings: dict[str, Any] = {"host": host, "port": port, "workers": workers, "worker": spec}
    if sock is not None:
        sock.set_inheritable(True)
        settings["listen_fd"] = sock.fileno()
    if started:
        for _, pipe in started:
            os.set_inheritable(pipe, True)
        settings["adopted"] = [list(pair) for pair in started]
    os.environ[SUPERVISOR_ENV] = json.dumps(settings)
    sys.stdout.flush()
    sys.stderr.flush()
    # -I: no PYTHONPATH, user site or script directory; the standard library is all it needs.
    os.execv(sys.executable, [sys.executable, "-I", os.path.abspath(__file__)])


def main() -> int:
    settings = json.loads(os.environ.pop(SUPERVISOR_ENV))
    supervisor = Supervisor(
        settings["host"],
        settings["port"],
        settings["workers"],
        settings["worker"],
        listen_fd=settings.get("listen_fd"),
        adopted=[(int(pid), int(pipe)) for pid, pipe in settings.get("adopted", [])],
    )
    try:
        return supervisor.run()
    except OSError as exc:  # the address is taken, or not ours to bind
        print(f"pyisr: cannot listen on {settings['host']}:{settings['port']}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
