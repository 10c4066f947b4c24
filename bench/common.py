"""Shared pieces of the benchmarks: run context, servers, process memory, results and tables."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PYISR = [sys.executable, "-m", "pyisr.cli"]
#: Order of the scenarios in ``all`` and in summary.md.
SCENARIOS = ("hit", "stale", "herd", "build", "build-blog", "memory", "invalidate", "redis", "abuse", "edge")


class Skip(Exception):
    """A scenario (or one row of it) cannot run here; the message says why."""


@dataclass
class Context:
    """What one ``python -m bench`` run was asked for."""

    quick: bool = False
    out: Path = RESULTS
    install: bool = True
    profile: Path | None = None
    keep: bool = False
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pyisr-bench-")))

    def scratch(self, name: str) -> Path:
        """A fresh directory for one scenario's sites and logs (inside the run's temp dir)."""
        path = self.tmp / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- numbers ------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of ``values`` (``p`` in 0..100), ``None`` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(round(p / 100 * len(ordered) + 0.4999999)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fmt_cell(value: Any, kind: str | None) -> str:
    if kind == "pct" and isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.0%}"
    if kind == "x" and isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.2f}x"
    return fmt(value)


def markdown_table(columns: Sequence[Sequence[str]], rows: Iterable[Mapping[str, Any]]) -> str:
    """``columns`` = (key, header[, kind]) tuples, kind "pct" or "x"; a GitHub markdown table."""
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt_cell(row.get(c[0]), c[2] if len(c) > 2 else None) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- machine ------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def first_line(args: list[str]) -> str | None:
    """The first line a command prints (stdout, then stderr), or ``None`` if it cannot run."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else None


def git_revision() -> str | None:
    rev = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if rev is None or " " in rev:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return rev + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    from bench import tools

    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) // 1024
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "memory_mb": mem_total,
        "loadavg": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyisr": _version("pyisr"),
        "git": git_revision(),
        "uvicorn": _version("uvicorn"),
        "granian": _version("granian"),
        "starlette": _version("starlette"),
        "uvloop": _version("uvloop"),
        "httptools": _version("httptools"),
        "nginx": tools.nginx_version(),
        "wrk": tools.wrk_version(),
    }


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def status_kb(pid: int, field_name: str) -> int | None:
    """A ``VmRSS``/``VmHWM``-style field of /proc/<pid>/status, in kB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for pyisr subprocesses: no inherited ``PYISR_*`` settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYISR_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    if extra:
        env.update(extra)
    return env


class PyisrServer:
    """A ``pyisr start`` subprocess on 127.0.0.1, stopped by its PID (its own process group)."""

    def __init__(
        self,
        site: Path,
        *,
        server: str = "uvicorn",
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.site = site
        self.server = server
        self.workers = workers
        self.extra_args = list(extra_args)
        self.env = clean_env(env)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = (log_dir or site.parent) / f"{server}-w{workers}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60) -> PyisrServer:
        log_file = open(self.log_path, "ab")
        args = [
            "start",
            str(self.site),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--server",
            self.server,
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            PYISR + args, env=self.env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        log_file.close()
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pyisr start exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/_pyisr/health", timeout=1).status_code in (200, 503):
                    took = time.monotonic() - started
                    if took > 5:
                        log(f"pyisr {self.server} x{self.workers} took {took:.1f}s to start")
                    if self.workers > 1:
                        time.sleep(0.5)  # let the other workers finish starting too
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pyisr start did not answer within {timeout:.0f}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            t0 = time.monotonic()
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group we created, named by our child's PID
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log(f"pyisr {self.server} did not stop within 15s of SIGTERM: killing it")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            if time.monotonic() - t0 > 3:
                log(f"stopping pyisr {self.server} took {time.monotonic() - t0:.1f}s")
        self.proc = None

    def __enter__(self) -> PyisrServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def memory_kb(self) -> dict[str, int]:
        """VmRSS / VmHWM summed over the server's process tree (kB), and the process count."""
        pids = process_tree(self.pid)
        rss = sum(status_kb(p, "VmRSS") or 0 for p in pids)
        hwm = sum(status_kb(p, "VmHWM") or 0 for p in pids)
        return {"rss_kb": rss, "hwm_kb": hwm, "processes": len(pids)}


def run_build(
    site: Path, env: Mapping[str, str] | None = None, timeout: float = 900, log_path: Path | None = None
) -> dict[str, Any]:
    """``pyisr build SITE`` as a child: wall time, exit code and the child's peak RSS (``wait4``)."""
    log_path = log_path or site.parent / "build.log"
    with open(log_path, "wb") as log_file:
        started = time.perf_counter()
        proc = subprocess.Popen(
            PYISR + ["build", str(site)],
            env=clean_env(env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timer = _Killer(proc.pid, timeout)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"pyisr build {site} failed ({proc.returncode}):\n{output[-3000:]}")
    reported = None
    for line in output.splitlines():
        if line.startswith("Built ") and "pages in" in line:
            reported = float(line.split(" in ")[1].split("s")[0])
    return {
        "wall_s": wall,
        "reported_s": reported,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "timed_out": timer.fired,
    }


class _Killer:
    """Kill one PID's process group after ``timeout`` seconds unless cancelled."""

    def __init__(self, pid: int, timeout: float) -> None:
        import threading

        self.fired = False
        self.pid = pid
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


# -- results ------------------------------------------------------------------------------


class Report:
    """One scenario's results: rows for the table, targets, notes; written as JSON + summary.md."""

    def __init__(self, scenario: str, ctx: Context, params: Mapping[str, Any], title: str) -> None:
        self.scenario = scenario
        self.ctx = ctx
        self.title = title
        self.params = dict(params)
        self.columns: Any = []  # [(key, header[, kind])] or {table: [...]}
        self.rows: list[dict[str, Any]] = []
        self.targets: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        self.skipped: str | None = None
        self.started = time.time()
        self.machine = machine_info()

    def row(self, **values: Any) -> dict[str, Any]:
        self.rows.append(values)
        return values

    def target(self, name: str, goal: str, value: Any, met: bool | None) -> None:
        """``met`` None means it could not be measured in this run."""
        self.targets.append({"target": name, "goal": goal, "value": value, "met": met})

    def note(self, text: str) -> None:
        self.notes.append(text)
        log(text)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "title": self.title,
            "quick": self.ctx.quick,
            "started_at": _dt.datetime.fromtimestamp(self.started, _dt.UTC).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.started, 1),
            "machine": self.machine,
            "params": self.params,
            "skipped": self.skipped,
            "columns": self.columns,
            "rows": self.rows,
            "targets": self.targets,
            "notes": self.notes,
            **self.extra,
        }

    def markdown(self) -> str:
        return render_markdown(self.to_json())

    def write(self) -> Path:
        self.ctx.out.mkdir(parents=True, exist_ok=True)
        path = self.ctx.out / f"{self.scenario}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        os.replace(tmp, path)
        write_summary(self.ctx.out)
        print()
        print(self.markdown())
        print(flush=True)
        log(f"wrote {path}")
        return path


def _met_word(met: bool | None) -> str:
    return "–" if met is None else ("**met**" if met else "**not met**")


def render_markdown(data: Mapping[str, Any]) -> str:
    lines = [f"### {data['scenario']}: {data['title']}", ""]
    machine = data.get("machine", {})
    lines.append(
        f"_{data.get('started_at')}, {data.get('duration_s')} s, {machine.get('cores')} cores, "
        f"load {', '.join(f'{x:.1f}' for x in machine.get('loadavg', []))}, python {machine.get('python')}, "
        f"git {machine.get('git')}{', quick run' if data.get('quick') else ''}_"
    )
    lines.append("")
    if data.get("skipped"):
        lines += [f"skipped: {data['skipped']}", ""]
    columns = data.get("columns")
    if data.get("rows") and isinstance(columns, dict):  # several tables: rows name theirs in "table"
        for name, cols in columns.items():
            rows = [r for r in data["rows"] if r.get("table") == name]
            if rows:
                lines += [f"{name}:", "", markdown_table(cols, rows), ""]
    elif data.get("rows"):
        lines += [markdown_table(columns, data["rows"]), ""]
    if data.get("targets"):
        lines.append(
            markdown_table(
                [("target", "target"), ("goal", "goal"), ("value", "measured"), ("met", "met")],
                [{**t, "met": _met_word(t["met"])} for t in data["targets"]],
            )
        )
        lines.append("")
    for note in data.get("notes", []):
        lines.append(f"- {note}")
    if data.get("notes"):
        lines.append("")
    return "\n".join(lines)


def write_summary(out: Path) -> Path:
    """``summary.md``: every scenario's latest JSON in ``out``, in suite order."""
    parts = [
        "# pyisr benchmark results",
        "",
        "Generated by `python -m bench` from the JSON files beside this one.",
        "",
    ]
    targets: list[dict[str, Any]] = []
    sections = []
    for name in SCENARIOS:
        path = out / f"{name}.json"
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        sections.append(render_markdown(data))
        for t in data.get("targets", []):
            targets.append({"scenario": name, **t, "met": _met_word(t["met"])})
        if data.get("skipped"):
            targets.append(
                {"scenario": name, "target": "–", "goal": "–", "value": data["skipped"], "met": "skipped"}
            )
    if targets:
        parts += [
            "## Targets",
            "",
            markdown_table(
                [
                    ("scenario", "scenario"),
                    ("target", "target"),
                    ("goal", "goal"),
                    ("value", "measured"),
                    ("met", "met"),
                ],
                targets,
            ),
            "",
        ]
    parts += ["## Scenarios", ""] + sections
    path = out / "summary.md"
    path.write_text("\n".join(parts).rstrip() + "\n")
    if out.resolve() == RESULTS.resolve():
        _update_readme("\n".join(parts[4:]).rstrip())
    return path


README_START = "<!-- latest results: written by python -m bench -->"
README_END = "<!-- end of latest results -->"


def _update_readme(text: str) -> None:
    """Put the latest summary between the markers of bench/README.md (default results folder only)."""
    readme = REPO / "bench" / "README.md"
    try:
        current = readme.read_text()
    except OSError:
        return
    start, end = current.find(README_START), current.find(README_END)
    if start < 0 or end < start:
        return
    body = text.replace("\n## ", "\n#### ").replace("\n### ", "\n##### ")
    if body.startswith("## "):
        body = "#### " + body[3:]
    updated = current[: start + len(README_START)] + "\n\n" + body + "\n\n" + current[end:]
    if updated != current:
        readme.write_text(updated)
