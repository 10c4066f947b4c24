"""Processes for the ``FileSystemCache`` multi-process tests (started through multiprocessing).

Bodies (and the stand-in encodings every other write stores with its body) are built
from a counter so a reader can rebuild the exact bytes an entry must hold from its
headers: any mix of two writes (a torn entry) is detected.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from pyisr.cache import filesystem
from pyisr.cache.entry import CacheEntry, make_etag
from pyisr.cache.filesystem import FileSystemCache

CRASH_KEYS = ["/k/0", "/k/1", "/k/ü", "data:" + "ab" * 32]


def make_body(key: str, n: int, size: int) -> bytes:
    marker = f"[{key}#{n}:{size}]".encode()
    return (marker * (size // len(marker) + 1))[:size]


def make_encodings(key: str, n: int, size: int) -> dict[str, bytes]:
    """Stand-ins for the stored encodings of write ``n`` (every other write has some):
    built like bodies, so a mix of two writes' bytes is detected in them too."""
    if n % 2:
        return {}
    return {"br": make_body(key + "|br", n, size // 3 + 1), "gzip": make_body(key + "|gz", n, size // 2 + 1)}


def make_entry(key: str, n: int, size: int) -> CacheEntry:
    return CacheEntry(
        key=key,
        body=make_body(key, n, size),
        created_at=time.time(),
        revalidate=60,
        headers={"x-n": str(n), "x-size": str(size)},
        tags=(f"tag{n % 7}",),
        encodings=make_encodings(key, n, size),
    )


def entry_problem(key: str, entry: CacheEntry) -> str | None:
    """Why ``entry`` is not one whole write of ``key`` (``None`` if it is)."""
    if entry.key != key:
        return f"asked for {key!r}, got {entry.key!r}"
    try:
        n, size = int(entry.headers["x-n"]), int(entry.headers["x-size"])
    except (KeyError, ValueError) as exc:
        return f"{key}: bad headers {dict(entry.headers)!r} ({exc})"
    if len(entry.body) != size:
        return f"{key}: body is {len(entry.body)} bytes, headers say {size}"
    if entry.etag != make_etag(entry.body):
        return f"{key}: etag {entry.etag} does not match the body"
    if entry.body != make_body(key, n, size):
        return f"{key}: body is not write #{n}"
    if dict(entry.encodings) != make_encodings(key, n, size):
        return f"{key}: encodings are not write #{n}'s"
    return None


def _sizes(rng: random.Random, big: bool) -> int:
    # Log-uniform between 1 KB (256 KB if ``big``) and 2 MB: a big write is slow to
    # fsync, so a writer killed at a random moment is likely to be in the middle of one.
    return int(2 ** rng.uniform(18 if big else 10, 21))


def _stopped(stop: str) -> bool:
    return os.path.exists(stop)  # a stat per loop: negligible next to the cache I/O


def writer(root: str, seed: int, stop: str, big: bool = False, pause: float = 0.0) -> None:
    """Write random keys with bodies of varying size until file ``stop`` exists (or SIGKILL).

    ``pause`` (seconds between writes) keeps the disk from saturating on a busy machine.
    """
    rng = random.Random(seed)

    async def run() -> None:
        cache = FileSystemCache(root)
        n = seed * 1_000_000
        while not _stopped(stop):
            n += 1
            await cache.set(make_entry(rng.choice(CRASH_KEYS), n, _sizes(rng, big)))
            if pause:
                await asyncio.sleep(pause)

    asyncio.run(run())


def reader(root: str, stop: str, out: str) -> None:
    """Read the crash keys until file ``stop`` exists; write counts and problems to ``out``."""

    async def run() -> dict[str, object]:
        cache = FileSystemCache(root)
        ok = missing = 0
        problems: list[str] = []
        while not _stopped(stop):
            for key in CRASH_KEYS:
                entry = await cache.get(key)
                if entry is None:
                    missing += 1
                    continue
                problem = entry_problem(key, entry)
                if problem:
                    problems.append(problem)
                else:
                    ok += 1
        return {"ok": ok, "missing": missing, "problems": problems[:20]}

    Path(out).write_text(json.dumps(asyncio.run(run())))


def _publish(path: str, text: str) -> None:
    """Create ``path`` with ``text`` in one step, so a poller never reads it half-written."""
    Path(path + ".tmp").write_text(text)
    os.replace(path + ".tmp", path)


def hold_lock(root: str, key: str, ready: str) -> None:
    """Take the regeneration lock, say so by creating ``ready``, then wait to be killed."""

    async def run() -> None:
        cache = FileSystemCache(root)
        token = await cache.acquire_lock(key, 60)
        await asyncio.to_thread(_publish, ready, "locked" if token else "refused")
        await asyncio.sleep(600)

    asyncio.run(run())


def die_between_renames(
    root: str, key: str, body: bytes, created_at: float, encodings: dict[str, bytes] | None = None
) -> None:
    """Store an entry but SIGKILL ourselves after the body rename, before the metadata one."""
    real_replace = os.replace
    calls = 0

    def replace(src: object, dst: object) -> None:
        nonlocal calls
        real_replace(src, dst)  # type: ignore[arg-type]
        calls += 1
        if calls == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    filesystem.os.replace = replace  # type: ignore[assignment]
    entry = CacheEntry(key=key, body=body, created_at=created_at, revalidate=60, encodings=encodings or {})
    asyncio.run(FileSystemCache(root).set(entry))
    sys.exit("still alive after the simulated crash")


def append_tags(root: str, prefix: str, count: int, compact_bytes: int) -> None:
    """Append ``count`` invalidations while other processes do too and the log compacts.

    After every append, re-read the log from the start: our line must be in it (an
    append that went to a file compaction had just replaced would be missing).
    """

    async def run() -> None:
        cache = FileSystemCache(root, fsync=False, tag_log_compact_bytes=compact_bytes)
        for i in range(1, count + 1):
            tag = f"{prefix}-{i % 10}"
            await cache.revalidate_tags([tag], float(i))
            changes = await cache.tag_changes(None)
            assert changes is not None
            if changes[1].get(tag, 0.0) < i:
                sys.exit(f"append {tag}@{i} lost")

    asyncio.run(run())
