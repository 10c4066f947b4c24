"""hit: a hot cached page under wrk, pyisr (uvicorn, granian; 1 worker) against nginx (1 worker).

All servers run at once and wrk visits them in turn, each round in a different order,
so they share the machine's conditions; the median run (by req/s) of each is reported
with its latencies. The same HTML file pyisr serves is what nginx serves. A raw app
with pyisr's response bytes (bench/ceiling.py: ASGI under uvicorn, RSGI under granian)
shows each server's ceiling in the same run.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from bench import sites, tools
from bench.common import Context, PyisrServer, Report, Skip, log, run_build

PATH = "/hit/1"


def settings(ctx: Context) -> dict[str, Any]:
    return {
        "duration_s": 3 if ctx.quick else 8,
        "runs": 1 if ctx.quick else 3,
        "warmup_s": 1,
        "connections": 50,
        "wrk_threads": 2,
        "workers": 1,
        "path": PATH,
        "ceiling": not ctx.quick,
    }


def measure(
    ctx: Context, report: Report, work: Path, env: Mapping[str, str] | None = None, label: str = ""
) -> None:
    """Run the hit comparison and add its rows and targets to ``report``."""
    cfg = settings(ctx)
    report.params.update({f"{label}hit_{k}" if label else k: v for k, v in cfg.items()})
    wrk = tools.ensure_wrk(ctx.install)
    nginx_bin: str | None
    try:
        nginx_bin = tools.ensure_nginx(ctx.install)
    except Skip as exc:
        nginx_bin = None
        report.note(f"no nginx row: {exc}")
    servers = ["uvicorn"]
    try:
        tools.ensure_granian(ctx.install)
        servers.append("granian")
    except Skip as exc:
        report.note(f"no granian row: {exc}")

    site = sites.hit_site(work / "site")
    build = run_build(site, env)
    log(f"built the hit site in {build['wall_s']:.1f}s")

    targets: list[tuple[str, Any]] = []  # (name, object with .url/.stop/.pid)
    started: list[Any] = []
    try:
        for server in servers:
            srv = PyisrServer(site, server=server, workers=1, env=env, log_dir=work).start()
            started.append(srv)
            targets.append((f"pyisr {server}", srv))
        first = started[0]
        body = httpx.get(first.url + PATH).content
        if nginx_bin is not None:
            www = work / "www"
            cached = site / ".pyisr" / "cache" / "entries" / "hit" / "1.html"
            (www / "hit").mkdir(parents=True)
            if cached.exists():
                shutil.copyfile(cached, www / "hit" / "1.html")
            else:  # another cache handler (Redis): serve the bytes pyisr answers
                (www / "hit" / "1.html").write_bytes(body)
            ng = tools.Nginx(nginx_bin, www, work / "nginx").start()
            started.append(ng)
            targets.insert(0, ("nginx", ng))
        if cfg["ceiling"]:
            for server in servers:
                try:
                    ceiling = tools.Ceiling(server, work).start()
                except RuntimeError as exc:
                    report.note(f"ceiling app under {server} did not start: {exc}")
                    continue
                started.append(ceiling)
                interface = "RSGI" if server == "granian" else "ASGI"
                targets.append((f"raw {interface} {server} (ceiling)", ceiling))

        for name, srv in targets:
            path = "/hit/1.html" if name == "nginx" else PATH
            response = httpx.get(srv.url + path)
            if response.status_code != 200:
                raise RuntimeError(f"{name} answered {response.status_code} for {path}")
            if name.startswith("pyisr") and response.headers.get("x-pyisr-cache") != "HIT":
                raise RuntimeError(f"{name}: {PATH} is not a HIT: {response.headers}")
            log(f"{name}: {srv.url}{path} {len(response.content)} bytes")
            try:
                tools.run_wrk(
                    wrk,
                    srv.url + path,
                    duration=cfg["warmup_s"],
                    connections=cfg["connections"],
                    threads=cfg["wrk_threads"],
                    script_dir=work,
                )
            except tools.WrkTimeout as exc:
                report.note(f"warm-up of {name}: {exc}")

        results: dict[str, list[tools.WrkResult]] = {name: [] for name, _ in targets}
        for run in range(cfg["runs"]):
            order = targets[run % len(targets) :] + targets[: run % len(targets)]
            for name, srv in order:
                path = "/hit/1.html" if name == "nginx" else PATH
                try:
                    result = tools.run_wrk(
                        wrk,
                        srv.url + path,
                        duration=cfg["duration_s"],
                        connections=cfg["connections"],
                        threads=cfg["wrk_threads"],
                        script_dir=work,
                    )
                except tools.WrkTimeout as exc:
                    report.note(f"run {run + 1}, {name}: {exc}; the run is left out")
                    continue
                results[name].append(result)
                lat = result.latency_ms
                log(
                    f"run {run + 1}: {name:28s} {result.rps:9,.0f} req/s  p50 {lat['p50']:.2f} ms"
                    f"  p99 {lat['p99']:.2f} ms  errors {sum(result.errors.values())}"
                )
        if ctx.profile is not None:
            for name, srv in targets:
                if name.startswith("pyisr"):
                    with (
                        tools.profiling(
                            srv.pid, ctx.profile, f"{label}hit-{name.split()[1]}", cfg["duration_s"]
                        ),
                        contextlib.suppress(tools.WrkTimeout),
                    ):
                        tools.run_wrk(
                            wrk,
                            srv.url + PATH,
                            duration=cfg["duration_s"],
                            connections=cfg["connections"],
                            threads=cfg["wrk_threads"],
                            script_dir=work,
                        )
        for name, srv in targets:
            if name.startswith("pyisr"):
                word = httpx.get(srv.url + PATH).headers.get("x-pyisr-cache")
                if word != "HIT":
                    report.note(f"{name}: after the runs {PATH} answered {word}, not HIT")
    finally:
        for srv in started:
            srv.stop()

    medians: dict[str, tools.WrkResult] = {}
    for name, runs in results.items():
        if runs:
            ordered = sorted(runs, key=lambda r: r.rps)
            medians[name] = ordered[len(ordered) // 2]
    nginx_rps = medians["nginx"].rps if "nginx" in medians else None
    for name, _ in targets:
        median = medians.get(name)
        if median is None:
            report.row(table="hit", case=f"{label}{name}", runs="no complete run")
            continue
        report.row(
            table="hit",
            case=f"{label}{name}",
            rps=median.rps,
            vs_nginx=(median.rps / nginx_rps) if nginx_rps else None,
            p50_ms=median.latency_ms["p50"],
            p99_ms=median.latency_ms["p99"],
            mean_ms=median.latency_ms["mean"],
            max_ms=median.latency_ms["max"],
            errors=sum(median.errors.values()),
            runs=" / ".join(f"{r.rps:,.0f}" for r in results[name]),
            spread=(max(r.rps for r in results[name]) / min(r.rps for r in results[name]) - 1)
            if len(results[name]) > 1
            else None,
        )
    report.extra.setdefault("wrk_runs", {})[label or "file"] = {
        name: [r.__dict__ for r in runs] for name, runs in results.items()
    }

    goals = {"uvicorn": 0.5, "granian": 0.75}
    for server in servers:
        median = medians.get(f"pyisr {server}")
        if median is None:
            continue
        ratio = median.rps / nginx_rps if nginx_rps else None
        report.target(
            f"{label}hit {server}: req/s vs nginx",
            f">= {goals[server]:.0%} of nginx",
            None if ratio is None else f"{ratio:.0%} ({median.rps:,.0f} / {nginx_rps:,.0f})",
            None if ratio is None else ratio >= goals[server],
        )
        report.target(
            f"{label}hit {server}: p99 at {cfg['connections']} connections",
            "< 10 ms",
            f"{median.latency_ms['p99']:.2f} ms",
            median.latency_ms["p99"] < 10,
        )
    if len(results.get("pyisr uvicorn", [])) > 1:
        spread = statistics.pstdev(r.rps for r in results["pyisr uvicorn"]) / statistics.mean(
            r.rps for r in results["pyisr uvicorn"]
        )
        if spread > 0.1:
            report.note(f"pyisr uvicorn runs vary by {spread:.0%} (stdev/mean): the machine was busy")


COLUMNS = [
    ("case", "case"),
    ("rps", "req/s"),
    ("vs_nginx", "vs nginx", "pct"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("mean_ms", "mean ms"),
    ("max_ms", "max ms"),
    ("errors", "errors"),
    ("runs", "req/s per run"),
]


def run(ctx: Context) -> Report:
    report = Report("hit", ctx, {}, "a hot cached page, 1 worker, wrk -t2 -c50, against nginx")
    report.columns = COLUMNS
    try:
        measure(ctx, report, ctx.scratch("hit"))
    except Skip as exc:
        report.skipped = str(exc)
    return report
