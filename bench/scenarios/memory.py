"""memory: RSS of a server after 100,000 distinct pages were requested (default 50 MB memory tier).

One uvicorn worker serves ``/m/<n>`` (dynamic params, a ~1.5 KB page, nothing
prerendered): every request is a MISS that renders and stores a new entry, so the
memory tier fills up and must then evict. RSS (VmRSS of the server's process tree)
is sampled along the way; it must level off at the tier's budget plus a fixed
overhead instead of growing with the number of pages.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from bench import loadgen, sites, tools
from bench.common import Context, PyisrServer, Report, log, run_build

#: The revalidation secret of the bench's server: the health endpoint's details need it.
BENCH_SECRET = "bench-memory-secret"


def settings(ctx: Context) -> dict[str, Any]:
    return {
        "pages": 5000 if ctx.quick else 100_000,
        "connections": 16,
        "deadline_s": 60 if ctx.quick else 300,
        "memory_tier": "50MB (default)",
        "server": "uvicorn",
        "workers": 1,
        "target_mb": 150,
    }


def run(ctx: Context) -> Report:
    cfg = settings(ctx)
    report = Report("memory", ctx, cfg, f"RSS after {cfg['pages']:,} distinct pages, 50 MB memory tier")
    report.columns = [
        ("requested", "pages requested"),
        ("seconds", "s"),
        ("rate", "pages/s"),
        ("rss_mb", "RSS MB"),
        ("hwm_mb", "peak RSS MB"),
        ("tier_entries", "tier entries"),
        ("tier_mb", "tier MB (its own count)"),
    ]
    work = ctx.scratch("memory")
    site = sites.memory_site(work / "site")
    run_build(site)
    paths = [f"/m/{i}" for i in range(1, cfg["pages"] + 1)]
    every = max(1000, cfg["pages"] // 10)
    env = {"PYISR_REVALIDATE_SECRET": BENCH_SECRET}  # /_pyisr/health shows the tier with it
    with PyisrServer(site, server=cfg["server"], workers=cfg["workers"], log_dir=work, env=env) as srv:
        httpx.get(srv.url + "/m/0")
        started = time.monotonic()

        def sample(answered: int) -> None:
            mem = srv.memory_kb()
            tier = _tier(srv.url)
            elapsed = time.monotonic() - started
            report.row(
                requested=answered,
                seconds=elapsed,
                rate=answered / elapsed if elapsed else None,
                rss_mb=mem["rss_kb"] / 1024,
                hwm_mb=mem["hwm_kb"] / 1024,
                **tier,
            )
            log(f"{answered:,} pages in {elapsed:.0f}s: RSS {mem['rss_kb'] / 1024:.0f} MB, tier {tier}")

        sample(0)
        deadline = time.monotonic() + cfg["deadline_s"]
        with tools.profiling(srv.pid, ctx.profile, "memory-uvicorn", 15):  # no-op without --profile
            answered, errors, statuses = loadgen.run(
                loadgen.sweep(
                    srv.port,
                    paths,
                    connections=cfg["connections"],
                    deadline=deadline,
                    on_progress=sample,
                    progress_every=every,
                )
            )
        if answered % every:
            sample(answered)
        final = srv.memory_kb()
        report.extra["statuses"] = statuses
        report.extra["errors"] = errors
    rss_mb = final["rss_kb"] / 1024
    complete = answered >= cfg["pages"]
    if not complete:
        report.note(f"only {answered:,} of {cfg['pages']:,} pages were requested within {cfg['deadline_s']}s")
    if errors or set(statuses) - {200}:
        report.note(f"responses: {statuses}, {errors} errors")
    half = [r for r in report.rows if r["requested"] >= answered / 2]
    growth = rss_mb - half[0]["rss_mb"] if half else None
    report.extra["rss_growth_second_half_mb"] = growth
    report.target(
        f"memory: RSS after {answered:,} distinct pages",
        f"< {cfg['target_mb']} MB",
        f"{rss_mb:.0f} MB ({final['processes']} process(es))",
        rss_mb < cfg["target_mb"] if complete else None,
    )
    if growth is not None:
        report.target(
            "memory: RSS growth over the second half", "~0 (bounded by the tier)", f"{growth:+.0f} MB", None
        )
    return report


def _tier(url: str) -> dict[str, Any]:
    try:
        secret = {"authorization": f"Bearer {BENCH_SECRET}"}
        health = httpx.get(url + "/_pyisr/health", headers=secret, timeout=5).json()
        info = health.get("cache", {}).get("memory_tier") or {}
    except (httpx.HTTPError, ValueError):
        return {}
    return {
        "tier_entries": info.get("entries"),
        "tier_mb": info["bytes"] / 2**20 if isinstance(info.get("bytes"), int) else None,
    }
