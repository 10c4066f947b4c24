"""build: ``pyisr build`` of 2,000 and of 100,000 generated template pages.

Each page is a sync ``page(params)`` rendering a small Jinja2 template (the common
case). The build runs as a child process: wall time from spawn to exit (interpreter
start included), the time pyisr itself reports, and the child's peak RSS from
``wait4``. The default file-system cache is used, on the disk of the temp directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from bench import sites
from bench.common import Context, Report, log, run_build


def settings(ctx: Context) -> dict[str, Any]:
    return {"sizes": [2000] if ctx.quick else [2000, 100_000], "timeout_s": 600}


def _tree_size(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            files += 1
            try:
                size += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return files, size


def run(ctx: Context) -> Report:
    cfg = settings(ctx)
    report = Report("build", ctx, cfg, "pyisr build of N simple template pages")
    report.columns = [
        ("pages", "pages"),
        ("wall_s", "wall s"),
        ("pages_per_s", "pages/s (wall)"),
        ("reported_s", "pyisr's time s"),
        ("reported_pages_per_s", "pages/s (pyisr)"),
        ("peak_rss_mb", "peak RSS MB"),
        ("cpu_s", "CPU s"),
        ("files", "files"),
        ("disk_mb", "disk MB"),
    ]
    work = ctx.scratch("build")
    for size in cfg["sizes"]:
        site = sites.build_site(work / f"site-{size}", size)
        log(f"building {size:,} pages ...")
        result = run_build(site, timeout=cfg["timeout_s"], log_path=work / f"build-{size}.log")
        files, disk = _tree_size(site / ".pyisr")
        rate = size / result["wall_s"]
        reported = result["reported_s"]
        log(
            f"{size:,} pages: {result['wall_s']:.1f}s wall ({rate:,.0f} pages/s), peak RSS "
            f"{result['peak_rss_mb']:.0f} MB, {files:,} files, {disk / 2**20:.0f} MB on disk"
        )
        report.row(
            pages=size,
            wall_s=result["wall_s"],
            pages_per_s=rate,
            reported_s=reported,
            reported_pages_per_s=size / reported if reported else None,
            peak_rss_mb=result["peak_rss_mb"],
            cpu_s=result["user_s"] + result["sys_s"],
            user_s=result["user_s"],
            sys_s=result["sys_s"],
            files=files,
            disk_mb=disk / 2**20,
        )
        report.target(
            f"build {size:,} pages: pages/s",
            ">= 1,000 pages/s (wall clock)",
            f"{rate:,.0f} pages/s",
            rate >= 1000,
        )
        if size >= 100_000:
            report.target(
                f"build {size:,} pages: peak RSS",
                "< 500 MB",
                f"{result['peak_rss_mb']:.0f} MB",
                result["peak_rss_mb"] < 500,
            )
        shutil.rmtree(site, ignore_errors=True)
    return report
