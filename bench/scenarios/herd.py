"""herd: 1,000 concurrent requests to one missing page and to one stale page.

1,000 connections are opened first, then all 1,000 requests are written at the same
instant. The page renders in 500 ms and counts its renders: pyisr must render each key
exactly once (single flight inside a worker, the file lock across workers), and the
slowest request shows what the herd costs. The stale page must answer STALE at once
while its one background render runs.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

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
    return report
