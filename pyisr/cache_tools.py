"""Looking at and clearing a cache: what ``pyisr cache`` and ``manage.py pyisr cache`` share.

Each command opens its own engine (the site's store, or the Django project's) and calls
these: the rows of ``list``, the record of ``inspect``, the sentences of ``explain``
(all three from :mod:`pyisr.explain`, so a state is named the same everywhere), and
``purge``; then prints them with the renderers below (rich), or as JSON for scripts.

:func:`open_site` finds a site's cache exactly as its server does
(:func:`pyisr.site_store.open_site_cache`), but first checks that there is a site and a
build where it looks, and says what it looked for and where when not (:class:`NoCache`)
rather than opening, and so creating, an empty cache.
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.table import Table

from pyisr.cache.handler import CacheHandler
from pyisr.cache.tags import key_tag
from pyisr.config import Config
from pyisr.engine import Engine
from pyisr.explain import (
    EntryRow,
    EntryState,
    Explanation,
    ago,
    clock_time,
    duration,
    explain,
    list_rows,
    when,
)
from pyisr.paths import normalize_path

#: Who the store's record says purged (``pyisr cache explain`` shows it).
CLI_PURGE_BY = "pyisr cache purge (CLI)"
DJANGO_PURGE_BY = "manage.py pyisr cache purge"
#: Characters of an entry's tags a table shows (the rest as "+N").
TAGS_WIDTH = 32

_STATE_STYLE = {
    EntryState.FRESH: "green",
    EntryState.STALE: "yellow",
    EntryState.FAILING: "red",
    EntryState.EXPIRED: "magenta",
    EntryState.INVALIDATED: "cyan",
}


class NoCache(Exception):
    """There is no site, no build or no cache where a command looked; the message says where."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details

    def to_json(self) -> dict[str, Any]:
        return {"error": str(self), **self.details}


# -- finding the cache ---------------------------------------------------------------------------


def open_site(site: Path, config: Config) -> CacheHandler:
    """The handler of the site's current build, as its server opens it (no memory tier).

    Raises :class:`NoCache` when ``site`` is no site (no ``app/`` nor ``pages/``), was
    never built (no ``.pyisr/BUILD_ID``) or its build's cache directory is gone.
    """
    from pyisr.site_store import (
        BUILD_ID_FILE,
        DOT_DIR,
        local_cache_root,
        open_site_cache,
        read_build_id,
    )

    root = site.resolve()
    if not (root / "app").is_dir() and not (root / "pages").is_dir():
        raise NoCache(
            f"no pyisr site in {root}: looked for an app/ or pages/ folder there. Run the command "
            "from the site's folder, or pass --site PATH.",
            site=str(root),
        )
    build_id = read_build_id(root)
    if build_id is None:
        raise NoCache(
            f"the site in {root} was never built: there is no {DOT_DIR}/{BUILD_ID_FILE}, so there is "
            f"no cache to look at. Run `pyisr build {site}` first.",
            site=str(root),
        )
    cache_root = local_cache_root(root, config)
    if cache_root is not None and not (cache_root / build_id).is_dir():
        raise NoCache(
            f"no cache for build {build_id} of {root}: {cache_root / build_id} does not exist "
            f"(removed by hand?). Run `pyisr build {site}` again.",
            site=str(root),
            build_id=build_id,
            looked_in=str(cache_root / build_id),
        )
    return open_site_cache(root, config, build_id=build_id, memory_tier_bytes=0)


def where(handler: CacheHandler) -> str:
    """The store in words: a directory, or a Redis URL and namespace (never a password)."""
    try:
        info = handler.describe() if hasattr(handler, "describe") else {}
    except Exception:  # noqa: BLE001 - only a label
        info = {}
    if "root" in info:
        return str(info["root"])
    if "url" in info:
        return f"{info['url']} (namespace {info.get('namespace', '?')})"
    return str(info.get("handler") or getattr(handler, "name", "the cache"))


# -- what the commands read --------------------------------------------------------------------


def cache_key(path: str) -> str:
    """The key a command line names: a page's path, or a data key as ``cache list`` prints it.

    Raises ``ValueError`` (``pyisr.paths.BadPath``) for a path that cannot be a key.
    """
    if path.startswith("data:"):
        return path
    return normalize_path(path)


async def keys(engine: Engine, prefix: str = "") -> AsyncIterator[str]:
    """Every cached key starting with ``prefix``."""
    async for key in engine.handler.keys(prefix):
        yield key


async def rows(engine: Engine, now: float, **filters: Any) -> list[EntryRow]:
    """Every entry as a row (``state``, ``tag``, ``route``, ``search``, ``sort``, ``limit``)."""
    return await list_rows(engine.handler, now, **filters)


async def inspect(engine: Engine, key: str, now: float) -> dict[str, Any] | None:
    """What is cached for ``key`` (age, revalidate, tags, last failure, state, hits, why), or ``None``."""
    from pyisr.server.endpoints import describe_entry

    entry = await engine.inspect(key)
    if entry is None:
        return None
    info = describe_entry(entry, now)
    why = await explain(engine.handler, key, now)
    if why.row is not None:
        info.update(state=why.row.state.value, route=why.row.route, hits=why.row.hits)
    info.update(explain=why.text, regenerating=why.regenerating)
    return info


async def explain_key(engine: Engine, key: str, now: float) -> Explanation:
    """Why ``key`` is in its state (:func:`pyisr.explain.explain`)."""
    return await explain(engine.handler, key, now)


async def purge(engine: Engine, key: str, *, by: str | None = None) -> None:
    """Invalidate ``key`` in every process serving from the store.

    An invalidation, not a delete: processes holding the page in memory learn of it
    through the tag manifest, and the next request renders it afresh. Purging a data
    key also invalidates the pages that read it. ``by`` names who asked, for the
    store's record.
    """
    await engine.revalidate_tags([key_tag(key)], kind="path", target=key, by=by)
    await ensure_written(engine, key)


class NotWritten(ConnectionError):
    """An invalidation the store never took: it was unreachable until the command ended."""


async def ensure_written(engine: Engine, what: str) -> None:
    """Raise :class:`NotWritten` if the store queued ``what``'s invalidation instead of
    taking it (Redis down): a command must not report success while no other process
    will ever learn of it."""
    if await engine.handler.flush_queued():
        raise NotWritten(
            f"the store is unreachable: the invalidation of {what} was not written; "
            "run the command again once it is back"
        )


# -- rendering -----------------------------------------------------------------------------------


def _revalidate(value: int | None) -> str:
    return "never" if value is None else f"{value} s"


def _tags(tags: Sequence[str], width: int = TAGS_WIDTH) -> str:
    shown: list[str] = []
    used = 0
    for tag in tags:
        if shown and used + len(tag) + 2 > width:
            break
        shown.append(tag if len(tag) <= width else tag[: width - 1] + "…")
        used += len(shown[-1]) + 2
    rest = len(tags) - len(shown)
    return ", ".join(shown) + (f" +{rest}" if rest else "")


def size_text(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def list_title(shown: Sequence[EntryRow], handler: CacheHandler, total: int | None = None) -> str:
    """``3 entries in /site/.pyisr/cache/<build id>`` (``3 of 27 entries`` when cut short)."""
    total = len(shown) if total is None else total
    count = f"{len(shown)} of {total}" if total != len(shown) else str(total)
    return f"{count} entr{'y' if total == 1 else 'ies'} in {where(handler)}"


def rows_table(found: Sequence[EntryRow], *, title: str | None = None) -> Table:
    """``pyisr cache list``'s table: key, state, age, revalidate, size, tags, hits."""
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("key", overflow="fold")
    table.add_column("state")
    table.add_column("age", justify="right")
    table.add_column("revalidate", justify="right")
    table.add_column("size", justify="right")
    table.add_column("tags")
    table.add_column("hits", justify="right")
    for row in found:
        state = f"[{_STATE_STYLE[row.state]}]{row.state.value}[/]"
        if row.status != 200:
            state += f" [dim]({row.status})[/]"
        table.add_row(
            escape(row.key),
            state,
            duration(row.age),
            _revalidate(row.revalidate),
            size_text(row.size),
            escape(_tags(row.tags)),
            str(row.hits),
        )
    return table


def entry_block(why: Explanation, info: dict[str, Any] | None, now: float) -> RenderableType:
    """``pyisr cache inspect``'s block: one line per fact, then the explanation."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    row = why.row
    if row is None or info is None:
        grid.add_row("key", escape(why.key))
        grid.add_row("cached", "no")
        grid.add_row("why", escape(why.text))
        return grid
    kind = row.kind + (f", route {row.route}" if row.route else "")
    grid.add_row("key", f"{escape(row.key)}  ({escape(kind)})")
    grid.add_row("state", f"[{_STATE_STYLE[row.state]}]{row.state.value}[/]")
    grid.add_row("status", str(row.status))
    grid.add_row("rendered", when(row.created_at, now))
    window = info.get("stale_at")
    revalidate = _revalidate(row.revalidate)
    if isinstance(window, int | float):
        ended = "ended" if window <= now else "ends"
        revalidate += f" (window {ended} {clock_time(window, now)})"
    grid.add_row("revalidate", revalidate)
    expires = info.get("expires_at")
    if row.expire is None or not isinstance(expires, int | float):
        grid.add_row("expire", "never")
    else:
        grid.add_row("expire", f"{duration(row.expire)} (at {clock_time(expires, now)}, {ago(expires, now)})")
    grid.add_row("size", size_text(row.size))
    encodings = info.get("encodings") or {}
    if encodings:
        grid.add_row("encodings", ", ".join(f"{c} {size_text(n)}" for c, n in encodings.items()))
    grid.add_row("etag", escape(str(info.get("etag", ""))))
    grid.add_row("tags", escape(", ".join(row.tags)) or "-")
    grid.add_row("hits", str(row.hits))
    failure = row.last_failure
    if failure is not None:
        said = f"{failure.exc_type}: {failure.message} at {clock_time(failure.at, now)}"
        said += f", {failure.count} in a row"
        if row.retry_at is not None:
            said += f"; next try at {clock_time(row.retry_at, now)}, {ago(row.retry_at, now)}"
        grid.add_row("last failure", escape(said))
    if why.regenerating:
        grid.add_row("regenerating", "yes")
    grid.add_row("why", escape(why.text))
    return grid


def render_text(renderable: RenderableType, *, width: int | None = None, color: bool = False) -> str:
    """A rich renderable as text (for ``manage.py``'s stdout, or output that is no terminal)."""
    buffer = io.StringIO()
    console = Console(
        file=buffer, width=width or _width(), force_terminal=color, no_color=not color, soft_wrap=False
    )
    console.print(renderable)
    # Cells are padded to the table's width: no line of it needs its trailing spaces.
    return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())


def _width() -> int:
    """The terminal's width, else one wide enough for a data key and its row (160)."""
    try:
        return max(os.get_terminal_size().columns, 80)
    except OSError:
        return 160
