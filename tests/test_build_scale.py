"""``pyisr build`` at scale: data read once per build, writes off the renders' path, and a
summary that says where the time went (pyisr.build, pyisr.data.memo)."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pyisr.build import PipelinedWrites, build_site
from pyisr.cache import filesystem
from pyisr.cache.entry import CacheEntry
from pyisr.cache.filesystem import FileSystemCache
from pyisr.config import load_config
from pyisr.deploys import read_manifest

PAGES = 200


def make_site(root: Path, counts: Path) -> Path:
    """200 pages, each reading one shared ``cached()`` list (and its static params too)."""
    files = {
        "app/item/[id]/page.py": f"""
            from pyisr import cached

            revalidate = 60


            def load_items():
                with open({str(counts)!r}, "a") as f:
                    f.write("x")
                return [{{"id": i, "title": f"Item {{i}}"}} for i in range(1, {PAGES + 1})]


            items = cached(load_items, ["items"], tags=["items"], revalidate=3600)


            async def generate_static_params():
                return [{{"id": str(item["id"])}} for item in await items.aio()]


            async def page(params):
                listed = await items.aio()
                again = await items.aio()  # the same render asks twice
                assert again == listed
                return f"<h1>{{params['id']}} of {{len(listed)}}</h1>"
            """,
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


class DataReads:
    def __init__(self) -> None:
        self.files: list[str] = []


@pytest.fixture
def data_reads(monkeypatch: pytest.MonkeyPatch) -> DataReads:
    reads = DataReads()
    real = filesystem.read_entry

    def read_entry(key: str, *args: Any, **kwargs: Any) -> Any:
        if key.startswith("data:"):
            reads.files.append(key)
        return real(key, *args, **kwargs)

    monkeypatch.setattr(filesystem, "read_entry", read_entry)
    return reads


def test_a_list_every_page_reads_is_computed_once_and_read_from_disk_at_most_a_few_times(
    tmp_path: Path, data_reads: DataReads, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a process default engine would make ./.pyisr here
    counts = tmp_path / "computes"
    site = make_site(tmp_path / "site", counts)
    result = asyncio.run(build_site(site, load_config(site)))
    assert not result.errors and result.pages == PAGES
    assert counts.read_text() == "x"  # one computation for the whole build, static params included
    assert len(data_reads.files) <= 3
    assert not (tmp_path / ".pyisr").exists()  # static params went through the build's engine
    timings = result.timings
    # 1 call for the static params, 1 per page (its second call is shared within the
    # render); all but the first got the first one's result.
    assert timings.data_calls == 1 + PAGES and timings.data_shared == PAGES


def test_the_summary_and_the_manifest_say_where_the_time_went(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", tmp_path / "computes")
    result = asyncio.run(build_site(site, load_config(site)))
    line = result.summary()
    assert line.startswith(f"Built {PAGES} pages in ")
    for word in ("pages/s", "render ", "data ", "write ", "reads for"):
        assert word in line, line
    stats = read_manifest(site, result.build_id)["stats"]  # type: ignore[index]
    assert stats["pages"] == PAGES and stats["pages_per_s"] > 0
    assert {"render_s", "data_s", "write_s", "data_calls", "data_shared"} <= set(stats)
    assert stats["write_s"] > 0 and stats["render_s"] > 0


def test_a_write_that_fails_fails_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = make_site(tmp_path / "site", tmp_path / "computes")
    real_set = FileSystemCache.set

    async def failing_set(self: FileSystemCache, entry: CacheEntry) -> bool:
        if entry.key == "/item/7":
            raise OSError(28, "No space left on device")
        return await real_set(self, entry)

    monkeypatch.setattr(FileSystemCache, "set", failing_set)
    result = asyncio.run(build_site(site, load_config(site)))
    assert [key for key, _ in result.errors] == ["/item/7"]
    assert "No space left" in result.errors[0][1]
    assert not (site / ".pyisr" / "BUILD_ID").exists()  # nothing published
    assert not [p for p in (site / ".pyisr" / "cache").iterdir() if p.name.startswith(".staging")]


async def test_pipelined_writes_keep_each_keys_order_and_read_their_own_writes(tmp_path: Path) -> None:
    stores = [FileSystemCache(tmp_path / "cache", fsync=False, staging=True) for _ in range(3)]
    writes = PipelinedWrites(stores, max_writes=4)  # type: ignore[arg-type]
    assert await writes.get("/a") is None  # never written: no I/O needed to know
    for version in range(20):
        entry = CacheEntry(key="/a", body=f"v{version}".encode(), created_at=float(version), revalidate=60)
        assert await writes.set(entry)
        assert (await writes.get("/a")) is entry
    for i in range(50):
        await writes.set(CacheEntry(key=f"/k/{i}", body=b"x" * 1000, created_at=1.0, revalidate=60))
    assert await writes.flush() == []
    reader = FileSystemCache(tmp_path / "cache")
    stored = await reader.get("/a")
    assert stored is not None and stored.body == b"v19"
    assert len([k async for k in reader.keys("/k/")]) == 50
    assert writes.busy_seconds > 0
    await writes.close()


def test_the_blog_build_reads_its_post_list_once(tmp_path: Path, data_reads: DataReads) -> None:
    """The example blog: every /blog/<id> page reads the cached post list; the build reads
    it once (the example's own database, copied, with 300 posts)."""
    import shutil
    import sqlite3
    import sys

    example = Path(__file__).resolve().parent.parent / "examples" / "blog"
    site = tmp_path / "blog"
    shutil.copytree(example, site, ignore=shutil.ignore_patterns("data", ".pyisr", "__pycache__"))
    sys.path.insert(0, str(example))
    try:
        from lib import db, seed
    finally:
        sys.path.remove(str(example))
    (site / "data").mkdir()
    conn = sqlite3.connect(site / "data" / "blog.db")
    conn.executescript(db.SCHEMA)
    rows = [(i + 1, f"{t} #{i + 1}", c, a, p) for i, (_, t, c, a, p) in enumerate(seed.rows() * 12)]
    conn.executemany(f"INSERT INTO posts ({db.COLUMNS}) VALUES (?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
        del sys.modules[name]  # the copy's own lib
    result = asyncio.run(build_site(site, load_config(site)))
    assert not result.errors and result.pages == 2 * 300 + 2
    list_reads = [k for k in data_reads.files if data_reads.files.count(k) > 1]
    assert len(set(list_reads)) <= 1 and len(list_reads) <= 3
    manifest = json.loads((site / ".pyisr" / "builds" / result.build_id / "manifest.json").read_text())
    assert manifest["stats"]["data_shared"] >= 300


async def test_writes_handed_over_from_another_threads_loop_are_flushed(tmp_path: Path) -> None:
    """A sync page's data call reaches the build's store from pyisr's bridge loop in
    another thread; its write must still wake the build's flush (an asyncio condition
    notified from a foreign thread wakes nobody: the build hung)."""
    store = PipelinedWrites([FileSystemCache(tmp_path)])

    def from_another_loop() -> None:
        async def write() -> None:
            for n in range(50):
                await store.set(CacheEntry(key=f"/p/{n}", body=b"x" * 100, created_at=1.0, revalidate=60))

        asyncio.run(write())

    await asyncio.to_thread(from_another_loop)
    assert await asyncio.wait_for(store.flush(), timeout=10) == []
    assert (await store.get("/p/49")) is not None
    await store.close()
