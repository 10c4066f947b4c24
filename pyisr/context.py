"""The render context: what a page collects from its data calls while it renders.

A page inherits the tags of every ``cached``/``fetch`` call made during its render,
and its revalidate becomes the smallest of its own and theirs (DESIGN.md, "Tags").
Context variables carry this through ``await`` and into worker threads (the engine
runs sync renders with a copy of the context), with no globals.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from pyisr.cache.entry import UNSET, Revalidate, min_revalidate


@dataclass
class RenderContext:
    key: str
    #: The engine rendering the page: data read during the render goes through it, so a
    #: page and its data share one cache whatever the process default is (``None``: the
    #: process default, e.g. for a fallback shell, which reads no data).
    engine: Any = None
    #: Implicit tags of the page being rendered: data entries read during the render are
    #: also invalidated by them (``revalidate_path`` refreshes the page's data too).
    soft_tags: tuple[str, ...] = ()
    #: A background regeneration: stale data is refetched before the page is rebuilt.
    is_revalidating: bool = False
    is_fallback: bool = False
    #: The route's own revalidate: a ``fetch`` with no options inside the page takes it.
    page_revalidate: Revalidate = None
    tags: dict[str, None] = field(default_factory=dict)
    #: The smallest revalidate of the data calls so far; UNSET before the first one.
    revalidate: Any = UNSET
    #: The shortest expire of the data calls so far (``None``: none named one).
    expire: int | None = None
    #: The engine's render slot this render holds (a ``pyisr.render_slots.RenderSlot``),
    #: ``None`` outside the limit (data, fallback shells). Sync page code called during the
    #: render runs on the engine's render threads and is counted on it, so a render past
    #: its timeout frees its slot only when its thread really ends.
    slot: Any = None
    #: Data calls of this render shared by identical calls (a ``pyisr.data.memo.DataMemo``,
    #: made by the first data call): a value is read once per render, however many
    #: places (and threads) ask for it.
    data_memo: Any = None

    def record(self, tags: Iterable[str], revalidate: Revalidate, expire: int | None = None) -> None:
        for tag in tags:
            self.tags[tag] = None
        if expire is not None:
            self.expire = expire if self.expire is None else min(self.expire, expire)
        if self.revalidate is UNSET:
            self.revalidate = revalidate
        else:
            self.revalidate = min_revalidate(self.revalidate, revalidate)

    @property
    def had_data_calls(self) -> bool:
        return self.revalidate is not UNSET


_current: ContextVar[RenderContext | None] = ContextVar("pyisr_render", default=None)


def current_render() -> RenderContext | None:
    return _current.get()


def is_fallback() -> bool:
    """True while the fallback shell of a ``fallback: True`` page is being rendered."""
    ctx = _current.get()
    return bool(ctx and ctx.is_fallback)


def enter(ctx: RenderContext) -> object:
    return _current.set(ctx)


def leave(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]
