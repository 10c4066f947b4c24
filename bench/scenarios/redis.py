"""redis: the hit and stale scenarios with the Redis handler behind the memory tier.

Runs only when the handler exists (``pyisr/cache/redis.py``); otherwise it reports
``skipped: no redis handler``. The server is ``$PYISR_BENCH_REDIS_URL`` if set, else a
Redis answering on 127.0.0.1:6379, else a ``redis-server`` from PATH started on a free
port. Every key goes under a fresh prefix ``bench-<uuid>``, deleted afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import uuid

from bench import tools
from bench.common import Context, Report, Skip, log
from bench.scenarios import hit, stale


def _redis_url(ctx: Context) -> tuple[str, tools.RedisServer | None]:
    import redis

    candidates = [os.environ["PYISR_BENCH_REDIS_URL"]] if os.environ.get("PYISR_BENCH_REDIS_URL") else []
    candidates.append("redis://127.0.0.1:6379/0")
    for url in candidates:
        try:
            redis.Redis.from_url(url, socket_timeout=2).ping()
            return url, None
        except redis.RedisError:
            continue
    binary = tools.which("redis-server")
    if binary is None:
        raise Skip(
            "no Redis answers on 127.0.0.1:6379 and redis-server is not installed "
            "(apt-get install -y redis-server, or set PYISR_BENCH_REDIS_URL)"
        )
    server = tools.RedisServer(binary, ctx.scratch("redis-server")).start()
    url = f"redis://127.0.0.1:{server.port}/0"
    redis.Redis.from_url(url, socket_timeout=2).ping()
    return url, server


def _purge(url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    removed = 0
    # Keys are "{<prefix>:<build id>...}..." (a cluster hash tag around the namespace).
    for key in client.scan_iter(match=f"{{{prefix}:*", count=1000):
        removed += client.delete(key)
    return removed


def run(ctx: Context) -> Report:
    report = Report("redis", ctx, {}, "hit and stale with the Redis handler and the memory tier")
    report.columns = {"hit": hit.COLUMNS, "stale": stale.COLUMNS}
    if importlib.util.find_spec("pyisr.cache.redis") is None:
        report.skipped = "no redis handler"
        log("skipped: no redis handler (pyisr/cache/redis.py does not exist yet)")
        return report
    if importlib.util.find_spec("redis") is None:
        report.skipped = "the redis client is not installed (pip install 'pyisr[redis]')"
        return report
    try:
        url, started = _redis_url(ctx)
    except Skip as exc:
        report.skipped = str(exc)
        return report
    prefix = f"bench-{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in url else "?"
    cache_url = f"{url}{sep}prefix={prefix}"
    report.params["cache"] = cache_url
    env = {"PYISR_CACHE": cache_url}
    try:
        try:
            hit.measure(ctx, report, ctx.scratch("redis-hit"), env=env, label="redis ")
        except Skip as exc:
            report.note(f"hit part skipped: {exc}")
        stale.measure(ctx, report, ctx.scratch("redis-stale"), env=env, label="redis ")
    finally:
        try:
            removed = _purge(url, prefix)
            log(f"removed {removed} Redis keys under {prefix}")
        except Exception as exc:  # noqa: BLE001 - cleanup is best effort
            report.note(f"could not remove the keys under {prefix}: {exc}")
        if started is not None:
            started.stop()
    return report
