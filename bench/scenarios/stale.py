"""stale: pages with revalidate = 1 whose render takes 200 ms, under the hit load (50 connections).

wrk cannot tell a STALE response from a HIT, so bench/loadgen.py drives the load: 50
keep-alive connections, one request in flight each, spread evenly over the pages,
recording each response's latency under its ``x-pyisr-cache``. Every render appends a
line to a counter file, counted after the run: stale-while-revalidate must render each
page about once per second (its revalidate), never once per request, and a STALE
answer must cost no more than a HIT (the render runs in the background).

Every page is stale when the load starts, so each renders once at once; the rate reported
is the renders after that first one, per page and per second of load (expected: just under 1).

The list variant (table "list"): the same load on pages that render at once but read a
shared ``cached()`` list of 20 or of 2,000 items (~1 MB), each render showing only its
length. A regeneration reads the list from the memory tier without reading, hashing or
decoding it, so the 2,000-item pages answer like the 20-item ones.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from bench import loadgen, sites, tools
from bench.common import Context, PyisrServer, Report, Skip, log, ms, percentile, run_build


def settings(ctx: Context) -> dict[str, Any]:
    return {
        "pages": 10,
        "render_s": 0.2,
        "revalidate_s": 1,
        "duration_s": 4 if ctx.quick else 15,
        "connections": 50,
        "workers": 1,
        "servers": ["uvicorn"] if ctx.quick else ["uvicorn", "granian"],
    }


def measure(
    ctx: Context, report: Report, work: Path, env: Mapping[str, str] | None = None, label: str = ""
) -> None:
    cfg = settings(ctx)
    report.params.update({f"{label}stale_{k}" if label else k: v for k, v in cfg.items()})
    servers = list(cfg["servers"])
    if "granian" in servers:
        try:
            tools.ensure_granian(ctx.install)
        except Skip as exc:
            servers.remove("granian")
            report.note(f"no granian row: {exc}")
    site = sites.stale_site(work / "site", pages=cfg["pages"], delay=cfg["render_s"])
    build_counts = work / "counts-build"
    build_counts.mkdir()
    run_build(site, {**(env or {}), "BENCH_COUNTS": str(build_counts)})
    paths = [f"/stale/{i}" for i in range(1, cfg["pages"] + 1)]
    for server in servers:
        counts = work / f"counts-{server}"
        counts.mkdir()
        with PyisrServer(
            site,
            server=server,
            workers=cfg["workers"],
            env={**(env or {}), "BENCH_COUNTS": str(counts)},
            log_dir=work,
        ) as srv:
            for path in paths:  # every page into the memory tier
                httpx.get(srv.url + path)
            time.sleep(cfg["revalidate_s"] + 0.1)  # every page stale: the run starts with regenerations
            started = time.monotonic()
            samples = loadgen.run(
                loadgen.closed_loop(
                    srv.port, paths, connections=cfg["connections"], duration=cfg["duration_s"]
                )
            )
            elapsed = time.monotonic() - started
            time.sleep(cfg["render_s"] + 0.5)  # let the last background renders finish and count
            renders = sum(sites.count_renders(counts, f"stale-{i}") for i in range(1, cfg["pages"] + 1))
            per_page = [sites.count_renders(counts, f"stale-{i}") for i in range(1, cfg["pages"] + 1)]
            if ctx.profile is not None:
                with tools.profiling(srv.pid, ctx.profile, f"{label}stale-{server}", cfg["duration_s"]):
                    loadgen.run(
                        loadgen.closed_loop(
                            srv.port, paths, connections=cfg["connections"], duration=cfg["duration_s"]
                        )
                    )
        hits = samples.by_status.get("HIT", [])
        stales = samples.by_status.get("STALE", [])
        others = {k: len(v) for k, v in samples.by_status.items() if k not in ("HIT", "STALE")}
        hit_p99 = percentile(hits, 99)
        stale_p99 = percentile(stales, 99)
        ratio = stale_p99 / hit_p99 if hit_p99 and stale_p99 else None
        # Each page renders once when the run starts (all stale), then at most once per revalidate.
        rate = (renders - cfg["pages"]) / cfg["pages"] / elapsed
        log(
            f"{server}: {samples.requests:,} requests ({samples.requests / samples.seconds:,.0f}/s), "
            f"HIT {len(hits):,} p99 {ms(hit_p99)} ms, STALE {len(stales):,} p99 {ms(stale_p99)} ms, "
            f"renders {renders} ({rate:.2f}/page/s), other {others}, errors {samples.errors}"
        )
        report.row(
            table="stale",
            case=f"{label}pyisr {server}",
            rps=samples.requests / samples.seconds,
            hit=len(hits),
            stale=len(stales),
            other=sum(others.values()) + samples.errors,
            hit_p50_ms=ms(percentile(hits, 50)),
            hit_p99_ms=ms(hit_p99),
            stale_p50_ms=ms(percentile(stales, 50)),
            stale_p99_ms=ms(stale_p99),
            stale_vs_hit_p99=ratio,
            renders=renders,
            renders_per_page_s=rate,
            requests_per_render=samples.requests / renders if renders else None,
            per_page=" ".join(str(n) for n in per_page),
            other_detail=others,
        )
        report.target(
            f"{label}stale {server}: STALE p99 vs HIT p99",
            "<= 1.5x",
            None if ratio is None else f"{ratio:.2f}x ({ms(stale_p99)} / {ms(hit_p99)} ms)",
            None if ratio is None else ratio <= 1.5,
        )
        report.target(
            f"{label}stale {server}: renders",
            "about 1 per page per second, never 1 per request",
            f"{renders} renders for {samples.requests:,} requests: {rate:.2f} re-renders/page/s",
            0.5 <= rate <= 1.1 and renders < samples.requests / 10,
        )


COLUMNS = [
    ("case", "case"),
    ("rps", "req/s"),
    ("hit", "HIT"),
    ("stale", "STALE"),
    ("other", "other"),
    ("hit_p50_ms", "HIT p50 ms"),
    ("hit_p99_ms", "HIT p99 ms"),
    ("stale_p50_ms", "STALE p50 ms"),
    ("stale_p99_ms", "STALE p99 ms"),
    ("stale_vs_hit_p99", "STALE/HIT p99", "x"),
    ("renders", "renders"),
    ("renders_per_page_s", "re-renders/page/s"),
]


LIST_SIZES = (20, 2000)


def measure_list(ctx: Context, report: Report, work: Path) -> None:
    """Pages with revalidate = 1 reading a shared list of 20 or 2,000 items, under the same load."""
    cfg = settings(ctx)
    site = sites.list_site(work / "list-site", LIST_SIZES, pages=cfg["pages"])
    (work / "counts-list-build").mkdir()
    run_build(site, {"BENCH_COUNTS": str(work / "counts-list-build")})
    counts = work / "counts-list"
    counts.mkdir()
    p99s: dict[int, float | None] = {}
    with PyisrServer(site, server="uvicorn", env={"BENCH_COUNTS": str(counts)}, log_dir=work) as srv:
        for size in LIST_SIZES:
            paths = [f"/list{size}/{i}" for i in range(1, cfg["pages"] + 1)]
            for path in paths:
                httpx.get(srv.url + path)
            time.sleep(cfg["revalidate_s"] + 0.1)
            samples = loadgen.run(
                loadgen.closed_loop(
                    srv.port, paths, connections=cfg["connections"], duration=cfg["duration_s"]
                )
            )
            time.sleep(0.5)
            renders = sum(sites.count_renders(counts, f"list{size}-{i}") for i in range(1, cfg["pages"] + 1))
            hits, stales = samples.by_status.get("HIT", []), samples.by_status.get("STALE", [])
            p99s[size] = percentile(hits + stales, 99)
            log(
                f"list {size}: {samples.requests:,} requests, HIT p99 {ms(percentile(hits, 99))} ms, "
                f"STALE p99 {ms(percentile(stales, 99))} ms, {renders} renders"
            )
            report.row(
                table="list",
                items=size,
                rps=samples.requests / samples.seconds,
                hit=len(hits),
                stale=len(stales),
                hit_p99_ms=ms(percentile(hits, 99)),
                stale_p99_ms=ms(percentile(stales, 99)),
                all_p99_ms=ms(p99s[size]),
                renders=renders,
                errors=samples.errors,
            )
    small, large = p99s.get(LIST_SIZES[0]), p99s.get(LIST_SIZES[-1])
    report.target(
        "stale list: p99 with a 2,000-item list vs 20 items",
        "<= 1.5x (the list is read from memory, not decoded)",
        None if not small or not large else f"{large / small:.2f}x ({ms(large)} / {ms(small)} ms)",
        None if not small or not large else large <= 1.5 * small,
    )


LIST_COLUMNS = [
    ("items", "list items"),
    ("rps", "req/s"),
    ("hit", "HIT"),
    ("stale", "STALE"),
    ("hit_p99_ms", "HIT p99 ms"),
    ("stale_p99_ms", "STALE p99 ms"),
    ("all_p99_ms", "p99 ms"),
    ("renders", "renders"),
]


def run(ctx: Context) -> Report:
    report = Report("stale", ctx, {}, "revalidate = 1, 200 ms renders, 50 connections: STALE vs HIT")
    report.columns = {"stale": COLUMNS, "list": LIST_COLUMNS}
    try:
        measure(ctx, report, ctx.scratch("stale"))
        measure_list(ctx, report, ctx.scratch("stale-list"))
    except Skip as exc:
        report.skipped = str(exc)
    return report
