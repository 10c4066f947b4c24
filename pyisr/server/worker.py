"""A worker process of ``pyisr start``: ``python -m pyisr.server.worker``.

Started by the supervisor (``pyisr/server/supervisor.py``) on SIGHUP as a fresh
interpreter, so it loads the site's build that is current *now* (``.pyisr/BUILD_ID``) and
the site's code as it is on disk now: that is what makes ``kill -HUP`` a deploy (the
first workers are forked by ``pyisr start`` itself: :func:`fork_workers`). It inherits
the listening socket and the write end of a pipe; it writes one byte to the pipe once its
application has started and it accepts connections, which is what the supervisor waits
for before it retires the workers this one replaces. Its settings arrive as JSON in ``PYISR_WORKER``
(:class:`WorkerSpec`); the site's own settings in ``PYISR_*`` as for any pyisr process.

Signals: SIGUSR1 retires it (stop accepting, finish and close every connection, exit);
SIGTERM or SIGINT stop it with the server's own graceful shutdown.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pyisr.server.limits import HTTPLimits
from pyisr.server.supervisor import WORKER_ENV, prepare_metrics_dir

SERVERS = ("granian", "uvicorn")


@dataclass(frozen=True)
class WorkerSpec:
    """How to run one worker: which server, its limits, and the descriptors it inherits."""

    server: str
    listen_fd: int
    ready_fd: int
    limits: HTTPLimits = field(default_factory=HTTPLimits)
    graceful_timeout: float = 30.0
    index: int = 0
    backlog: int = 1024

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "limits": self.limits.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        data["limits"] = HTTPLimits.from_dict(data["limits"])
        return cls(**data)


def ready_notifier(fd: int) -> Callable[[], None]:
    """Report readiness once, by writing one byte to the supervisor's pipe and closing it."""
    state = {"open": True}

    def ready() -> None:
        if state["open"]:
            state["open"] = False
            try:
                os.write(fd, b"R")
            finally:
                os.close(fd)

    return ready


def run(spec: WorkerSpec) -> None:
    """Serve with ``spec.server`` until retired or stopped."""
    ready = ready_notifier(spec.ready_fd)
    if spec.server == "granian":
        from pyisr.server import granian_worker

        granian_worker.serve(
            spec.listen_fd,
            spec.limits,
            spec.graceful_timeout,
            ready,
            index=spec.index,
            backlog=spec.backlog,
        )
    elif spec.server == "uvicorn":
        from pyisr.server import uvicorn_http

        uvicorn_http.serve(spec.listen_fd, spec.limits, spec.graceful_timeout, ready)
    else:
        raise ValueError(f"unknown server {spec.server!r}: one of {', '.join(SERVERS)}")


def fork_workers(spec: WorkerSpec, count: int) -> list[tuple[int, int]]:
    """Fork ``count`` workers of ``spec`` from this process; their PIDs and readiness pipes.

    What ``pyisr start`` does for its first workers, before it becomes the supervisor: a
    forked worker starts from the modules this process has imported and the site it has
    checked, which saves a second interpreter start-up. (Workers of later generations are
    fresh interpreters: a deploy may change the code.) Only safe while this process runs
    one thread, which the caller checks.
    """
    prepare_metrics_dir()  # before the fork: every worker writes its metrics there
    sys.stdout.flush()
    sys.stderr.flush()
    started: list[tuple[int, int]] = []
    for index in range(count):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: serve, then leave without the parent's exit handlers
            code = 1
            try:
                for _, pipe in started:
                    os.close(pipe)
                os.close(read_end)
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)
                run(replace(spec, ready_fd=write_end, index=index))
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported, then the worker exits
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        started.append((pid, read_end))
    return started


def main() -> int:
    text = os.environ.get(WORKER_ENV)
    if not text:
        print(f"{WORKER_ENV} is not set: workers are started by `pyisr start`", file=sys.stderr)
        return 2
    # Until the server takes it over once serving, a retirement has nothing to drain.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    run(WorkerSpec.from_json(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
