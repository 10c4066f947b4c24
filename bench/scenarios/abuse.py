"""abuse: crawler traffic and malformed clients, while one connection watches a hot page.

``pyisr start --cache-max-bytes 20MB`` (1 worker, default HTTP limits) serves a site whose
``/items/<id>`` route renders any id and answers unknown ones with its 404 page, cached
like any page (``not_found()``). For ``duration_s`` the server gets, all at once:

- a crawler: keep-alive connections asking for a stream of ids nobody built (each a MISS
  that renders and stores a 404 entry, so the cache on disk grows until its budget);
- 64 kB paths and 1 MB headers, each on a new connection (refused by the limits);
- slow-header connections (slowloris): a header byte per second, reopened when cut off;

while a separate process keeps one keep-alive connection asking for ``/hot`` (a cached
page) and times each answer, as it did for ``baseline_s`` before the abuse began. Every
second the disk bytes of the site's ``.pyisr`` (and of its cache) and the VmRSS of the
server's process tree are sampled. Under granian and uvicorn, one after the other.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import loadgen, sites, tools
from bench.common import PYISR, Context, PyisrServer, Report, Skip, clean_env, log, ms, percentile, run_build

HOT = "/hot"
MB = 1024 * 1024


def settings(ctx: Context) -> dict[str, Any]:
    return {
        "duration_s": 5 if ctx.quick else 20,
        "baseline_s": 2 if ctx.quick else 5,
        "servers": ["granian", "uvicorn"],
        "workers": 1,
        "cache_max_bytes": "20MB",
        "crawler_connections": 8,
        "long_path_connections": 2,
        "long_path_bytes": 65536,
        "oversize_connections": 2,
        "oversize_header_bytes": MB,
        "slow_connections": 50,
        "slow_byte_every_s": 1.0,
        "sample_every_s": 1.0,
        "rss_target_mb": 150,
        "hit_p99_target_ms": 50,
    }


# -- the watcher of the hot page: its own process, so the abuse's client CPU is not its own ---


def watch_hot(port: int, seconds: float) -> dict[str, Any]:
    """One keep-alive connection asking for the hot page for ``seconds``: latencies, errors."""

    async def run() -> dict[str, Any]:
        conn = await loadgen.Connection(port).open()
        latencies: list[float] = []
        errors = 0
        other: Counter[str] = Counter()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            try:
                response = await asyncio.wait_for(conn.get(HOT), 10)
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
                errors += 1
                await conn.close()
                await asyncio.sleep(0.01)
                continue
            if response.status == 200 and response.headers.get("x-pyisr-cache") == "HIT":
                latencies.append(response.latency)
            else:
                other[loadgen.cache_word(response)] += 1
        await conn.close()
        return {"latencies": latencies, "errors": errors, "other": dict(other)}

    return loadgen.run(run())


def _watch_into(port: int, seconds: float, out: Any) -> None:
    out.put(watch_hot(port, seconds))


class Watcher:
    """``watch_hot`` in a child process (spawned: nothing of this process is shared)."""

    def __init__(self, port: int, seconds: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.queue: Any = context.Queue()
        self.seconds = seconds
        self.proc = context.Process(target=_watch_into, args=(port, seconds, self.queue), daemon=True)
        self.proc.start()

    def result(self) -> dict[str, Any]:
        try:
            return dict(self.queue.get(timeout=self.seconds + 60))
        finally:
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()


# -- the abuse --------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the abusive clients saw."""

    crawled: Counter[str] = field(default_factory=Counter)
    long_paths: Counter[str] = field(default_factory=Counter)
    oversize: Counter[str] = field(default_factory=Counter)
    slow_cut: int = 0
    slow_lifetimes: list[float] = field(default_factory=list)
    errors: int = 0


def _status(head: bytes) -> str:
    if head.startswith(b"HTTP/1.1 ") and len(head) >= 12:
        return head[9:12].decode("latin-1")
    return "closed"


async def one_shot(port: int, data: bytes, timeout: float = 5) -> str:
    """Send ``data`` on a new connection; the status answered, or "closed" / "timeout"."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(loadgen.HOST, port), timeout)
    except (OSError, TimeoutError):
        return "connect failed"
    try:
        writer.write(data)
        try:
            await asyncio.wait_for(writer.drain(), timeout)
        except (ConnectionError, TimeoutError):
            pass  # refused while sending: read what the server said
        try:
            head = await asyncio.wait_for(reader.read(64), timeout)
        except TimeoutError:
            return "timeout"
        except ConnectionError:
            return "closed"
        return _status(head)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def crawler(port: int, until: float, tally: Tally) -> None:
    prefix = uuid.uuid4().hex[:8]
    n = 0
    conn = await loadgen.Connection(port).open()
    while time.monotonic() < until:
        n += 1
        try:
            response = await asyncio.wait_for(conn.get(f"/items/crawl-{prefix}-{n}"), 30)
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
            tally.errors += 1
            await conn.close()
            continue
        tally.crawled[str(response.status)] += 1
    await conn.close()


async def repeat(port: int, until: float, data: bytes, counts: Counter[str]) -> None:
    while time.monotonic() < until:
        counts[await one_shot(port, data)] += 1


async def slow_client(port: int, until: float, every: float, tally: Tally) -> None:
    """Slowloris: a header byte every ``every`` seconds, never the end; reopened when cut."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(loadgen.HOST, port), 5)
        except (OSError, TimeoutError):
            tally.errors += 1
            await asyncio.sleep(0.5)
            continue
        opened = time.monotonic()
        writer.write(f"GET {HOT} HTTP/1.1\r\nHost: {loadgen.HOST}\r\nX-Slow: ".encode())
        cut = False
        while time.monotonic() < until and not cut:
            try:
                data = await asyncio.wait_for(reader.read(1024), every)
                cut = True  # an answer (408) or the end of the connection
                del data
            except TimeoutError:
                try:
                    writer.write(b"a")
                    await writer.drain()
                except ConnectionError:
                    cut = True
            except ConnectionError:
                cut = True
        if cut:
            tally.slow_cut += 1
            tally.slow_lifetimes.append(time.monotonic() - opened)
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def disk_bytes(path: Path) -> int:
    """Bytes on disk under ``path`` (``st_blocks * 512`` of files and directories, as the
    file-system cache's budget counts them: many small files cost whole blocks)."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
            except OSError:
                pass
    return total


async def abuse(srv: PyisrServer, cfg: dict[str, Any], tally: Tally, samples: list[dict[str, Any]]) -> None:
    port = srv.port
    started = time.monotonic()
    until = started + cfg["duration_s"]
    dot = srv.site / ".pyisr"

    async def sampler() -> None:
        while True:
            mem = srv.memory_kb()
            samples.append(
                {
                    "t_s": round(time.monotonic() - started, 1),
                    "pyisr_mb": disk_bytes(dot) / MB,
                    "cache_mb": disk_bytes(dot / "cache") / MB,
                    "rss_mb": mem["rss_kb"] / 1024,
                    "crawled": sum(tally.crawled.values()),
                }
            )
            if time.monotonic() >= until:
                return
            await asyncio.sleep(cfg["sample_every_s"])

    long_path = f"GET /items/{'a' * cfg['long_path_bytes']} HTTP/1.1\r\nHost: {loadgen.HOST}\r\n\r\n"
    oversize = (
        f"GET {HOT} HTTP/1.1\r\nHost: {loadgen.HOST}\r\nX-Big: {'a' * cfg['oversize_header_bytes']}\r\n\r\n"
    )
    tasks = [sampler()]
    tasks += [crawler(port, until, tally) for _ in range(cfg["crawler_connections"])]
    tasks += [
        repeat(port, until, long_path.encode(), tally.long_paths) for _ in range(cfg["long_path_connections"])
    ]
    tasks += [
        repeat(port, until, oversize.encode(), tally.oversize) for _ in range(cfg["oversize_connections"])
    ]
    tasks += [
        slow_client(port, until, cfg["slow_byte_every_s"], tally) for _ in range(cfg["slow_connections"])
    ]
    await asyncio.wait_for(asyncio.gather(*tasks), cfg["duration_s"] + 60)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counter.most_common()) or "–"


def cache_budget_flag(env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """``--cache-max-bytes`` when ``pyisr start`` has it, else ``PYISR_CACHE_MAX_BYTES``."""
    done = subprocess.run(
        PYISR + ["start", "--help"], capture_output=True, text=True, env=clean_env(), timeout=60
    )
    if "--cache-max-bytes" in done.stdout:
        return ["--cache-max-bytes", env["budget"]], {}
    return [], {"PYISR_CACHE_MAX_BYTES": env["budget"]}


def run(ctx: Context) -> Report:
    cfg = settings(ctx)
    report = Report("abuse", ctx, cfg, "crawler and malformed clients vs a hot page, 20 MB cache budget")
    report.columns = {
        "abuse": [
            ("case", "case"),
            ("hit_p50_ms", "HIT p50 ms (alone)"),
            ("hit_p99_ms", "HIT p99 ms (alone)"),
            ("abuse_p50_ms", "HIT p50 ms (abuse)"),
            ("abuse_p99_ms", "HIT p99 ms (abuse)"),
            ("hit_failed", "HIT failed"),
            ("crawled", "unknown ids answered"),
            ("long_paths", "64 kB paths"),
            ("oversize", "1 MB headers"),
            ("slow_cut", "slow clients cut"),
            ("slow_max_s", "longest slow client s"),
            ("errors", "client errors"),
            ("rss_max_mb", "RSS max MB"),
            ("cache_max_mb", "cache max MB"),
            ("pyisr_end_mb", ".pyisr end MB"),
        ],
        "samples": [
            ("case", "case"),
            ("t_s", "s"),
            ("crawled", "unknown ids"),
            ("cache_mb", "cache MB"),
            ("pyisr_mb", ".pyisr MB"),
            ("rss_mb", "RSS MB"),
        ],
    }
    servers = list(cfg["servers"])
    try:
        tools.ensure_granian(ctx.install)
    except Skip as exc:
        servers.remove("granian")
        report.note(f"no granian row: {exc}")
    work = ctx.scratch("abuse")
    try:
        from pyisr.cache import fs_budget

        report.note(
            f"404 entries (negative results) are held to their own share of the budget: "
            f"{fs_budget.NEGATIVE_SHARE:.0%} of it (pyisr/cache/fs_budget.py), evicted among themselves"
        )
    except (ImportError, AttributeError):
        pass
    flags, env = cache_budget_flag({"budget": cfg["cache_max_bytes"]})
    report.params["cache_budget_by"] = "flag" if flags else "environment"
    for server in servers:
        site = sites.abuse_site(work / f"site-{server}")
        run_build(site, env)
        with PyisrServer(
            site, server=server, workers=cfg["workers"], env=env, log_dir=work, extra_args=flags
        ) as srv:
            assert httpx.get(srv.url + HOT, timeout=10).status_code == 200
            baseline = Watcher(srv.port, cfg["baseline_s"]).result()
            rss_start = srv.memory_kb()["rss_kb"] / 1024
            tally = Tally()
            samples: list[dict[str, Any]] = []
            watcher = Watcher(srv.port, cfg["duration_s"])
            loadgen.run(abuse(srv, cfg, tally, samples))
            during = watcher.result()
            time.sleep(0.5)
            after = httpx.get(srv.url + HOT, timeout=10)
            log_errors = [ln for ln in srv.log().splitlines() if "Traceback" in ln or "ERROR" in ln]
        crawled = sum(tally.crawled.values())
        hit_failed = during["errors"] + sum(during["other"].values())
        row = report.row(
            table="abuse",
            case=f"pyisr {server}",
            hit_p50_ms=ms(percentile(baseline["latencies"], 50)),
            hit_p99_ms=ms(percentile(baseline["latencies"], 99)),
            abuse_p50_ms=ms(percentile(during["latencies"], 50)),
            abuse_p99_ms=ms(percentile(during["latencies"], 99)),
            hit_answers=len(during["latencies"]),
            hit_failed=hit_failed,
            hit_other=during["other"],
            crawled=f"{crawled:,} ({crawled / cfg['duration_s']:,.0f}/s): {_counts(tally.crawled)}",
            long_paths=_counts(tally.long_paths),
            oversize=_counts(tally.oversize),
            slow_cut=tally.slow_cut,
            slow_max_s=max(tally.slow_lifetimes, default=None),
            errors=tally.errors,
            rss_start_mb=rss_start,
            rss_max_mb=max((s["rss_mb"] for s in samples), default=None),
            cache_max_mb=max((s["cache_mb"] for s in samples), default=None),
            pyisr_end_mb=samples[-1]["pyisr_mb"] if samples else None,
            hot_after=after.status_code,
            server_log_errors=len(log_errors),
        )
        for sample in samples:
            report.row(table="samples", case=f"pyisr {server}", **sample)
        log(
            f"{server}: HIT p99 {row['hit_p99_ms']} ms alone, {row['abuse_p99_ms']} ms under abuse "
            f"({hit_failed} failed); crawled {row['crawled']}; long paths {row['long_paths']}; "
            f"1 MB headers {row['oversize']}; slow clients cut {tally.slow_cut}; "
            f"RSS max {row['rss_max_mb']:.0f} MB; cache max {row['cache_max_mb']:.1f} MB"
        )
        if log_errors:
            report.note(
                f"{server}: {len(log_errors)} error line(s) in the server log, e.g. {log_errors[0][:200]}"
            )
        budget = int(cfg["cache_max_bytes"].rstrip("MB")) * MB
        report.target(
            f"abuse {server}: cache on disk",
            f"<= {cfg['cache_max_bytes']} (--cache-max-bytes)",
            f"max {row['cache_max_mb']:.1f} MB",
            row["cache_max_mb"] is not None and row["cache_max_mb"] * MB <= budget,
        )
        report.target(
            f"abuse {server}: RSS of the server",
            f"< {cfg['rss_target_mb']} MB",
            f"max {row['rss_max_mb']:.0f} MB (started at {rss_start:.0f} MB)",
            row["rss_max_mb"] is not None and row["rss_max_mb"] < cfg["rss_target_mb"],
        )
        p99 = row["abuse_p99_ms"]
        report.target(
            f"abuse {server}: HIT of the hot page during the abuse",
            f"none failed, p99 < {cfg['hit_p99_target_ms']} ms",
            f"{hit_failed} failed, p99 {p99} ms (alone: {row['hit_p99_ms']} ms)",
            None if p99 is None else hit_failed == 0 and p99 < cfg["hit_p99_target_ms"],
        )
        refused = {"431", "414", "400", "closed"}
        report.target(
            f"abuse {server}: oversize requests refused",
            "every 64 kB path and 1 MB header: 4xx or closed",
            f"paths {row['long_paths']}; headers {row['oversize']}",
            set(tally.long_paths) <= refused and set(tally.oversize) <= refused,
        )
    return report
