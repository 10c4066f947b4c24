"""edge: Varnish (``deploy/varnish/pyisr.vcl``, xkey) in front of ``pyisr start``.

Four measurements, all on 127.0.0.1, every load bounded in time:

* **hit**: a cached page through Varnish against nginx serving the same bytes (the HTML
  pyisr answers, written to nginx's root), under wrk in the same run, rounds rotated as
  in ``hit``; pyisr without Varnish for reference;
* **encodings**: the same page through Varnish (and from pyisr alone) with
  ``Accept-Encoding: br`` and ``gzip`` against identity: a compressed HIT must cost no
  more than an identity one (pyisr stores the encodings; Varnish keeps one copy each).
  Judged on pairs of runs back to back (:func:`encoding_pairs`);
* **purge**: from ``POST /_pyisr/revalidate?tag=`` returning to Varnish answering the
  new page (polled on a keep-alive connection), over many trials: the purge's batching
  window, the request to Varnish and the re-render together;
* **rewarm**: 1,000 pages carrying one tag; pyisr first sees a Zipf-skewed mix (what
  it learns popularity from: the misses of several edges, or of a short ``s-maxage``;
  behind one Varnish that keeps pages an hour it sees each page about once, and
  re-warming has no order to follow), every page is cached at Varnish, then the tag is
  revalidated. How soon are the 100 most requested pages rendered again at the origin,
  with ``rewarm_rate`` off and on, with no visitors afterwards and with the same mix
  through Varnish (then: the renders visitors waited for, and their latency)?

Each render of a ``/z/<id>`` page appends the time it finished to a file, so the
origin's freshness is read without asking for the pages (asking would render them).
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

from bench import loadgen, sites, tools
from bench.common import (
    REPO,
    Context,
    PyisrServer,
    Report,
    Skip,
    first_line,
    log,
    ms,
    percentile,
    run_build,
)

SECRET = "bench-secret"
PURGE_SECRET = "bench-purge-secret"
HIT = "/edge/hit"
PURGE = "/edge/purge"


def settings(ctx: Context) -> dict[str, Any]:
    from pyisr.config import Config

    return {
        "duration_s": 2 if ctx.quick else 8,
        "runs": 1 if ctx.quick else 3,
        "encoding_pairs": 2 if ctx.quick else 7,
        "pair_duration_s": 1 if ctx.quick else 4,
        "warmup_s": 1,
        "connections": 50,
        "wrk_threads": 2,
        "purge_trials": 10 if ctx.quick else 100,
        "zipf_pages": 50 if ctx.quick else 1000,
        "zipf_s": 1.0,
        "hottest": 10 if ctx.quick else 100,
        "history_requests": 2000 if ctx.quick else 20_000,
        "render_ms": 10,
        "rewarm_rates": [0.0, Config().rewarm_rate],
        "observe_s": 2 if ctx.quick else 10,
        "visitor_rate": 100 if ctx.quick else 200,
    }


# -- Varnish: the tests' runner (one place knows how to start it for pyisr) ----------------


def varnish_support() -> ModuleType:
    """``tests/varnish_support.py``, loaded by its path (``tests`` is no package)."""
    name = "varnish_support"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "varnish_support.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ensure_varnish(install: bool) -> ModuleType:
    support = varnish_support()
    reason = support.missing_reason()
    if reason is not None and install:
        log("installing varnish varnish-modules with apt-get ...")
        why = support.install_varnish()
        reason = support.missing_reason()
        if reason is not None and why:
            reason = f"{reason}; {why}"
    if reason is not None:
        raise Skip(reason)
    return support


class Edge:
    """pyisr and a Varnish in front of it, purged by it; stopped together."""

    def __init__(
        self, support: ModuleType, site: Path, work: Path, env: Mapping[str, str], name: str
    ) -> None:
        self.support = support
        self.site = site
        self.work = work
        self.name = name
        self.varnish_port = support.free_port()
        self.env = {
            "PYISR_REVALIDATE_SECRET": SECRET,
            "PYISR_CDN": f"varnish://127.0.0.1:{self.varnish_port}",
            support.SECRET_ENV: PURGE_SECRET,
            **env,
        }
        self.pyisr: PyisrServer | None = None
        self.varnish: Any = None

    def __enter__(self) -> Edge:
        self.pyisr = PyisrServer(self.site, workers=1, env=self.env, log_dir=self.work).start()
        try:
            self.varnish = self.support.Varnish(
                self.pyisr.port,
                self.work / f"varnish-{self.name}",
                port=self.varnish_port,
                env={self.support.SECRET_ENV: PURGE_SECRET},
            ).start()
        except BaseException:
            self.pyisr.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.varnish is not None:
            self.varnish.stop()
        if self.pyisr is not None:
            self.pyisr.stop()

    @property
    def url(self) -> str:
        return str(self.varnish.url)

    def revalidate(self, client: httpx.Client, tag: str) -> None:
        assert self.pyisr is not None
        answer = client.post(
            self.pyisr.url + "/_pyisr/revalidate",
            params={"tag": tag},
            headers={"authorization": f"Bearer {SECRET}"},
        )
        if answer.status_code != 200:
            raise RuntimeError(f"revalidate answered {answer.status_code}: {answer.text}")


def edge_word(headers: Mapping[str, str]) -> str:
    """Varnish's part of ``Cache-Status`` (``hit``, ``fwd=miss``...)."""
    parts = [p.strip() for p in headers.get("cache-status", "").split(",")]
    ours = [p for p in parts if p.startswith("varnish")]
    return ours[-1].removeprefix("varnish").lstrip("; ") if ours else "none"


def until_cached(get: Callable[[], httpx.Response], within: float = 5.0) -> httpx.Response:
    """Ask until Varnish answers from its cache (or an origin's answer says it never will):
    the page is cached before it is measured."""
    deadline = time.monotonic() + within
    while True:
        answer = get()
        word = edge_word(answer.headers)
        if word in ("hit", "none") or word.startswith("bypass") or time.monotonic() > deadline:
            return answer
        time.sleep(0.01)


# -- hit and encodings: wrk --------------------------------------------------------------------


def measure_hits(ctx: Context, report: Report, work: Path, support: ModuleType, cfg: dict[str, Any]) -> None:
    wrk = tools.ensure_wrk(ctx.install)
    nginx_bin: str | None
    try:
        nginx_bin = tools.ensure_nginx(ctx.install)
    except Skip as exc:
        nginx_bin = None
        report.note(f"no nginx row: {exc}")
    site = sites.edge_site(work / "site-hit", 1)
    run_build(site, {"PYISR_REVALIDATE_SECRET": SECRET})
    identity: dict[str, str] = {}
    cases: list[tuple[str, str, dict[str, str]]] = []  # (name, url, headers)
    with Edge(support, site, work, {}, "hit") as edge:
        assert edge.pyisr is not None
        body = httpx.get(edge.pyisr.url + HIT, headers={"accept-encoding": "identity"}).content
        nginx = None
        try:
            if nginx_bin is not None:
                www = work / "www"
                (www / "edge").mkdir(parents=True)
                (www / "edge" / "hit.html").write_bytes(body)
                nginx = tools.Nginx(nginx_bin, www, work / "nginx").start()
                cases.append(("nginx (the same bytes)", nginx.url + "/edge/hit.html", identity))
            for coding in ("identity", "br", "gzip"):
                headers = {"accept-encoding": coding}
                cases.append((f"varnish {coding}", edge.url + HIT, headers))
            for coding in ("identity", "br"):
                cases.append((f"pyisr alone {coding}", edge.pyisr.url + HIT, {"accept-encoding": coding}))
            sizes: dict[str, int] = {}
            for name, url, headers in cases:
                answer = until_cached(lambda url=url, headers=headers: httpx.get(url, headers=headers))
                if answer.status_code != 200:
                    raise RuntimeError(f"{name} answered {answer.status_code}")
                if name.startswith("varnish") and edge_word(answer.headers) != "hit":
                    raise RuntimeError(f"{name}: not a Varnish hit: {dict(answer.headers)}")
                # The bytes on the wire (httpx hands the body decoded).
                wire = answer.headers.get("content-length")
                sizes[name] = int(wire) if wire else len(answer.content)
                log(
                    f"{name}: {url} {sizes[name]} bytes "
                    f"({answer.headers.get('content-encoding', 'identity')})"
                )
                try:
                    load(wrk, url, cfg, work, headers, cfg["warmup_s"])
                except tools.WrkTimeout as exc:
                    report.note(f"warm-up of {name}: {exc}")
            results: dict[str, list[tools.WrkResult]] = {name: [] for name, _, _ in cases}
            for run in range(cfg["runs"]):
                order = cases[run % len(cases) :] + cases[: run % len(cases)]
                for name, url, headers in order:
                    try:
                        result = load(wrk, url, cfg, work, headers, cfg["duration_s"])
                    except tools.WrkTimeout as exc:
                        report.note(f"run {run + 1}, {name}: {exc}; the run is left out")
                        continue
                    results[name].append(result)
                    log(
                        f"run {run + 1}: {name:26s} {result.rps:9,.0f} req/s  "
                        f"p99 {result.latency_ms['p99']:.2f} ms  errors {sum(result.errors.values())}"
                    )
            pairs = {
                where: encoding_pairs(report, wrk, work, cfg, url, where)
                for where, url in (("varnish", edge.url + HIT), ("pyisr alone", edge.pyisr.url + HIT))
            }
            after = httpx.get(edge.url + HIT)
            if edge_word(after.headers) != "hit":
                report.note(f"after the runs Varnish answered {edge_word(after.headers)}, not hit")
        finally:
            if nginx is not None:
                nginx.stop()

    medians = {
        name: sorted(runs, key=lambda r: r.rps)[len(runs) // 2] for name, runs in results.items() if runs
    }
    nginx_rps = medians["nginx (the same bytes)"].rps if "nginx (the same bytes)" in medians else None
    for name, _, _ in cases:
        median = medians.get(name)
        if median is None:
            report.row(table="hit", case=name, runs="no complete run")
            continue
        report.row(
            table="hit",
            case=name,
            bytes=sizes.get(name),
            rps=median.rps,
            vs_nginx=median.rps / nginx_rps if nginx_rps else None,
            p50_ms=median.latency_ms["p50"],
            p99_ms=median.latency_ms["p99"],
            errors=sum(median.errors.values()),
            runs=" / ".join(f"{r.rps:,.0f}" for r in results[name]),
        )
    report.extra["wrk_runs"] = {name: [r.__dict__ for r in runs] for name, runs in results.items()}
    varnish = medians.get("varnish identity")
    if varnish is not None and nginx_rps:
        report.target(
            "edge: Varnish HIT req/s vs nginx (same bytes)",
            "reported (no goal in the issue)",
            f"{varnish.rps / nginx_rps:.0%} ({varnish.rps:,.0f} / {nginx_rps:,.0f})",
            None,
        )
    report.extra["encoding_pairs"] = {
        where: [{"identity": plain.__dict__, "br": br.__dict__} for plain, br in found]
        for where, found in pairs.items()
    }
    for where, found in pairs.items():
        if not found:
            continue
        ratios = sorted(br.rps / plain.rps for plain, br in found)
        ratio = statistics.median(ratios)
        p99 = statistics.median(br.latency_ms["p99"] for _, br in found)
        plain_p99 = statistics.median(plain.latency_ms["p99"] for plain, _ in found)
        report.target(
            f"edge: {where}: a brotli HIT's req/s vs an identity HIT's, back to back",
            ">= 95% (no more costly; 5% is the runs' noise)",
            f"{ratio:.0%}, the median of {len(found)} pairs ({', '.join(f'{r:.0%}' for r in ratios)}); "
            f"p99 {p99:.2f} vs {plain_p99:.2f} ms",
            ratio >= 0.95,
        )


def load(
    wrk: str, url: str, cfg: dict[str, Any], work: Path, headers: dict[str, str], duration: float
) -> tools.WrkResult:
    """One wrk run of ``url`` for ``duration`` seconds, with the scenario's connections."""
    return tools.run_wrk(
        wrk,
        url,
        duration=duration,
        connections=cfg["connections"],
        threads=cfg["wrk_threads"],
        script_dir=work,
        headers=headers,
    )


def encoding_pairs(
    report: Report, wrk: str, work: Path, cfg: dict[str, Any], url: str, where: str
) -> list[tuple[tools.WrkResult, tools.WrkResult]]:
    """Identity and brotli HITs of ``url`` measured back to back, ``encoding_pairs`` times,
    the first of each pair alternating: the machine's drift over a run (another
    process, the CPU's clock) moves both halves of a pair alike, so the ratio within
    each pair is what the encoding costs, and the median of the ratios is the answer.
    (Medians of separate runs, further apart in time, spread by +-10% here.)"""
    found: list[tuple[tools.WrkResult, tools.WrkResult]] = []
    for index in range(cfg["encoding_pairs"]):
        codings = ("identity", "br") if index % 2 == 0 else ("br", "identity")
        results: dict[str, tools.WrkResult] = {}
        for coding in codings:
            try:
                results[coding] = load(
                    wrk, url, cfg, work, {"accept-encoding": coding}, cfg["pair_duration_s"]
                )
            except tools.WrkTimeout as exc:
                report.note(f"pair {index + 1} of {where}, {coding}: {exc}; the pair is left out")
                break
        if len(results) == 2:
            plain, br = results["identity"], results["br"]
            found.append((plain, br))
            log(f"pair {index + 1}: {where:12s} br {br.rps:9,.0f} / identity {plain.rps:9,.0f} req/s")
    return found


# -- purge: revalidate_tag to the edge ---------------------------------------------------------


def measure_purge(ctx: Context, report: Report, work: Path, support: ModuleType, cfg: dict[str, Any]) -> None:
    site = sites.edge_site(work / "site-purge", 1)
    version = work / "purge-version"
    version.write_text("v1")
    env = {"BENCH_VERSION_FILE": str(version)}
    run_build(site, {**env, "PYISR_REVALIDATE_SECRET": SECRET})
    delays: list[float] = []
    acks: list[float] = []
    with Edge(support, site, work, env, "purge") as edge, httpx.Client(timeout=10) as poster:
        assert edge.pyisr is not None
        visitor = httpx.Client(timeout=10, limits=httpx.Limits(max_connections=1))
        poster.get(edge.pyisr.url + "/_pyisr/health")  # connected before the first trial
        try:
            for trial in range(1, cfg["purge_trials"] + 1):
                old, new = f"version=v{trial}", f"version=v{trial + 1}"
                answer = until_cached(lambda: visitor.get(edge.url + PURGE))
                if old not in answer.text or edge_word(answer.headers) != "hit":
                    raise RuntimeError(f"trial {trial}: expected a hit with {old}: {dict(answer.headers)}")
                version.write_text(f"v{trial + 1}")
                t0 = time.perf_counter()
                edge.revalidate(poster, "edge-purge")
                returned = time.perf_counter()
                deadline = returned + 10
                while new not in visitor.get(edge.url + PURGE).text:
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"trial {trial}: Varnish still serves {old} 10 s after the purge")
                seen = time.perf_counter()
                acks.append(returned - t0)
                delays.append(seen - returned)
        finally:
            visitor.close()
    p50, p99 = percentile(delays, 50), percentile(delays, 99)
    log(
        f"purge to edge over {len(delays)} trials: p50 {ms(p50)} ms, p99 {ms(p99)} ms, "
        f"max {ms(max(delays))} ms"
    )
    report.row(
        table="purge",
        case="revalidate_tag (POST) returned -> Varnish serves the new page",
        trials=len(delays),
        p50_ms=ms(p50),
        p99_ms=ms(p99),
        max_ms=ms(max(delays)),
        mean_ms=ms(statistics.mean(delays)),
        post_p50_ms=ms(percentile(acks, 50)),
    )
    report.extra["purge_delays_ms"] = [ms(d) for d in delays]
    report.target(
        "edge: purge reaches Varnish (new page served) after revalidate_tag returns",
        "p99 <= 1 s",
        f"p99 {ms(p99)} ms (p50 {ms(p50)} ms) over {len(delays)} trials",
        p99 is not None and p99 <= 1.0,
    )


# -- rewarm: the hottest pages after a wide invalidation -------------------------------------------


def zipf_paths(pages: int, s: float, count: int, seed: int = 14) -> list[str]:
    """``count`` paths ``/z/<rank>``, rank 1 the most requested (P ~ 1 / rank^s)."""
    weights = [1 / rank**s for rank in range(1, pages + 1)]
    ranks = random.Random(seed).choices(range(1, pages + 1), weights=weights, k=count)
    return [f"/z/{rank}" for rank in ranks]


def hottest_ranks(history: list[str], count: int) -> list[int]:
    """The ``count`` pages most requested in ``history``, most first: what pyisr saw (a
    sampled mix ranks the tail of the top only roughly, so these, not ranks 1..count)."""
    return [int(path.rsplit("/", 1)[1]) for path, _ in Counter(history).most_common(count)]


def first_render_after(counts: Path, rank: int, since: float) -> float | None:
    path = counts / f"z-{rank}"
    if not path.exists():
        return None
    times = [float(line) for line in path.read_text().split()]
    later = [t for t in times if t >= since]
    return min(later) if later else None


def after(moment: float | None, start: float) -> float | None:
    """Seconds from ``start`` to ``moment`` (0 for a render that ended before it), rounded."""
    return None if moment is None else round(max(0.0, moment - start), 3)


async def visitors(port: int, paths: list[str], rate: float, duration: float, connections: int = 4) -> Any:
    """Paced requests (``rate`` a second in all) for ``duration`` s; each response's latency,
    and whether the visitor waited for a render (pyisr's part says ``fwd=uri-miss``)."""
    latencies: list[float] = []
    waited: list[float] = []
    errors = 0
    started = time.perf_counter()

    async def worker(index: int) -> None:
        nonlocal errors
        conn = await loadgen.Connection(port).open()
        n = index  # this connection sends requests index, index + connections, ...
        try:
            while True:
                due = started + n / rate
                if due - started > duration:
                    return
                pause = due - time.perf_counter()
                if pause > 0:
                    await asyncio.sleep(pause)
                try:
                    response = await conn.get(paths[n % len(paths)])
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    await conn.close()
                    n += connections
                    continue
                latencies.append(response.latency)
                # Varnish asked pyisr, and pyisr rendered (Varnish's hits repeat pyisr's old word).
                status = response.headers.get("cache-status", "")
                if edge_word(response.headers) == "fwd=miss" and "pyisr; fwd=uri-miss" in status:
                    waited.append(response.latency)
                n += connections
        finally:
            await conn.close()

    await asyncio.gather(*(worker(i) for i in range(connections)))
    return latencies, waited, errors


def rewarm_case(
    ctx: Context,
    report: Report,
    work: Path,
    support: ModuleType,
    cfg: dict[str, Any],
    rate: float,
    visited: bool,
) -> None:
    name = f"rewarm_rate={rate:g}, {'visitors through Varnish' if visited else 'no visitors'}"
    label = f"rate{rate:g}-{'visited' if visited else 'idle'}"
    site = sites.edge_site(work / f"site-{label}", cfg["zipf_pages"])
    run_build(site, {"PYISR_REVALIDATE_SECRET": SECRET})
    counts = work / f"counts-{label}"
    counts.mkdir()
    env = {
        "BENCH_COUNTS": str(counts),
        "BENCH_RENDER_MS": str(cfg["render_ms"]),
        "PYISR_REWARM_RATE": str(rate),
    }
    pages, hottest = cfg["zipf_pages"], cfg["hottest"]
    history = zipf_paths(pages, cfg["zipf_s"], cfg["history_requests"])
    top = hottest_ranks(history, hottest)
    with Edge(support, site, work, env, label) as edge, httpx.Client(timeout=30) as client:
        assert edge.pyisr is not None
        # What pyisr learns popularity from (its hit counts), then every page at the edge.
        deadline = time.monotonic() + 120
        loadgen.run(loadgen.sweep(edge.pyisr.port, history, connections=8, deadline=deadline))
        every = [f"/z/{rank}" for rank in range(1, pages + 1)]
        loadgen.run(loadgen.sweep(edge.varnish.port, every, connections=8, deadline=deadline))
        # Renders from the POST on count (a re-warm may start before it answers); times are
        # from its answer: when revalidate_tag returned.
        sent_at = time.time()
        edge.revalidate(client, "zipf")
        invalidated_at = time.time()
        latencies: list[float] = []
        waited: list[float] = []
        if visited:
            mix = zipf_paths(pages, cfg["zipf_s"], 50_000, seed=15)
            latencies, waited, _ = loadgen.run(
                visitors(edge.varnish.port, mix, cfg["visitor_rate"], cfg["observe_s"])
            )
        else:
            end = time.monotonic() + cfg["observe_s"]
            while time.monotonic() < end:
                done = [first_render_after(counts, r, sent_at) for r in top]
                if all(t is not None for t in done):
                    break
                time.sleep(0.1)
    fresh = [after(first_render_after(counts, r, sent_at), invalidated_at) for r in top]
    rendered = [t for t in fresh if t is not None]
    all_pages = [first_render_after(counts, r, sent_at) for r in range(1, pages + 1)]
    total = sum(1 for t in all_pages if t is not None)
    top10 = [t for t in fresh[:10] if t is not None]
    log(
        f"{name}: {len(rendered)}/{hottest} hottest fresh, the last after "
        f"{max(rendered) if len(rendered) == hottest else '–'} s; {total} pages rendered; "
        f"visitors waited for {len(waited)} renders"
    )
    report.row(
        table="rewarm",
        case=name,
        hottest_fresh=f"{len(rendered)} / {hottest}",
        all_hottest_s=max(rendered) if len(rendered) == hottest else None,
        top10_s=max(top10) if len(top10) == min(10, hottest) else None,
        pages_rendered=total,
        visitor_requests=len(latencies) if visited else None,
        visitors_waited=len(waited) if visited else None,
        visitor_p99_ms=ms(percentile(latencies, 99)) if visited else None,
        waited_p50_ms=ms(percentile(waited, 50)) if visited else None,
    )
    report.extra.setdefault("rewarm_fresh_s", {})[name] = fresh


def measure_rewarm(
    ctx: Context, report: Report, work: Path, support: ModuleType, cfg: dict[str, Any]
) -> None:
    for visited in (False, True):
        for rate in cfg["rewarm_rates"]:
            rewarm_case(ctx, report, work, support, cfg, rate, visited)
    rows = {r["case"]: r for r in report.rows if r.get("table") == "rewarm"}
    on = max(cfg["rewarm_rates"])
    idle = rows.get(f"rewarm_rate={on:g}, no visitors")
    if idle is not None:
        report.target(
            f"edge: the {cfg['hottest']} hottest of {cfg['zipf_pages']} invalidated pages fresh at the "
            f"origin with no visitor (rewarm_rate={on:g})",
            f"within {cfg['hottest'] / on * 1.5:g} s ({cfg['hottest']} at {on:g}/s, +50%)",
            f"{idle['hottest_fresh']} after {idle['all_hottest_s']} s"
            if idle["all_hottest_s"] is not None
            else f"{idle['hottest_fresh']} within {cfg['observe_s']} s",
            idle["all_hottest_s"] is not None and idle["all_hottest_s"] <= cfg["hottest"] / on * 1.5,
        )
    off, with_rewarm = (
        rows.get(f"rewarm_rate={min(cfg['rewarm_rates']):g}, visitors through Varnish"),
        rows.get(f"rewarm_rate={on:g}, visitors through Varnish"),
    )
    if off is not None and with_rewarm is not None:
        report.target(
            "edge: renders visitors waited for after the invalidation, re-warm on vs off",
            "fewer with re-warm",
            f"{with_rewarm['visitors_waited']} vs {off['visitors_waited']}",
            with_rewarm["visitors_waited"] < off["visitors_waited"],
        )


COLUMNS = {
    "hit": [
        ("case", "case"),
        ("bytes", "bytes"),
        ("rps", "req/s"),
        ("vs_nginx", "vs nginx", "pct"),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("errors", "errors"),
        ("runs", "req/s per run"),
    ],
    "purge": [
        ("case", "case"),
        ("trials", "trials"),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("max_ms", "max ms"),
        ("mean_ms", "mean ms"),
        ("post_p50_ms", "POST p50 ms"),
    ],
    "rewarm": [
        ("case", "case"),
        ("hottest_fresh", "hottest fresh"),
        ("all_hottest_s", "all hottest fresh after s"),
        ("top10_s", "top 10 fresh after s"),
        ("pages_rendered", "pages rendered"),
        ("visitor_requests", "visitor requests"),
        ("visitors_waited", "visitors waited for a render"),
        ("visitor_p99_ms", "visitor p99 ms"),
        ("waited_p50_ms", "waited p50 ms"),
    ],
}


def run(ctx: Context) -> Report:
    cfg = settings(ctx)
    report = Report("edge", ctx, cfg, "Varnish in front of pyisr: HITs, encodings, purges, re-warm")
    report.columns = COLUMNS
    work = ctx.scratch("edge")
    try:
        support = ensure_varnish(ctx.install)
    except Skip as exc:
        report.skipped = str(exc)
        return report
    report.machine["varnish"] = first_line([support.which("varnishd") or "varnishd", "-V"])
    try:
        measure_hits(ctx, report, work, support, cfg)
    except Skip as exc:
        report.note(f"no hit rows: {exc}")
    measure_purge(ctx, report, work, support, cfg)
    measure_rewarm(ctx, report, work, support, cfg)
    if not ctx.keep:
        shutil.rmtree(work, ignore_errors=True)
    return report
