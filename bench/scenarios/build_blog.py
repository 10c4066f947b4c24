"""build-blog: ``pyisr build`` of the example blog with 2,000 and 10,000 posts, against
``next build`` of the Next.js peer with as many posts, in the same run.

pyisr: a copy of ``examples/blog`` in the temp dir (never the example itself), its
SQLite database generated with N posts (the 25 seed posts repeated, numbered), built
with ``pyisr build``: 2N + 2 pages (``/blog/<id>`` App style through ``cached()``,
``/posts/<id>`` Pages style straight from SQLite, ``/`` and ``/blog``). Where the time
went comes from the build's manifest (render, data, write).

Next.js: ``shared/peers/nextjs-blog`` copied to the temp dir (sources only), ``npm ci``
there (the lock file pins next 15.5), its ``data-api.js`` started on a free 127.0.0.1
port with ``POSTS=N``, then a cold ``next build`` (``.next`` removed first), as the
peer's ``bench.sh build N`` does: 2N + 3 prerendered routes. Skipped, with the reason,
when Node.js or npm is missing or the install fails.

Every build runs as a child in its own process group, killed after ``timeout_s``. Wall
time is from spawn to exit; peak RSS is the largest sum of VmRSS over the child's process
tree, sampled every 50 ms (``next build`` runs worker processes), with the child's own
``ru_maxrss`` beside it. The pyisr and Next.js builds of each size run back to back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    PYISR,
    REPO,
    Context,
    Report,
    Skip,
    clean_env,
    free_port,
    log,
    process_tree,
    status_kb,
)

EXAMPLE = REPO / "examples" / "blog"
PEER = REPO.parent / "shared" / "peers" / "nextjs-blog"


def settings(ctx: Context) -> dict[str, Any]:
    return {
        "posts": [2000] if ctx.quick else [2000, 10_000],
        "timeout_s": 900,
        "npm_timeout_s": 600,
        "next": True,
    }


# -- the pyisr site ---------------------------------------------------------------------------


def blog_copy(dest: Path, posts: int) -> Path:
    """``examples/blog`` copied to ``dest`` with a database of ``posts`` posts."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("data", ".pyisr", "__pycache__"))
    sys.path.insert(0, str(EXAMPLE))
    try:
        from lib import db, seed  # the example's own schema and seed posts
    finally:
        sys.path.remove(str(EXAMPLE))
    (dest / "data").mkdir()
    conn = sqlite3.connect(dest / "data" / "blog.db")
    try:
        conn.executescript(db.SCHEMA)
        base = seed.rows()
        rows = []
        for i in range(posts):
            _, title, content, author, published = base[i % len(base)]
            rows.append((i + 1, f"{title} #{i + 1}", content, author, published))
        conn.executemany(f"INSERT INTO posts ({db.COLUMNS}) VALUES (?, ?, ?, ?, ?)", rows)
        conn.commit()
    finally:
        conn.close()
    return dest


# -- running a build ---------------------------------------------------------------------------


def timed_run(
    args: list[str], *, cwd: Path, env: dict[str, str], timeout: float, log_path: Path
) -> dict[str, Any]:
    """Run ``args`` in its own process group; wall time, exit code, peak RSS of its tree."""
    peak_kb = 0
    with open(log_path, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_kb
            while not stop.is_set():
                peak_kb = max(peak_kb, sum(status_kb(p, "VmRSS") or 0 for p in process_tree(proc.pid)))
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, _kill_group, (proc.pid,))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            stop.set()
            sampler.join()
        wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    # What the child left running (a build's workers) goes with its group.
    _kill_group(proc.pid)
    return {
        "wall_s": wall,
        "code": code,
        "peak_rss_mb": peak_kb / 1024,
        "maxrss_mb": usage.ru_maxrss / 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "timed_out": wall >= timeout,
        "output": log_path.read_text(errors="replace"),
    }


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the group we created, named by our child's PID
    except (ProcessLookupError, PermissionError):
        pass


def pyisr_build(site: Path, work: Path, timeout: float) -> dict[str, Any]:
    result = timed_run(
        [*PYISR, "build", str(site)],
        cwd=work,
        env=clean_env(),
        timeout=timeout,
        log_path=work / f"pyisr-build-{site.name}.log",
    )
    if result["code"] != 0:
        raise RuntimeError(f"pyisr build {site} failed ({result['code']}):\n{result['output'][-3000:]}")
    current = (site / ".pyisr" / "BUILD_ID").read_text().strip()
    manifest = json.loads((site / ".pyisr" / "builds" / current / "manifest.json").read_text())
    result["pages"] = manifest["stats"]["pages"]
    result["stats"] = manifest["stats"]
    return result


# -- the Next.js peer --------------------------------------------------------------------------


def next_install(work: Path, timeout: float) -> Path:
    """The peer's sources copied to ``work`` and its locked dependencies installed there."""
    if not PEER.is_dir():
        raise Skip(f"no Next.js peer at {PEER}")
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise Skip("Node.js (node and npm) is not installed")
    dest = work / "nextjs-blog"
    shutil.copytree(PEER, dest, ignore=shutil.ignore_patterns("node_modules", ".next", "logs", ".pids"))
    for path in [dest, *dest.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)  # the peer folder is read-only
    log(f"npm ci in {dest} ...")
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=dest,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "NEXT_TELEMETRY_DISABLED": "1"},
        )
    except subprocess.TimeoutExpired:
        raise Skip(f"npm ci did not finish within {timeout:.0f}s") from None
    if done.returncode != 0:
        raise Skip(f"npm ci failed: {(done.stdout + done.stderr)[-500:]}")
    return dest


class DataAPI:
    """The peer's data API (``node data-api.js``) with ``POSTS`` posts, on a free 127.0.0.1 port."""

    def __init__(self, peer: Path, posts: int) -> None:
        self.port = free_port()
        env = {**os.environ, "POSTS": str(posts), "DATA_API_HOST": "127.0.0.1"}
        env["DATA_API_PORT"] = str(self.port)
        self.log = open(peer / f"data-api-{posts}.log", "wb")
        self.proc = subprocess.Popen(
            ["node", "data-api.js"], cwd=peer, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise Skip("the peer's data API did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def next_build(peer: Path, posts: int, timeout: float) -> dict[str, Any]:
    shutil.rmtree(peer / ".next", ignore_errors=True)  # a cold build, as bench.sh does
    api = DataAPI(peer, posts)
    try:
        env = {
            **os.environ,
            "NEXT_TELEMETRY_DISABLED": "1",
            "BLOG_API_URL": api.url,
            "REVALIDATE": "60",
        }
        result = timed_run(
            ["node", "node_modules/next/dist/bin/next", "build"],
            cwd=peer,
            env=env,
            timeout=timeout,
            log_path=peer / f"next-build-{posts}.log",
        )
    finally:
        api.stop()
    if result["code"] != 0:
        output = result["output"][-3000:]
        raise RuntimeError(f"next build ({posts} posts) failed ({result['code']}):\n{output}")
    manifest = json.loads((peer / ".next" / "prerender-manifest.json").read_text())
    result["pages"] = len(manifest["routes"])
    return result


# -- the scenario ------------------------------------------------------------------------------


def run(ctx: Context) -> Report:
    cfg = settings(ctx)
    report = Report(
        "build-blog", ctx, cfg, "the example blog with N posts: pyisr build vs next build, same run"
    )
    report.columns = [
        ("case", "case"),
        ("posts", "posts"),
        ("pages", "pages"),
        ("wall_s", "wall s"),
        ("pages_per_s", "pages/s"),
        ("vs_next", "pages/s vs next", "x"),
        ("peak_rss_mb", "peak RSS MB (tree)"),
        ("cpu_s", "CPU s"),
        ("render_s", "render s"),
        ("data_s", "data s"),
        ("write_s", "write s"),
    ]
    work = ctx.scratch("build-blog")
    peer: Path | None = None
    if cfg["next"]:
        try:
            peer = next_install(work, cfg["npm_timeout_s"])
        except Skip as exc:
            report.note(f"no next build rows: {exc}")
    walls: dict[int, float] = {}
    for posts in cfg["posts"]:
        site = blog_copy(work / f"blog-{posts}", posts)
        log(f"pyisr build, {posts:,} posts ...")
        mine = pyisr_build(site, work, cfg["timeout_s"])
        rate = mine["pages"] / mine["wall_s"]
        walls[posts] = mine["wall_s"]
        stats = mine["stats"]
        log(
            f"pyisr {posts:,} posts: {mine['pages']:,} pages in {mine['wall_s']:.1f}s ({rate:,.0f} pages/s), "
            f"peak RSS {mine['peak_rss_mb']:.0f} MB; {stats}"
        )
        row = report.row(
            case="pyisr build",
            posts=posts,
            pages=mine["pages"],
            wall_s=mine["wall_s"],
            pages_per_s=rate,
            peak_rss_mb=mine["peak_rss_mb"],
            maxrss_mb=mine["maxrss_mb"],
            cpu_s=mine["cpu_s"],
            reported_s=stats["seconds"],
            render_s=stats["render_s"],
            data_s=stats["data_s"],
            write_s=stats["write_s"],
            data_calls=stats["data_calls"],
            data_shared=stats["data_shared"],
        )
        shutil.rmtree(site, ignore_errors=True)
        report.target(
            f"build-blog {posts:,} posts: peak RSS",
            "< 300 MB",
            f"{mine['peak_rss_mb']:.0f} MB",
            mine["peak_rss_mb"] < 300,
        )
        if peer is None:
            continue
        log(f"next build, {posts:,} posts ...")
        try:
            theirs = next_build(peer, posts, cfg["timeout_s"])
        except (RuntimeError, Skip) as exc:
            report.note(f"next build of {posts:,} posts: {exc}")
            continue
        their_rate = theirs["pages"] / theirs["wall_s"]
        row["vs_next"] = rate / their_rate
        log(
            f"next {posts:,} posts: {theirs['pages']:,} routes in {theirs['wall_s']:.1f}s "
            f"({their_rate:,.0f} pages/s), peak RSS {theirs['peak_rss_mb']:.0f} MB; pyisr is "
            f"{rate / their_rate:.1f}x"
        )
        report.row(
            case="next build",
            posts=posts,
            pages=theirs["pages"],
            wall_s=theirs["wall_s"],
            pages_per_s=their_rate,
            peak_rss_mb=theirs["peak_rss_mb"],
            maxrss_mb=theirs["maxrss_mb"],
            cpu_s=theirs["cpu_s"],
        )
        if posts == 2000:
            report.target(
                "build-blog 2,000 posts: pages/s vs next build",
                ">= 5x next build's, same run",
                f"{rate / their_rate:.1f}x ({rate:,.0f} / {their_rate:,.0f} pages/s)",
                rate >= 5 * their_rate,
            )
    if 2000 in walls and 10_000 in walls:
        ratio = walls[10_000] / walls[2000]
        report.target(
            "build-blog: 10,000 posts vs 2,000",
            "<= 5.5x the time (linear: 5x the pages)",
            f"{ratio:.2f}x ({walls[10_000]:.1f} / {walls[2000]:.1f} s)",
            ratio <= 5.5,
        )
    report.note(
        "render and data are summed over concurrent pages; write is the wall time the store "
        "was busy (pyisr build's manifest, stats)"
    )
    return report
