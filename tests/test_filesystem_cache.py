"""FileSystemCache: layout, atomicity under SIGKILL, fencing, the tag log and the locks."""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import multiprocessing
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import _fs_worker
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyisr.cache.entry import CacheEntry, EntryKind, FailureRecord
from pyisr.cache.filesystem import FileSystemCache
from pyisr.cache.fs_layout import key_to_slot

ODD_KEYS = [
    "/",
    "/index",
    "/blog/1",
    "/a",
    "/a/b",
    "/a.html",
    "/a.html/b",
    "/a.json/c.json",
    "/a%2Fb",
    "/%25",
    "/..",
    "/.",
    "/../../etc/passwd",
    "/x/../y",
    "/.hidden",
    "/a//b",
    "/trailing/",
    "/con",
    "/nul",
    "/back\\slash",
    "/nul\x00byte",
    "/ctl\x01\x7f",
    "/日本語/ページ",
    "/emoji/😀",
    "/" + "x" * 300,
    "/" + "é" * 150,
    "/" + "/".join(["seg"] * 1200),
    "data:" + "0f" * 32,
    "data:XYZ",
    "data:",
    "relative/key",
    "",
    "..",
]


def entry(key: str, body: bytes = b"body", created_at: float = 1000.0, **kw: object) -> CacheEntry:
    return CacheEntry(key=key, body=body, created_at=created_at, revalidate=60, **kw)  # type: ignore[arg-type]


def files_under(path: Path) -> list[Path]:
    return [Path(d, f) for d, _dirs, names in os.walk(path) for f in names]


def is_inside(path: Path, root: Path) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def log_header(root: Path) -> str:
    with open(root / "tags.log", "rb") as f:
        return json.loads(f.readline())["log"]


def wait_for_file(path: Path, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.read_text()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "site" / ".pyisr" / "cache"


@pytest.fixture
async def cache(root: Path) -> AsyncIterator[FileSystemCache]:
    handler = FileSystemCache(root)
    yield handler
    await handler.close()


# -- layout and round trips ----------------------------------------------------------------


async def test_layout_is_browsable(cache: FileSystemCache, root: Path) -> None:
    await cache.set(entry("/blog/1", b"<h1>one</h1>"))
    await cache.set(entry("/", b"home"))
    await cache.set(entry("/a", b"a"))
    await cache.set(entry("/a/b", b"ab"))
    digest = "3fa2" + "0" * 60
    await cache.set(entry("data:" + digest, b"{}", kind=EntryKind.DATA))
    assert (root / "entries/blog/1.html").read_bytes() == b"<h1>one</h1>"
    assert json.loads((root / "entries/blog/1.json").read_text())["key"] == "/blog/1"
    assert (root / "entries/index.html").read_bytes() == b"home"
    assert (root / "entries/a.html").read_bytes() == b"a"
    assert (root / "entries/a/b.html").read_bytes() == b"ab"
    assert (root / f"data/3f/{digest[2:]}.bin").read_bytes() == b"{}"
    assert (root / f"data/3f/{digest[2:]}.json").exists()


async def test_odd_keys_round_trip_and_stay_inside_root(cache: FileSystemCache, root: Path) -> None:
    for i, key in enumerate(ODD_KEYS):
        stored = entry(key, f"body {i} {key!r}".encode(), tags=("t", key[:20]), status=200 + i)
        assert await cache.set(stored)
    for i, key in enumerate(ODD_KEYS):
        assert await cache.get(key) == entry(
            key, f"body {i} {key!r}".encode(), tags=("t", key[:20]), status=200 + i
        )
    # Nothing was written outside the cache root, and no path component is special.
    site = root.parent.parent
    assert {p.relative_to(site).parts[0] for p in files_under(site)} == {".pyisr"}
    for path in files_under(root):
        assert is_inside(path, root)
        assert not {".", ".."} & set(path.relative_to(root).parts)
    assert sorted([k async for k in cache.keys()]) == sorted(ODD_KEYS)
    assert len({key_to_slot(root, k).meta for k in ODD_KEYS}) == len(ODD_KEYS)


async def test_a_staging_directory_reads_back_as_a_normal_cache(root: Path) -> None:
    """What a build writes straight into place (no locks, temps) is an ordinary cache."""
    staged = FileSystemCache(root, fsync=False, staging=True)
    for i, key in enumerate(ODD_KEYS):
        assert await staged.set(entry(key, f"body {i}".encode(), tags=("t",)))
    await staged.close()
    assert not [p for p in files_under(root) if p.name.endswith(".tmp")]
    assert not list((root / "locks").iterdir())
    reader = FileSystemCache(root)
    try:
        for i, key in enumerate(ODD_KEYS):
            assert await reader.get(key) == entry(key, f"body {i}".encode(), tags=("t",))
    finally:
        await reader.close()


async def test_metadata_survives_a_round_trip(cache: FileSystemCache) -> None:
    failure = FailureRecord(at=1234.5, exc_type="TimeoutError", message="render took too long", count=3)
    stored = CacheEntry(
        key="/route",
        body=b'{"ok": true}',
        created_at=1000.25,
        revalidate=None,
        kind=EntryKind.ROUTE,
        status=404,
        headers={"content-type": "application/json", "x-ü": "ß"},
        tags=("a", "b"),
        retry_at=1250.0,
        last_failure=failure,
    )
    await cache.set(stored)
    loaded = await cache.get("/route")
    assert loaded == stored
    assert loaded is not None and loaded.last_failure == failure and loaded.retry_at == 1250.0


async def test_custom_etag_is_kept(cache: FileSystemCache) -> None:
    stored = entry("/etag", b"abc", etag='W/"custom"')
    await cache.set(stored)
    assert await cache.get("/etag") == stored


async def test_a_second_instance_sees_entries(cache: FileSystemCache, root: Path) -> None:
    await cache.set(entry("/shared", b"x"))
    other = FileSystemCache(root)
    assert await other.get("/shared") == entry("/shared", b"x")
    assert await other.reload("/shared") == entry("/shared", b"x")
    assert await other.get("/missing") is None


async def test_large_body_round_trips(cache: FileSystemCache) -> None:
    body = os.urandom(3 * 1024 * 1024)
    await cache.set(entry("/big", body))
    loaded = await cache.get("/big")
    assert loaded is not None and loaded.body == body


async def test_delete_and_keys(cache: FileSystemCache, root: Path) -> None:
    for key in ("/blog/1", "/blog/2", "/blog", "/about", "data:" + "ab" * 32):
        await cache.set(entry(key))
    assert sorted([k async for k in cache.keys("/blog/")]) == ["/blog/1", "/blog/2"]
    assert sorted([k async for k in cache.keys("/blog")]) == ["/blog", "/blog/1", "/blog/2"]
    assert [k async for k in cache.keys("data:")] == ["data:" + "ab" * 32]
    await cache.delete("/blog/1")
    await cache.delete("/never-stored")
    assert await cache.get("/blog/1") is None
    assert not (root / "entries/blog/1.html").exists() and not (root / "entries/blog/1.json").exists()
    assert sorted([k async for k in cache.keys("/")]) == ["/about", "/blog", "/blog/2"]


def test_describe_does_not_walk(root: Path) -> None:
    info = FileSystemCache(root).describe()
    assert info["handler"] == "filesystem" and info["root"] == str(root)


async def test_describe_reports_the_cap_and_the_bytes_held(root: Path) -> None:
    cache = FileSystemCache(root, fsync=False, max_bytes=5 * 1024 * 1024)
    info = cache.describe()
    assert info["max_bytes"] == 5 * 1024 * 1024 and info["bytes"] is None  # nothing scanned yet
    await cache.set(entry("/a", b"x" * 10_000))
    await cache.evict()
    info = cache.describe()
    assert 16 * 1024 <= info["bytes"] <= 5 * 1024 * 1024
    assert info["budget"]["entries"] == 1
    json.dumps(info)  # the health endpoint shows it
    await cache.close()


def test_unusable_root_raises_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError) as info:
        FileSystemCache(blocker / "cache")
    assert str(blocker) in str(info.value)


def _deny_under(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """Make the OS refuse access below ``denied``, as chmod does for non-root users.

    The tests run as root in CI, which chmod cannot stop; the refusal is injected at the
    system-call boundary instead, so the handler's own error handling is what is tested.
    """
    real_access, real_open = os.access, os.open

    def access(path: object, mode: int, *args: object, **kwargs: object) -> bool:
        if str(path).startswith(str(denied)):
            return False
        return real_access(path, mode, *args, **kwargs)  # type: ignore[arg-type]

    def open_(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if str(path).startswith(str(denied)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    real_builtin_open = builtins.open

    def builtin_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if str(file).startswith(str(denied)) and any(c in mode for c in "wxa+"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_builtin_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(builtins, "open", builtin_open)


def test_unreadable_root_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    if os.geteuid() == 0:
        _deny_under(monkeypatch, locked)
    try:
        with pytest.raises(PermissionError) as info:
            FileSystemCache(locked)
        assert str(locked) in str(info.value)
    finally:
        locked.chmod(0o700)


async def test_write_permission_errors_raise(
    cache: FileSystemCache, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "entries").chmod(0o500)
    if os.geteuid() == 0:
        _deny_under(monkeypatch, root / "entries")
    try:
        with pytest.raises(PermissionError):
            await cache.set(entry("/x"))
    finally:
        (root / "entries").chmod(0o700)


# -- fencing --------------------------------------------------------------------------------


async def test_fencing_refuses_older_entries(cache: FileSystemCache) -> None:
    assert await cache.set(entry("/p", b"new", created_at=200.0))
    assert await cache.set(entry("/p", b"old", created_at=100.0)) is False
    assert (await cache.get("/p")) == entry("/p", b"new", created_at=200.0)
    assert await cache.set(entry("/p", b"same time", created_at=200.0))
    assert (await cache.get("/p")) == entry("/p", b"same time", created_at=200.0)
    assert await cache.set(entry("/p", b"newer", created_at=300.0))
    assert (await cache.get("/p")) == entry("/p", b"newer", created_at=300.0)


async def test_fencing_is_atomic_between_instances(root: Path) -> None:
    caches = [FileSystemCache(root, fsync=False) for _ in range(4)]
    stored = [entry("/race", f"v{i}".encode(), created_at=float(i)) for i in range(40)]
    random.Random(1).shuffle(stored)
    await asyncio.gather(*(caches[i % 4].set(e) for i, e in enumerate(stored)))
    assert (await caches[0].get("/race")) == entry("/race", b"v39", created_at=39.0)


# -- torn entries and crashed writers ---------------------------------------------------------


async def test_a_torn_pair_is_never_returned(
    cache: FileSystemCache, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await cache.set(entry("/t", b"aaaa"))
    (root / "entries/t.html").write_bytes(b"bbbb")  # same size, other content
    with caplog.at_level(logging.WARNING):
        assert await cache.get("/t") is None
    assert "inconsistent" in caplog.text
    (root / "entries/t.json").write_text("{not json")
    assert await cache.get("/t") is None
    assert await cache.set(entry("/t", b"fixed"))  # an unreadable entry is simply replaced
    assert await cache.get("/t") == entry("/t", b"fixed")


@pytest.fixture
def mp() -> multiprocessing.context.BaseContext:
    # A fork server preloads the cache code, so starting (and restarting) a process
    # takes milliseconds and never forks this multi-threaded test process. (It cannot
    # preload _fs_worker itself: Python 3.11 does not give it this sys.path.)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pyisr.cache.filesystem", "asyncio", "json", "random"])
    return ctx


def run_to_death(mp: multiprocessing.context.BaseContext, target: object, *args: object) -> int | None:
    proc = mp.Process(target=target, args=args)  # type: ignore[attr-defined]
    proc.start()
    proc.join(30)
    return proc.exitcode


async def test_writer_killed_between_renames_is_completed(
    mp: multiprocessing.context.BaseContext, root: Path
) -> None:
    cache = FileSystemCache(root)
    await cache.set(entry("/crash", b"old body", created_at=100.0))
    code = run_to_death(mp, _fs_worker.die_between_renames, str(root), "/crash", b"a new, longer body", 200.0)
    assert code == -signal.SIGKILL
    # The body was replaced, the metadata was not: the reader completes the write.
    assert (root / "entries/crash.html").read_bytes() == b"a new, longer body"
    loaded = await FileSystemCache(root).get("/crash")
    assert loaded is not None and loaded.body == b"a new, longer body" and loaded.created_at == 200.0
    assert not [p for p in files_under(root / "entries") if p.name.endswith(".tmp")]


async def test_first_write_killed_between_renames_is_swept(
    mp: multiprocessing.context.BaseContext, root: Path
) -> None:
    cache = FileSystemCache(root)
    code = run_to_death(mp, _fs_worker.die_between_renames, str(root), "/fresh", b"body", 200.0)
    assert code == -signal.SIGKILL
    assert await cache.get("/fresh") is None  # no metadata yet: not an entry
    assert [k async for k in cache.keys()] == []
    assert await cache.sweep_temp_files(older_than=0) == 1
    assert (await cache.get("/fresh")) == CacheEntry(
        key="/fresh", body=b"body", created_at=200.0, revalidate=60
    )


async def test_a_failed_write_raises_and_leaves_a_readable_entry(
    cache: FileSystemCache, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyisr.cache import filesystem

    await cache.set(entry("/w", b"old", created_at=1.0))
    real_replace, calls = os.replace, []

    def failing_replace(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(filesystem.os, "replace", failing_replace)
    with pytest.raises(OSError):
        await cache.set(entry("/w", b"new body", created_at=2.0))
    monkeypatch.setattr(filesystem.os, "replace", real_replace)
    # The body was renamed, the metadata was not: the kept temp file completes the write.
    assert await cache.get("/w") == entry("/w", b"new body", created_at=2.0)

    real_write, writes = filesystem.write_temp, []

    def failing_write(*args: Any) -> Path:
        writes.append(args)
        if len(writes) == 2:  # the body temp is written, the metadata temp fails
            raise OSError(28, "No space left on device")
        return real_write(*args)

    monkeypatch.setattr(filesystem, "write_temp", failing_write)
    with pytest.raises(OSError):
        await cache.set(entry("/w", b"newest", created_at=3.0))
    assert await cache.get("/w") == entry("/w", b"new body", created_at=2.0)
    assert not [p for p in files_under(root / "entries") if p.name.endswith(".tmp")]


async def test_sweep_removes_old_temp_files_only(cache: FileSystemCache, root: Path) -> None:
    await cache.set(entry("/blog/1"))
    old = [
        root / "entries/blog/.1.html.abc.tmp",
        root / "entries/blog/.1.json.abc.tmp",
        root / ".tags.log.x.tmp",
    ]
    for path in old:
        path.write_bytes(b"partial")
        os.utime(path, (time.time() - 120, time.time() - 120))
    young = root / "entries/blog/.1.html.def.tmp"
    young.write_bytes(b"in progress")
    assert [k async for k in cache.keys()] == ["/blog/1"]
    assert await cache.sweep_temp_files(older_than=60) == 3
    assert not any(p.exists() for p in old) and young.exists()
    assert await cache.get("/blog/1") == entry("/blog/1")


@pytest.mark.slow
def test_concurrent_writers_killed_mid_write_never_tear(
    mp: multiprocessing.context.BaseContext, root: Path, tmp_path: Path
) -> None:
    """Readers never see a torn entry while a writer is SIGKILLed at random moments."""
    FileSystemCache(root)
    rng = random.Random(7)
    stop, never = tmp_path / "stop", tmp_path / "never"
    outs = [tmp_path / f"reader{i}.json" for i in range(2)]
    procs = [mp.Process(target=_fs_worker.reader, args=(str(root), str(stop), str(o))) for o in outs]  # type: ignore[attr-defined]
    procs.append(mp.Process(target=_fs_worker.writer, args=(str(root), 1, str(stop), False, 0.01)))  # type: ignore[attr-defined]
    for proc in procs:
        proc.start()
    kills = 0
    # Temp files still there a cycle after they were seen were left by a killed victim
    # (the steady writer's exist for milliseconds): proof that kills land inside writes.
    left_behind: set[Path] = set()
    seen: set[Path] = set()
    stalled: list[multiprocessing.process.BaseProcess] = []
    start = time.monotonic()
    seed = 100
    try:
        # Normally ~30 kills in 5 s; on a machine too loaded for that, up to 30 s.
        while (
            time.monotonic() - start < 5 or kills < 8 or not left_behind
        ) and time.monotonic() - start < 30:
            seed += 1
            # The victim writes big bodies, so it is usually killed inside a write.
            victim = mp.Process(target=_fs_worker.writer, args=(str(root), seed, str(never), True))  # type: ignore[attr-defined]
            victim.start()
            time.sleep(rng.uniform(0.05, 0.3))
            os.kill(victim.pid, signal.SIGKILL)
            # A process killed inside fsync dies when the fsync returns, which on an
            # overloaded disk has been seen to take minutes. The kill has landed inside a
            # write then: what the readers saw meanwhile is what this test checks, and
            # more victims would only queue behind the same stalled disk.
            victim.join(60)
            if victim.exitcode is None:
                stalled.append(victim)
                break
            assert victim.exitcode == -signal.SIGKILL
            kills += 1
            now = {p for p in files_under(root) if p.name.endswith(".tmp")}
            left_behind |= seen & now
            seen = now
    finally:
        stop.touch()
        for proc in procs:
            proc.join(300)
            if proc.exitcode is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
        for victim in stalled:
            victim.join(300)  # reaped once the disk lets it go; never waited for forever
    assert (kills >= 3 and left_behind) or stalled
    assert all(proc.exitcode == 0 for proc in procs)
    results = [json.loads(o.read_text()) for o in outs]
    assert [r["problems"] for r in results] == [[], []]
    assert sum(r["ok"] for r in results) > 20  # the readers really read entries

    async def check_disk() -> None:
        cache = FileSystemCache(root)
        metas = [p for p in files_under(root) if p.suffix == ".json" and not p.name.startswith(".")]
        keys = {json.loads(p.read_bytes())["key"] for p in metas}
        assert keys == set(_fs_worker.CRASH_KEYS)
        for key in keys:
            loaded = await cache.get(key)
            assert loaded is not None and _fs_worker.entry_problem(key, loaded) is None
        await cache.sweep_temp_files(older_than=0)
        assert not [p for p in files_under(root) if p.name.endswith(".tmp")]
        for key in keys:
            loaded = await cache.get(key)
            assert loaded is not None and _fs_worker.entry_problem(key, loaded) is None

    asyncio.run(check_disk())


# -- tag log --------------------------------------------------------------------------------


async def test_tag_times_are_shared_between_instances(root: Path) -> None:
    a, b = FileSystemCache(root), FileSystemCache(root)
    assert await a.tag_times(["x"]) == {}
    await a.revalidate_tags(["x", "y"], 10.0)
    assert await b.tag_times(["x", "y", "z"]) == {"x": 10.0, "y": 10.0}
    await b.revalidate_tags(["y"], 20.0)
    await b.revalidate_tags(["x"], 5.0)  # older: the latest time wins
    assert await a.tag_times(["x", "y"]) == {"x": 10.0, "y": 20.0}
    assert (root / "tags.log").read_text().count("\n") == 1 + 3  # the header, then one line per call


async def test_revalidating_many_tags_splits_long_lines(cache: FileSystemCache, root: Path) -> None:
    tags = [f"tag-{i:05d}-" + "x" * 40 for i in range(500)]
    await cache.revalidate_tags(tags, 7.0)
    lines = (root / "tags.log").read_bytes().splitlines()
    assert len(lines) > 1 and all(len(line) < 4096 for line in lines)
    assert await FileSystemCache(root).tag_times(tags) == dict.fromkeys(tags, 7.0)


async def test_tag_changes_cursor(root: Path) -> None:
    a, b = FileSystemCache(root), FileSystemCache(root)
    cursor, times = await b.tag_changes(None)  # type: ignore[misc]
    assert times == {}
    await a.revalidate_tags(["x"], 1.0)
    await a.revalidate_tags(["y"], 2.0)
    cursor, times = await b.tag_changes(cursor)  # type: ignore[misc]
    assert times == {"x": 1.0, "y": 2.0}
    cursor, times = await b.tag_changes(cursor)  # type: ignore[misc]
    assert times == {}
    await a.revalidate_tags(["x"], 3.0)
    cursor, times = await b.tag_changes(cursor)  # type: ignore[misc]
    assert times == {"x": 3.0}
    _, everything = await b.tag_changes(None)  # type: ignore[misc]
    assert everything == {"x": 3.0, "y": 2.0}


async def test_partial_last_line_waits_for_its_end(cache: FileSystemCache, root: Path) -> None:
    await cache.revalidate_tags(["done"], 1.0)
    log = root / "tags.log"
    append(log, b'{"t":["half"],"at":2.0')
    cursor, times = await cache.tag_changes(None)  # type: ignore[misc]
    assert times == {"done": 1.0}
    assert await FileSystemCache(root).tag_times(["half"]) == {}
    append(log, b"}\n")
    cursor, times = await cache.tag_changes(cursor)  # type: ignore[misc]
    assert times == {"half": 2.0}
    assert await FileSystemCache(root).tag_times(["half"]) == {"half": 2.0}


async def test_line_left_by_a_killed_writer_does_not_swallow_the_next(
    cache: FileSystemCache, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    append(root / "tags.log", b'{"t":["dead"],"at":')
    await cache.revalidate_tags(["alive"], 3.0)
    with caplog.at_level(logging.WARNING):
        assert await FileSystemCache(root).tag_times(["alive", "dead"]) == {"alive": 3.0}


async def test_corrupt_lines_are_skipped_with_a_warning(
    cache: FileSystemCache, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    append(
        root / "tags.log",
        b'garbage\n{"t":"not a list","at":1}\n{"t":["x"]}\n\xff\xfe\n[1]\n{"t":["ok"],"at":4.5}\n',
    )
    with caplog.at_level(logging.WARNING, logger="pyisr.cache.filesystem"):
        assert await cache.tag_times(["ok", "x"]) == {"ok": 4.5}
        _, times = await cache.tag_changes(None)  # type: ignore[misc]
    assert times == {"ok": 4.5}
    assert "corrupt line" in caplog.text


async def test_compaction_keeps_latest_times(root: Path) -> None:
    writer = FileSystemCache(root, tag_log_compact_bytes=2000)
    reader = FileSystemCache(root)
    cursor, _ = await reader.tag_changes(None)  # type: ignore[misc]
    await writer.revalidate_tags(["t0"], 0.0)
    assert await reader.tag_times(["t0"]) == {"t0": 0.0}
    header = log_header(root)
    for i in range(1, 301):
        await writer.revalidate_tags([f"t{i % 5}"], float(i))
    assert log_header(root) != header
    assert (root / "tags.log").stat().st_size < 2000
    latest = {f"t{j}": float(max(i for i in range(301) if i % 5 == j)) for j in range(5)}
    assert await reader.tag_times(list(latest)) == latest
    assert await FileSystemCache(root).tag_times(list(latest)) == latest
    _, times = await reader.tag_changes(cursor)  # type: ignore[misc]
    assert times == latest  # a cursor into the replaced file restarts from the compacted one


async def test_cursor_into_a_replaced_log_restarts_even_on_the_same_inode(
    cache: FileSystemCache, root: Path
) -> None:
    # Compaction replaces the file, and the file system may hand the new one the old
    # inode number; the cursor must notice anyway (here: rewritten in place).
    await cache.revalidate_tags(["a"], 1.0)
    cursor, _ = await cache.tag_changes(None)  # type: ignore[misc]
    log = root / "tags.log"
    inode, size = log.stat().st_ino, log.stat().st_size
    other = b'{"t":[],"at":0,"log":"another-file-id!"}\n{"t":["b"],"at":2.0}\n'
    other += b'{"t":["c"],"at":3.0}\n'
    assert len(other) > size
    with open(log, "r+b") as f:  # noqa: ASYNC230 - a test fixture edit
        f.write(other)
        f.truncate()
    assert log.stat().st_ino == inode
    _, times = await cache.tag_changes(cursor)  # type: ignore[misc]
    assert times == {"b": 2.0, "c": 3.0}
    assert await FileSystemCache(root).tag_times(["a", "b", "c"]) == {"b": 2.0, "c": 3.0}


async def test_a_removed_tag_log_is_recreated(cache: FileSystemCache, root: Path) -> None:
    (root / "tags.log").unlink()
    assert await cache.tag_times(["x"]) == {}
    await cache.revalidate_tags(["x"], 1.0)
    assert await FileSystemCache(root).tag_times(["x"]) == {"x": 1.0}
    assert log_header(root)


@pytest.mark.slow
def test_appends_racing_compaction_are_not_lost(mp: multiprocessing.context.BaseContext, root: Path) -> None:
    FileSystemCache(root)
    count, procs = 300, []
    for name in ("p", "q", "r"):
        procs.append(mp.Process(target=_fs_worker.append_tags, args=(str(root), name, count, 1500)))  # type: ignore[attr-defined]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    expected = {
        f"{n}-{j}": float(max(i for i in range(1, count + 1) if i % 10 == j))
        for n in "pqr"
        for j in range(10)
    }
    assert asyncio.run(FileSystemCache(root).tag_times(list(expected))) == expected
    assert (root / "tags.log").stat().st_size < 3 * 1500  # it was compacted


# -- regeneration lock ------------------------------------------------------------------------


async def test_lock_is_exclusive_and_token_checked(root: Path) -> None:
    a, b = FileSystemCache(root), FileSystemCache(root)
    token = await a.acquire_lock("/k", 30)
    assert token
    assert await a.acquire_lock("/k", 30) is None
    assert await b.acquire_lock("/k", 30) is None  # another descriptor: as another process would
    await a.release_lock("/k", "wrong token")
    assert await b.acquire_lock("/k", 30) is None
    assert await b.acquire_lock("/other", 30)
    await a.release_lock("/k", token)
    token_b = await b.acquire_lock("/k", 30)
    assert token_b and await a.acquire_lock("/k", 30) is None
    await b.close()
    assert await a.acquire_lock("/k", 30)
    await a.close()


async def test_expired_lock_in_this_process_is_taken_over(cache: FileSystemCache) -> None:
    old = await cache.acquire_lock("/k", 0.0)
    new = await cache.acquire_lock("/k", 30)
    assert old and new and old != new
    await cache.release_lock("/k", old)  # the overrun holder cannot release the new lock
    assert await cache.acquire_lock("/k", 30) is None
    await cache.release_lock("/k", new)
    assert await cache.acquire_lock("/k", 30)


@pytest.fixture
def started() -> Iterator[list[multiprocessing.process.BaseProcess]]:
    procs: list[multiprocessing.process.BaseProcess] = []
    yield procs
    for proc in procs:
        if proc.exitcode is None and proc.pid is not None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()


async def test_lock_released_when_holder_is_killed(
    mp: multiprocessing.context.BaseContext,
    root: Path,
    tmp_path: Path,
    started: list[multiprocessing.process.BaseProcess],
) -> None:
    cache = FileSystemCache(root)
    ready = tmp_path / "ready"
    holder = mp.Process(target=_fs_worker.hold_lock, args=(str(root), "/k", str(ready)))  # type: ignore[attr-defined]
    holder.start()
    started.append(holder)
    assert await asyncio.to_thread(wait_for_file, ready) == "locked"
    assert await cache.acquire_lock("/k", 30) is None
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    assert await cache.acquire_lock("/k", 30)
    await cache.close()


# -- any key --------------------------------------------------------------------------------


def test_any_key_maps_inside_root_and_round_trips(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = FileSystemCache(root, fsync=False)
    real_root = os.path.realpath(root)

    @settings(max_examples=150, deadline=None)
    @given(key=st.text(), other=st.text(), body=st.binary(max_size=64))
    def check(key: str, other: str, body: bytes) -> None:
        slot = key_to_slot(root, key)
        for path in (slot.body, slot.meta):
            assert os.path.realpath(path).startswith(real_root + os.sep)
            assert not {".", ".."} & set(path.relative_to(root).parts)
            assert all(len(part.encode()) <= 255 for part in path.parts)
        if other != key:
            assert key_to_slot(root, other).meta != slot.meta
        stored = entry(key, body)
        assert asyncio.run(cache.set(stored))
        assert asyncio.run(cache.get(key)) == stored

    check()
