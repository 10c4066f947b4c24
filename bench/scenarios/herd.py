"""herd: 1,000 concurrent requests to one missing page and to one stale page.

1,000 connections are opened first, then all 1,000 requests are written at the same
instant. The page renders in 500 ms and counts its renders: pyisr must render each key
exactly once (single flight inside a worker, the file lock across workers), and the
slowest request shows what the herd costs. The stale page must answer STALE at once
while its one background render runs.

The list variant (table "list", left out of ``--quick``): pages that render at once but
read a shared ``cached()`` list of 20 or of 2,000 items (~1 MB). 100 never-rendered pages
requested one after another, then a herd on one more: the MISS latency of the 2,000-item
pages is that of the 20-item ones (the list is read from memory, not re-read and decoded
for each render).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench import loadgen, sites, tools
from bench.common import Context, PyisrServer, Report, Skip, log, ms, percentile, run_build


def settings(ctx: Context) -> dict[str, Any]:
    configs = [("uvicorn", 1)] if ctx.quick else [("uvicorn", 1), ("uvicorn", 2), ("granian", 1)]
    return {"concurrency": 1000, "render_s": 0.5, "stale_revalidate_s": 3, "configs": configs}


def run(ctx: Context) -> Report:
    cfg = settings(ctx)
    report = Report("herd", ctx, cfg, "1,000 concurrent requests to one missing and one stale page")
    report.columns = [
        ("case", "case"),
        ("page", "page"),
        ("answered", "answered"),
        ("failed", "failed"),
        ("renders", "renders"),
        ("p50_ms", "p50 ms"),
        ("slowest_ms", "slowest ms"),
        ("statuses", "x-pyisr-cache"),
    ]
    configs = list(cfg["configs"])
    if any(server == "granian" for server, _ in configs):
        try:
            tools.ensure_granian(ctx.install)
        except Skip as exc:
            configs = [c for c in configs if c[0] != "granian"]
            report.note(f"no granian rows: {exc}")
    work = ctx.scratch("herd")
    site = sites.herd_site(
        work / "site",
        stale_ids=len(configs),
        delay=cfg["render_s"],
        stale_revalidate=cfg["stale_revalidate_s"],
    )
    (work / "counts-build").mkdir()
    run_build(site, {"BENCH_COUNTS": str(work / "counts-build")})
    stale_from = time.monotonic() + cfg["stale_revalidate_s"] + 0.3
    for index, (server, workers) in enumerate(configs, start=1):
        counts = work / f"counts-{index}"
        counts.mkdir()
        case = f"pyisr {server} x{workers}"
        with PyisrServer(
            site, server=server, workers=workers, env={"BENCH_COUNTS": str(counts)}, log_dir=work
        ) as srv:
            for kind, path, counter in (
                ("missing", f"/herdmiss/k{index}", f"herdmiss-k{index}"),
                ("stale", f"/herdstale/{index}", f"herdstale-{index}"),
            ):
                if kind == "stale":
                    time.sleep(max(0.0, stale_from - time.monotonic()))
                responses, failed = loadgen.run(loadgen.burst(srv.port, path, cfg["concurrency"]))
                time.sleep(cfg["render_s"] + 0.7)  # a background render finishes and is counted
                renders = sites.count_renders(counts, counter)
                latencies = [r.latency for r in responses]
                words = Counter(loadgen.cache_word(r) for r in responses)
                log(
                    f"{case} {kind}: {len(responses)} answered, {failed} failed, {renders} render(s), "
                    f"slowest {ms(max(latencies, default=None))} ms, {dict(words)}"
                )
                report.row(
                    case=case,
                    page=kind,
                    answered=len(responses),
                    failed=failed,
                    renders=renders,
                    p50_ms=ms(percentile(latencies, 50)),
                    slowest_ms=ms(max(latencies, default=None)),
                    statuses=", ".join(f"{k} {v}" for k, v in sorted(words.items())),
                )
                report.target(
                    f"herd {case}: {kind} page renders",
                    "exactly 1",
                    f"{renders} for {len(responses)} requests ({failed} failed)",
                    renders == 1 and failed == 0,
                )
            errors = [line for line in srv.log().splitlines() if "Error" in line or "Traceback" in line]
            if errors:
                report.note(f"{case}: server log has {len(errors)} error line(s), e.g. {errors[0][:200]}")
    if not ctx.quick:
        report.columns = {"herd": report.columns, "list": LIST_COLUMNS}
        for row in report.rows:
            row["table"] = "herd"
        measure_list(cfg, report, ctx.scratch("herd-list"))
    return report


LIST_SIZES = (20, 2000)
LIST_COLUMNS = [
    ("items", "list items"),
    ("case", "requests"),
    ("answered", "answered"),
    ("failed", "failed"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("slowest_ms", "slowest ms"),
]


def measure_list(cfg: dict[str, Any], report: Report, work: Path) -> None:
    """MISS latency of pages reading a shared list of 20 or 2,000 items (uvicorn, 1 worker)."""
    site = sites.list_site(work / "site", LIST_SIZES)
    run_build(site)
    p50s: dict[int, float | None] = {}
    with PyisrServer(site, log_dir=work) as srv, httpx.Client(base_url=srv.url) as client:
        for size in LIST_SIZES:
            client.get(f"/list{size}/1")  # the list is in memory (read by the build's pages)
            latencies = []
            for i in range(100):
                started = time.perf_counter()
                answer = client.get(f"/list{size}/m{i}")
                latencies.append(time.perf_counter() - started)
                assert answer.headers.get("x-pyisr-cache") == "MISS", answer.headers
            p50s[size] = percentile(latencies, 50)
            report.row(
                table="list",
                items=size,
                case="100 MISSes, one at a time",
                answered=len(latencies),
                failed=0,
                p50_ms=ms(p50s[size]),
                p99_ms=ms(percentile(latencies, 99)),
                slowest_ms=ms(max(latencies)),
            )
            responses, failed = loadgen.run(loadgen.burst(srv.port, f"/list{size}/herd", cfg["concurrency"]))
            burst = [r.latency for r in responses]
            report.row(
                table="list",
                items=size,
                case=f"{cfg['concurrency']:,} at once, one missing page",
                answered=len(responses),
                failed=failed,
                p50_ms=ms(percentile(burst, 50)),
                p99_ms=ms(percentile(burst, 99)),
                slowest_ms=ms(max(burst, default=None)),
            )
            herd_p50 = ms(percentile(burst, 50))
            log(f"list {size}: MISS p50 {ms(p50s[size])} ms one at a time; herd p50 {herd_p50} ms")
    small, large = p50s[LIST_SIZES[0]], p50s[LIST_SIZES[-1]]
    report.target(
        "herd list: MISS p50 with a 2,000-item list vs 20 items",
        "within 1 ms (the list is read from memory, not decoded)",
        None if small is None or large is None else f"{ms(large)} vs {ms(small)} ms",
        None if small is None or large is None else large - small <= 0.001,
    )
