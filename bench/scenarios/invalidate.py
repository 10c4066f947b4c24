"""invalidate: ``revalidate_tag`` of a tag carried by 100,000 pages.

Part 1, in this process: N entries tagged ``bench-tag`` are written straight through a
``FileSystemCache`` (N = 1,000, 10,000, 100,000), then an engine over that directory
(the server's stack: file system + 50 MB memory tier) times ``await
arevalidate_tag("bench-tag")``. A tag invalidation is one manifest write, so the time
per call must not grow with N. One call is checked to really invalidate a page.

Part 2, end to end: ``pyisr start --workers 2``. One keep-alive connection is pinned
to each worker process (``/pid`` tells which), both serve the tagged page from their
memory tier, then ``POST /_pyisr/revalidate?tag=bench-tag`` and each connection polls
the page until it shows the new version. The delay is measured from the POST; every
worker must serve the new page within 1 s.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench import sites, tools
from bench.common import Context, PyisrServer, Report, Skip, log, ms, percentile, run_build

TAG = "bench-tag"
SECRET = "bench-secret"


def settings(ctx: Context) -> dict[str, Any]:
    return {
        "sizes": [200, 2000] if ctx.quick else [1000, 10_000, 100_000],
        "calls": 30,
        "e2e_pages": 200 if ctx.quick else 1000,
        "e2e_trials": 2 if ctx.quick else 5,
        "e2e_servers": ["uvicorn"] if ctx.quick else ["uvicorn", "granian"],
        "e2e_workers": 2,
    }


# -- part 1: the call itself ----------------------------------------------------------------


def _fill(root: Path, count: int) -> None:
    """Write ``count`` tagged entries in the handler's own layout (its ``slot`` paths and metadata).

    Set-up only, so no locks and no fsync: going through ``FileSystemCache.set`` costs
    ~2 ms an entry here, which would make 100,000 entries a minutes-long wait.
    """
    from pyisr.cache.entry import CacheEntry
    from pyisr.cache.filesystem import FileSystemCache
    from pyisr.cache.tags import implicit_tags

    handler = FileSystemCache(root, fsync=False)
    body = sites.page_html("Tagged").encode()
    now = time.time() - 60
    made: set[Path] = set()
    for i in range(1, count + 1):
        entry = CacheEntry(
            key=f"/t/{i}",
            body=body,
            created_at=now,
            revalidate=None,
            tags=(TAG, *implicit_tags(f"/t/{i}", "/t/[id]")),
        )
        slot = handler.slot(entry.key)
        if slot.dir not in made:
            slot.dir.mkdir(parents=True, exist_ok=True)
            made.add(slot.dir)
        slot.body.write_bytes(body)
        slot.meta.write_bytes(entry.meta_bytes())


async def _time_calls(root: Path, count: int, calls: int) -> dict[str, Any]:
    from pyisr.cache.urls import build_handler
    from pyisr.engine import CacheStatus, Engine, Rendered, RenderPolicy
    from pyisr.revalidation import arevalidate_tag
    from pyisr.runtime import set_engine

    engine = Engine(build_handler(f"file://{root}", memory_tier_bytes=50 * 2**20))
    set_engine(engine)
    try:
        policy = RenderPolicy(revalidate=None)
        sample = [f"/t/{i}" for i in range(1, min(count, 200) + 1)]

        async def render() -> Rendered:
            return Rendered(sites.page_html("Tagged", "new"))

        for key in sample:  # into the memory tier, as on a warm server
            served = await engine.get(key, render, policy)
            assert served.status is CacheStatus.HIT, (key, served.status)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await arevalidate_tag(TAG)
            times.append(time.perf_counter() - t0)
        served = await engine.get(sample[-1], render, policy)
        invalidated = served.status is CacheStatus.MISS
        await engine.close()
    finally:
        set_engine(None)
    return {"times": times, "invalidated": invalidated}


def part1(ctx: Context, report: Report, work: Path, cfg: dict[str, Any]) -> None:
    medians: dict[int, float] = {}
    for size in cfg["sizes"]:
        root = work / f"cache-{size}"
        t0 = time.perf_counter()
        _fill(root, size)
        fill_s = time.perf_counter() - t0
        log(f"wrote {size:,} tagged entries in {fill_s:.1f}s")
        result = asyncio.run(_time_calls(root, size, cfg["calls"]))
        times = result["times"]
        medians[size] = statistics.median(times)
        shutil.rmtree(root, ignore_errors=True)
        log(
            f"{size:,} entries: revalidate_tag median {ms(medians[size])} ms, max {ms(max(times))} ms, "
            f"invalidated: {result['invalidated']}"
        )
        report.row(
            case="revalidate_tag() call",
            entries=size,
            calls=len(times),
            median_ms=ms(medians[size]),
            p99_ms=ms(percentile(times, 99)),
            max_ms=ms(max(times)),
            invalidated=result["invalidated"],
            setup_s=fill_s,
        )
        if not result["invalidated"]:
            report.note(f"with {size:,} entries a tagged page was not re-rendered after revalidate_tag")
    small, large = min(medians), max(medians)
    growth = medians[large] / medians[small] if medians[small] else None
    report.target(
        f"invalidate: time per call, {large:,} vs {small:,} entries",
        "O(1): ratio <= 2",
        f"{ms(medians[large])} / {ms(medians[small])} ms = {growth:.2f}x" if growth else None,
        None if growth is None else growth <= 2.0,
    )


# -- part 2: every worker sees it -------------------------------------------------------------


def _pin_workers(url: str, workers: int, attempts: int = 200) -> dict[int, httpx.Client]:
    """One keep-alive connection per worker process, keyed by the worker's PID."""
    pinned: dict[int, httpx.Client] = {}
    for _ in range(attempts):
        client = httpx.Client(
            base_url=url, timeout=10, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)
        )
        pid = int(client.get("/pid").json()["pid"])
        if pid in pinned:
            client.close()
        else:
            pinned[pid] = client
        if len(pinned) == workers:
            break
    return pinned


def part2(ctx: Context, report: Report, work: Path, cfg: dict[str, Any], server: str) -> None:
    site = sites.invalidate_site(work / f"site-{server}", cfg["e2e_pages"])
    version_file = work / f"version-{server}"
    version_file.write_text("v1")
    counts = work / f"counts-{server}"
    counts.mkdir()
    env = {
        "BENCH_VERSION_FILE": str(version_file),
        "BENCH_COUNTS": str(counts),
        "PYISR_REVALIDATE_SECRET": SECRET,
    }
    run_build(site, env)
    workers = cfg["e2e_workers"]
    case = f"pyisr {server} x{workers}"
    with PyisrServer(site, server=server, workers=workers, env=env, log_dir=work) as srv:
        pinned = _pin_workers(srv.url, workers)
        if len(pinned) < workers:
            report.note(f"{case}: reached only {len(pinned)} of {workers} workers")
        delays: list[float] = []
        acks: list[float] = []
        for trial in range(1, cfg["e2e_trials"] + 1):
            old, new = f"version=v{trial}", f"version=v{trial + 1}"
            for client in pinned.values():
                for _ in range(3):
                    response = client.get("/t/1")
                    if old not in response.text:
                        raise RuntimeError(f"{case}: expected {old} before the trial: {response.text[-80:]}")
            before = sites.count_renders(counts, "t-1")
            version_file.write_text(f"v{trial + 1}")
            # A client made (and connected) beforehand: making one costs tens of ms by itself.
            poster = httpx.Client(base_url=srv.url, timeout=30)
            poster.get("/pid")
            t0 = time.perf_counter()
            ack = poster.post(
                "/_pyisr/revalidate", params={"tag": TAG}, headers={"authorization": f"Bearer {SECRET}"}
            )
            ack_s = time.perf_counter() - t0
            poster.close()
            if ack.status_code != 200:
                raise RuntimeError(f"{case}: revalidate answered {ack.status_code}: {ack.text}")
            seen: dict[int, float] = {}
            deadline = time.perf_counter() + 10
            while len(seen) < len(pinned) and time.perf_counter() < deadline:
                for pid, client in pinned.items():
                    if pid not in seen and new in client.get("/t/1").text:
                        seen[pid] = time.perf_counter() - t0
                time.sleep(0.005)
            worst = max(seen.values()) if len(seen) == len(pinned) else None
            renders = sites.count_renders(counts, "t-1") - before
            log(
                f"{case} trial {trial}: POST {ack_s * 1000:.1f} ms, new page seen by worker(s) after "
                f"{', '.join(f'{v * 1000:.0f} ms' for v in seen.values())}; {renders} render(s)"
            )
            acks.append(ack_s)
            delays.append(worst if worst is not None else float("inf"))
            report.row(
                case=f"{case}: POST /_pyisr/revalidate?tag",
                entries=cfg["e2e_pages"],
                trial=trial,
                post_ms=ms(ack_s),
                worker_delays_ms=", ".join(f"{v * 1000:.0f}" for v in seen.values()),
                max_ms=ms(worst),
                renders=renders,
            )
            time.sleep(0.2)
        for client in pinned.values():
            client.close()
    worst_all = max(delays) if delays else None
    report.target(
        f"invalidate {case}: every worker serves the new page",
        "within 1 s",
        f"max {ms(worst_all)} ms over {len(delays)} trials",
        None if worst_all is None else worst_all <= 1.0,
    )


def run(ctx: Context) -> Report:
    cfg = settings(ctx)
    report = Report("invalidate", ctx, cfg, "revalidate_tag of a tag carried by N pages")
    report.columns = [
        ("case", "case"),
        ("entries", "tagged entries"),
        ("calls", "calls"),
        ("median_ms", "median ms"),
        ("p99_ms", "p99 ms"),
        ("trial", "trial"),
        ("post_ms", "POST ms"),
        ("worker_delays_ms", "new page seen per worker, ms"),
        ("max_ms", "max ms"),
        ("renders", "renders"),
        ("invalidated", "invalidated"),
    ]
    work = ctx.scratch("invalidate")
    part1(ctx, report, work, cfg)
    for server in cfg["e2e_servers"]:
        if server == "granian":
            try:
                tools.ensure_granian(ctx.install)
            except Skip as exc:
                report.note(f"no granian rows: {exc}")
                continue
        part2(ctx, report, work, cfg, server)
    return report
