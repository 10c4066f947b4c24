"""``python -m bench all | hit | stale | herd | build | build-blog | memory | invalidate | redis | abuse |
edge``.

Each scenario prints a table and writes ``bench/results/<scenario>.json``; every run
rewrites ``bench/results/summary.md`` from the JSON files there. See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from bench.common import RESULTS, SCENARIOS, Context, Report, log, write_summary


def cpu_busy(window: float = 2.0) -> float:
    """Fraction of the machine's CPU time spent busy over ``window`` seconds (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(window)
    idle1, total1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_idle(limit: float, threshold: float = 0.1) -> None:
    """Wait (at most ``limit`` s) until other work leaves the CPUs at least 90% idle."""
    deadline = time.monotonic() + limit
    busy = cpu_busy()
    if busy >= threshold:
        log(f"CPUs {busy:.0%} busy: waiting up to {limit:.0f}s for them to be idle")
    while busy >= threshold and time.monotonic() < deadline:
        busy = cpu_busy(3.0)
    if busy >= threshold:
        log(f"CPUs still {busy:.0%} busy: running anyway (the load average is recorded with the results)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "scenarios",
        nargs="+",
        choices=("all", "summary", *SCENARIOS),
        help="'all' runs every scenario in order; 'summary' only rewrites summary.md",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short smoke run: shorter durations, 2,000 instead of 100,000 pages",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    parser.add_argument(
        "--no-install",
        dest="install",
        action="store_false",
        help="never apt-get/pip install a missing tool: skip what needs it",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the pyisr servers with py-spy during an extra run (hit, stale, memory)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated sites and logs (printed)")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each scenario wait (at most SECONDS) until the CPUs are at least 90%% "
        "idle, so other work on the machine does not skew the numbers",
    )
    args = parser.parse_args(argv)

    names = list(SCENARIOS) if "all" in args.scenarios else [n for n in args.scenarios if n != "summary"]
    profile = args.profile.resolve() if args.profile else None
    ctx = Context(
        quick=args.quick, out=args.out.resolve(), install=args.install, profile=profile, keep=args.keep
    )
    failed: list[str] = []
    started = time.monotonic()
    try:
        for name in names:
            log(f"=== {name}{' (quick)' if ctx.quick else ''} ===")
            if args.wait_idle:
                wait_idle(args.wait_idle)
            module = importlib.import_module(f"bench.scenarios.{name.replace('-', '_')}")
            t0 = time.monotonic()
            try:
                report: Report = module.run(ctx)
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not stop the others
                traceback.print_exc()
                report = Report(name, ctx, {}, f"{name} (failed)")
                report.skipped = f"failed: {type(exc).__name__}: {str(exc)[:500]}"
                failed.append(name)
            report.write()
            log(f"{name} took {time.monotonic() - t0:.0f}s")
    finally:
        if ctx.keep:
            log(f"generated sites and logs kept in {ctx.tmp}")
        ctx.cleanup()
    summary = write_summary(ctx.out)
    log(f"done in {time.monotonic() - started:.0f}s; summary: {summary}")
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
