"""A capped cache: the file-system cache stays under ``max_bytes``, lock files go away, long
keys never name a file, expired entries are deleted, and every Redis key expires.

Disk usage is measured the way ``du`` does (``st_blocks * 512`` of every file and
directory under the root), never from the handler's own numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import _fs_worker
import pytest
from redis_support import redis_py, redis_url, unique_prefix  # noqa: F401

from pyisr.cache.entry import CacheEntry
from pyisr.cache.files import exclusive_lock
from pyisr.cache.filesystem import FileSystemCache
from pyisr.cache.fs_budget import DEFAULT_MAX_BYTES, LOW_WATER, NEGATIVE_SHARE
from pyisr.cache.fs_layout import MAX_SEGMENT_BYTES, WRITE_LOCK_STRIPES
from pyisr.cache.tier import MemoryTier
from pyisr.cache.urls import build_handler, handler_from_url
from pyisr.config import load_config
from pyisr.paths import MAX_KEY_BYTES
from pyisr.site_store import open_site_cache

MB = 1024 * 1024
TESTS = Path(__file__).parent


def disk_usage(root: Path) -> int:
    """Bytes on disk under ``root``: every file and directory, ``root`` included."""
    total = os.lstat(root).st_blocks * 512
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def files_under(path: Path) -> list[Path]:
    return [Path(d, f) for d, _dirs, names in os.walk(path) for f in names]


def page(key: str, body: bytes = b"<p>page</p>", *, status: int = 200, **kw: Any) -> CacheEntry:
    kw.setdefault("created_at", time.time())
    return CacheEntry(key=key, body=body, revalidate=60, status=status, **kw)


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory in memory (``/dev/shm``) when there is one, else ``tmp_path``.

    For the test writing 22,000 entries: creating a file costs ~0.2 ms on some disks
    (ext4 mounted with ``discard``), which would make it take a minute there.
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="pyisr-test-", dir=shm))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def caches() -> AsyncIterator[list[FileSystemCache]]:
    """FileSystemCache objects a test makes; closed at the end (their threads too)."""
    made: list[FileSystemCache] = []
    yield made
    for cache in made:
        await cache.close()


# -- the cap -----------------------------------------------------------------------------------


async def test_a_crawler_cannot_push_real_pages_out(fast_dir: Path, caches: list[FileSystemCache]) -> None:
    """20,000 unknown ids (404) and 2,000 big entries against a 20 MB cap: the disk stays
    under it, the 404s stay within their share, and real pages read regularly survive."""
    cap = 20 * MB
    root = fast_dir / "cache"
    cache = FileSystemCache(root, fsync=False, max_bytes=cap)
    caches.append(cache)
    real = [page(f"/real/{i}", b"<main>%d</main>" % i * 1500) for i in range(40)]
    for entry in real:  # through the public API: the first write builds the index
        assert await cache.set(entry)
    peak = 0
    for i in range(22_000):
        if i % 11 == 5:  # 2,000 big ones: 60 kB keys (hashed) or 60 kB bodies
            n = i // 11
            if n % 2:
                key, body = f"/big/{n}/" + "k" * 60_000, b"small body"
            else:
                key, body = f"/big/{n}/" + "x" * 2000, os.urandom(60_000)
            cache._set_sync(page(key, body))
        else:  # a crawler's unknown id
            cache._set_sync(page(f"/items/{i}", b"<h1>Not found</h1>", status=404))
        if i % 250 == 0:
            for entry in real:  # the real pages are read regularly
                assert await cache.get(entry.key) == entry
        if i % 1000 == 999:
            peak = max(peak, disk_usage(root))
            assert peak <= cap, f"{peak} bytes on disk after {i + 1} writes"
    await cache.evict()
    usage = disk_usage(root)
    assert usage <= cap and peak <= cap
    for entry in real:
        assert await cache.get(entry.key) == entry
    # The 404s were evicted among themselves: the early ones are gone, and what is left
    # of them fits their share.
    assert await cache.get("/items/1") is None
    assert await cache.get("/items/21999") is not None
    info = cache.describe()
    assert info["max_bytes"] == cap and 0 < info["bytes"] <= cap
    assert info["budget"]["negative_bytes"] <= NEGATIVE_SHARE * cap
    negatives = [p for p in (root / "entries/items").iterdir() if p.suffix == ".json"]
    assert 50 < len(negatives) and len(negatives) * 8192 <= NEGATIVE_SHARE * cap
    assert len(list((root / "locks").iterdir())) <= WRITE_LOCK_STRIPES
    assert len(files_under(root)) < 2000  # not 48,000 files


async def test_evicted_entries_read_as_none_least_recently_used_first(
    tmp_path: Path, caches: list[FileSystemCache]
) -> None:
    cap = 2 * MB
    cache = FileSystemCache(tmp_path / "cache", fsync=False, max_bytes=cap)
    caches.append(cache)
    body = b"x" * 60_000  # 64 kB on disk with its metadata's block
    for i in range(20):
        assert await cache.set(page(f"/p/{i}", body))
    await cache.get("/p/0")  # used: the least recently used is now /p/1
    for i in range(20, 40):
        assert await cache.set(page(f"/p/{i}", body))
    await cache.evict()
    assert disk_usage(cache.root) <= cap
    assert await cache.get("/p/0") is not None
    assert await cache.get("/p/1") is None and await cache.get("/p/2") is None
    assert await cache.get("/p/39") is not None
    assert not (cache.root / "entries/p/1.html").exists()
    assert cache.budget.evicted > 0


async def test_a_scan_sees_what_other_processes_wrote(tmp_path: Path, caches: list[FileSystemCache]) -> None:
    """Another process's entries count: the first write's scan finds them and evicts."""
    root = tmp_path / "cache"
    other = FileSystemCache(root, fsync=False)  # the default cap: it evicts nothing
    caches.append(other)
    for i in range(60):
        await other.set(page(f"/other/{i}", b"y" * 40_000))
    assert disk_usage(root) > 2 * MB
    capped = FileSystemCache(root, fsync=False, max_bytes=2 * MB)
    caches.append(capped)
    assert capped.describe()["bytes"] is None  # not scanned before the first write
    await capped.set(page("/mine", b"z"))
    await capped.evict()
    assert disk_usage(root) <= LOW_WATER * 2 * MB + 64 * 1024
    assert await capped.get("/mine") is not None
    assert await other.get("/other/0") is None  # the oldest went first


async def test_writes_start_eviction_in_the_background(tmp_path: Path, caches: list[FileSystemCache]) -> None:
    """Through the public ``set`` alone (no ``evict()``): the cap holds."""
    cap = 1 * MB
    cache = FileSystemCache(tmp_path / "cache", fsync=False, max_bytes=cap)
    caches.append(cache)
    for i in range(300):
        await cache.set(page(f"/bg/{i}", os.urandom(20_000)))
        assert disk_usage(cache.root) <= cap
    assert cache.budget.evicted > 200


def test_the_cap_reaches_the_handler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = handler_from_url(f"file://{tmp_path}/a?max_bytes=20MB")
    assert isinstance(fs, FileSystemCache) and fs.budget.max_bytes == 20 * MB
    assert isinstance(fs, FileSystemCache) and fs.root == tmp_path / "a"
    tiered = build_handler(str(tmp_path / "b"), max_bytes=30 * MB)
    assert isinstance(tiered, MemoryTier) and isinstance(tiered.backing, FileSystemCache)
    assert tiered.backing.budget.max_bytes == 30 * MB
    assert tiered.describe()["max_bytes"] == 30 * MB
    default = FileSystemCache(tmp_path / "c")
    assert default.budget.max_bytes == DEFAULT_MAX_BYTES == 1024**3
    site = tmp_path / "site"
    site.mkdir()
    config = load_config(site, environ={"PYISR_CACHE_MAX_BYTES": "40MB"})
    handler = open_site_cache(site, config)
    assert isinstance(handler, MemoryTier) and isinstance(handler.backing, FileSystemCache)
    assert handler.backing.budget.max_bytes == 40 * MB


async def test_deleting_removes_the_directories_it_left_empty(
    tmp_path: Path, caches: list[FileSystemCache]
) -> None:
    """Otherwise a crawler on ``/users/<id>/profile`` leaves one empty directory per id."""
    root = tmp_path / "cache"
    cache = FileSystemCache(root, fsync=False)
    caches.append(cache)
    await cache.set(page("/users/1/profile"))
    await cache.set(page("/users/2/profile"))
    await cache.set(page("data:" + "ab" * 32))
    await cache.delete("/users/1/profile")
    await cache.delete("data:" + "ab" * 32)
    assert not (root / "entries/users/1").exists() and (root / "entries/users/2").is_dir()
    await cache.delete("/users/2/profile")
    assert sorted(p.name for p in root.iterdir()) == ["data", "entries", "locks", "long", "tags.log"]
    assert list((root / "entries").iterdir()) == list((root / "data").iterdir()) == []
    assert await cache.set(page("/users/1/profile"))  # made again
    assert await cache.get("/users/1/profile") is not None


def test_writers_and_deleters_sharing_directories_never_fail(fast_dir: Path) -> None:
    """A deletion removes a directory at the moment another key's writer needs it: the
    writer makes it again, and every write succeeds."""
    cache = FileSystemCache(fast_dir / "cache", fsync=False)
    errors: list[BaseException] = []

    def churn(worker: int) -> None:
        try:
            for i in range(300):
                key = f"/d/{i % 3}/{worker}/p"
                assert cache._set_sync(page(key, b"%d" % i))
                cache._delete_sync(key)
        except BaseException as exc:  # reported below, with the thread's traceback lost
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert list((fast_dir / "cache/entries").iterdir()) == []


# -- lock files --------------------------------------------------------------------------------


async def test_lock_files_do_not_accumulate(fast_dir: Path, caches: list[FileSystemCache]) -> None:
    """Regeneration locks remove their file; write locks share a fixed set of stripes."""
    cache = FileSystemCache(fast_dir / "cache", fsync=False)
    caches.append(cache)
    locks = cache.root / "locks"

    def lock_files() -> list[str]:
        return sorted(p.name for p in locks.iterdir())

    for i in range(1500):
        token = await cache.acquire_lock(f"/lock/{i}", 30)
        assert token
        await cache.release_lock(f"/lock/{i}", token)
        await cache.set(page(f"/lock/{i}"))  # and a write lock per key
    await cache.delete("/lock/3")
    assert not [name for name in lock_files() if name.endswith(".lock")]
    assert 0 < len(lock_files()) <= WRITE_LOCK_STRIPES  # 1,500 keys, at most 256 files
    held = await cache.acquire_lock("/held", 30)
    assert held and len([name for name in lock_files() if name.endswith(".lock")]) == 1
    await cache.close()  # closing releases (and removes) it
    assert not [name for name in lock_files() if name.endswith(".lock")]


def test_lock_files_left_by_a_killed_holder_are_swept(tmp_path: Path) -> None:
    cache = FileSystemCache(tmp_path / "cache")
    left = cache.root / "locks" / ("ab" * 20 + ".lock")
    left.touch()  # what a SIGKILLed regenerating process leaves
    assert asyncio.run(cache.sweep_temp_files()) == 0
    assert not left.exists()


_BUMP = """
import sys
from pathlib import Path
from pyisr.cache.files import exclusive_lock
lock, counter, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    with exclusive_lock(lock, blocking=True, remove=True):
        counter.write_text(str(int(counter.read_text()) + 1))
"""


def test_removed_lock_files_still_exclude(fast_dir: Path) -> None:
    """Threads and another process increment a counter under a lock whose file each holder
    removes: no increment is lost, so no two ever held the lock at once."""
    lock, counter = fast_dir / "k.lock", fast_dir / "counter"
    counter.write_text("0")
    proc = subprocess.Popen([sys.executable, "-c", _BUMP, str(lock), str(counter), "400"])

    def bump() -> None:
        for _ in range(400):
            with exclusive_lock(lock, blocking=True, remove=True):
                counter.write_text(str(int(counter.read_text()) + 1))

    threads = [threading.Thread(target=bump) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert proc.wait(60) == 0
    assert counter.read_text() == "1600"
    assert not lock.exists()


# -- no torn entry while evicting -------------------------------------------------------------

_EVICTING_WRITER = """
import asyncio, os, random, sys
sys.path.insert(0, sys.argv[3])
import _fs_worker
from pyisr.cache.filesystem import FileSystemCache

async def main(root, stop):
    cache = FileSystemCache(root, fsync=False, max_bytes=600_000)
    rng, n = random.Random(5), 0
    while not os.path.exists(stop):
        n += 1
        key = rng.choice(_fs_worker.CRASH_KEYS) if n % 3 else f"/fill/{n}"
        await cache.set(_fs_worker.make_entry(key, n, rng.randint(100, 50_000)))
        if n % 25 == 0:
            await cache.evict()
    await cache.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.fixture
def mp() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pyisr.cache.filesystem", "asyncio", "json", "random"])
    return ctx


@pytest.fixture
def stop_file(tmp_path: Path) -> Iterator[Path]:
    stop = tmp_path / "stop"
    yield stop
    stop.touch()  # whatever happened, the other processes end


async def test_no_torn_entry_while_another_cache_evicts(
    tmp_path: Path, mp: multiprocessing.context.BaseContext, stop_file: Path, caches: list[FileSystemCache]
) -> None:
    """A process writes and evicts under a small cap, a second cache object evicts everything
    it knows, and readers in this process and another never see a torn entry."""
    root = tmp_path / "cache"
    FileSystemCache(root)
    out = tmp_path / "reader.json"
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _EVICTING_WRITER, str(root), str(stop_file), str(TESTS)
    )
    reader = mp.Process(target=_fs_worker.reader, args=(str(root), str(stop_file), str(out)))  # type: ignore[attr-defined]
    reader.start()
    evictor = FileSystemCache(root, fsync=False, max_bytes=64 * 1024)
    local_reader = FileSystemCache(root)
    caches += [evictor, local_reader]
    problems: list[str] = []
    seen = {"ok": 0, "missing": 0}
    deadline = time.monotonic() + 1.5

    async def read() -> None:
        while time.monotonic() < deadline:
            for key in _fs_worker.CRASH_KEYS:
                loaded = await local_reader.get(key)
                if loaded is None:
                    seen["missing"] += 1
                    continue
                problem = _fs_worker.entry_problem(key, loaded)
                if problem:
                    problems.append(problem)
                else:
                    seen["ok"] += 1
            await asyncio.sleep(0)

    async def evict() -> None:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            await evictor.set(page(f"/evictor/{n}", b"e" * 20_000))  # and so rescans
            await evictor.evict()
            await asyncio.sleep(0.005)

    try:
        await asyncio.gather(read(), evict())
    finally:
        await asyncio.to_thread(stop_file.touch)
        assert await asyncio.wait_for(writer.wait(), 60) == 0
        await asyncio.to_thread(reader.join, 60)
    assert reader.exitcode == 0
    result = json.loads(out.read_text())
    assert problems == [] and result["problems"] == []
    assert seen["ok"] > 20 and result["ok"] > 20  # the readers really read entries
    assert seen["missing"] > 0 and result["missing"] > 0  # and met evicted ones
    assert evictor.budget.evicted > 0


# -- expired entries ----------------------------------------------------------------------------


async def test_expired_entries_are_deleted(tmp_path: Path, caches: list[FileSystemCache]) -> None:
    """Entries a day past their expire, and written a day ago, go first, far under the cap."""
    root = tmp_path / "cache"
    writer = FileSystemCache(root, fsync=False)
    caches.append(writer)
    now, day = time.time(), 86_400
    long_ago = now - 3 * day
    await writer.set(page("/gone", created_at=long_ago, expire=10))
    await writer.set(page("/forever", created_at=long_ago))
    await writer.set(page("/later", created_at=long_ago, expire=10 * day))
    await writer.set(page("/renewed", created_at=long_ago, expire=10))
    for name in ("gone", "forever", "later", "renewed"):  # written two days ago
        os.utime(root / f"entries/{name}.json", (now - 2 * day, now - 2 * day))
    # Written just now by a clock far behind ours (a fake one, say): kept for a day.
    await writer.set(page("/just-written", created_at=long_ago, expire=10))

    cache = FileSystemCache(root, fsync=False, max_bytes=10 * MB)
    caches.append(cache)
    await asyncio.to_thread(cache.budget.scan)  # it knows /renewed as expired...
    await writer.set(page("/renewed", b"fresh", created_at=now, expire=3600))  # ...rewritten since
    assert await cache.evict() == 1
    assert not (root / "entries/gone.json").exists() and not (root / "entries/gone.html").exists()
    assert await cache.get("/gone") is None
    for key in ("/forever", "/later", "/just-written"):
        assert await cache.get(key) is not None
    renewed = await cache.get("/renewed")  # the eviction's fence kept the fresh entry
    assert renewed is not None and renewed.body == b"fresh"
    assert await cache.evict() == 0


# -- keys too long for a file name -------------------------------------------------------------


async def test_long_and_deep_keys_never_name_a_file(tmp_path: Path, caches: list[FileSystemCache]) -> None:
    root = tmp_path / "cache"
    cache = FileSystemCache(root, fsync=False)
    caches.append(cache)
    keys = [
        "/" + "a" * 65_000,  # a 65 kB path
        "/x/" + "b" * (MAX_KEY_BYTES - 3) + "c",  # just past the longest key
        "/" + "/".join(["s"] * 100),  # deep, but short
        "/" + "/".join(["é" * 90] * 6),  # over MAX_KEY_BYTES in bytes, not in characters
    ]
    for key in keys:
        assert await cache.set(page(key))
        assert (await cache.get(key)) == page(key, created_at=(await cache.get(key)).created_at)  # type: ignore[union-attr]
    written = [p.relative_to(root) for p in files_under(root / "entries") + files_under(root / "long")]
    assert len(written) == 2 * len(keys)
    assert all(p.parts[0] == "long" and len(p.parts) == 3 for p in written)
    assert all(len(part.encode()) <= MAX_SEGMENT_BYTES for p in written for part in p.parts)
    # A key of MAX_KEY_BYTES with short segments keeps its readable path.
    readable = "/" + "/".join(["seg"] * 20)
    await cache.set(page(readable))
    assert (root / "entries" / Path(*["seg"] * 20)).with_suffix(".html").exists()


# -- Redis: every key expires --------------------------------------------------------------------


async def test_every_redis_key_expires(redis_url: str) -> None:  # noqa: F811
    redis_module = redis_py()
    from redis.asyncio import Redis

    prefix = unique_prefix()
    old = redis_module.RedisCache.from_url(redis_url, prefix=prefix, build_id="old")
    capped = redis_module.RedisCache.from_url(redis_url, prefix=prefix, build_id="capped", entry_ttl=60)
    raw = Redis.from_url(redis_url)
    day, year = redis_module.TTL_MARGIN, redis_module.MAX_ENTRY_LIFETIME
    try:
        now = time.time()
        await old.set(page("/no-expire", created_at=now))
        await old.set(page("/expire", created_at=now, expire=3600))
        await old.set(page("/long-ago", created_at=1000.0))
        await old.set(page("/forever", created_at=now, expire=10 * year))
        await old.revalidate_tags(["t1", "t2"], now)
        token = await old.acquire_lock("/no-expire", 30)
        await capped.set(page("/capped", created_at=now, expire=3600))

        async def pttl(cache: Any, key: str) -> float:
            return int(await raw.pttl(cache.entry_key(key))) / 1000

        assert year + day - 5 < await pttl(old, "/no-expire") <= year + day
        assert 3600 + day - 5 < await pttl(old, "/expire") <= 3600 + day
        assert day - 5 < await pttl(old, "/long-ago") <= day  # created long ago: the margin only
        assert year + day - 5 < await pttl(old, "/forever") <= year + day  # capped at a year
        assert 55 < await pttl(capped, "/capped") <= 60  # entry_ttl caps it
        tag_ttl = redis_module.TAG_TTL
        for key in (old.tags_key, f"{{{old.namespace}}}:tagseq"):
            assert tag_ttl - 5 < int(await raw.pttl(key)) / 1000 <= tag_ttl
        assert 0 < int(await raw.pttl(old.lock_key("/no-expire"))) <= 30_000
        assert token
        # Every key of the old build expires by itself: none is kept for ever.
        names = [k async for k in raw.scan_iter(match=f"*{prefix}:old*")]
        assert len(names) >= 7
        assert all([int(await raw.pttl(name)) > 0 for name in names])
    finally:
        for cache in (old, capped):
            await cache.clear()
            await cache.close()
        await raw.aclose()
