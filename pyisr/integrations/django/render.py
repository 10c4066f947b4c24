"""One shared render of an ``@isr`` view: what the engine calls to make its page.

The view gets the request built from nothing (:mod:`.shared_request`), in the page's
language and script prefix, with its database reads collected into ORM tags
(:mod:`.orm_reads`). Exceptions Django answers become its own 404/403/400 pages
(:mod:`.responses`). A sync view runs in the waiting request's thread when there is
one (:mod:`.request_thread`), else on pyisr's render threads, where its database
connections are closed as Django closes a request's; an async view runs on pyisr's
bridge loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pyisr.cache.tags import key_tag
from pyisr.context import RenderContext, current_render
from pyisr.engine import Engine, Rendered
from pyisr.integrations import FailedResponse
from pyisr.integrations.django import conf, orm_reads
from pyisr.integrations.django.request_thread import RequestThread
from pyisr.integrations.django.responses import (
    UNCACHED_STATUSES,
    answered_exception,
    exception_response,
    needs_render,
    rendered,
)
from pyisr.lifetimes import Lifetime
from pyisr.origin import CanonicalOrigin
from pyisr.runtime import get_engine, run_sync

View = Callable[..., Any]


class _Default:
    """An ``@isr`` argument left to the project's ``PYISR`` (``revalidate``, ``bypass``)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()


@dataclass(frozen=True)
class Options:
    """What ``@isr`` was given, kept on the wrapper so ``revalidate(path)`` can render it."""

    view: View
    is_async: bool
    #: ``None``: ``PYISR['revalidate']`` / ``['expire']``.
    lifetime: Lifetime | None
    expire: int | None
    tags: tuple[str, ...]
    engine: Engine | None
    allowed: frozenset[str]
    origin: CanonicalOrigin | None
    bypass: Any
    orm_tags: bool | None

    def lifetime_now(self) -> Lifetime:
        if self.lifetime is not None:
            return self.lifetime
        default = conf.get().lifetime
        if self.expire is None:
            return default
        from pyisr import lifetimes

        return lifetimes.parse(default.revalidate, self.expire, where="@isr expire")

    def engine_now(self) -> Engine:
        return self.engine if self.engine is not None else get_engine()

    def origin_now(self) -> CanonicalOrigin:
        return self.origin if self.origin is not None else _settings_origin(conf.get().site_url)

    def collects_orm_tags(self) -> bool:
        settings = conf.get()
        return settings.orm_tags if self.orm_tags is None else self.orm_tags and settings.orm_tags


_origins: dict[str | None, CanonicalOrigin] = {}


def _settings_origin(site_url: str | None) -> CanonicalOrigin:
    """One origin per ``PYISR['site_url']`` value (it warns once about a missing one)."""
    found = _origins.get(site_url)
    if found is None:
        where = "PYISR['site_url']" if site_url is not None else "@isr site_url"
        found = _origins[site_url] = CanonicalOrigin(site_url, where=where)
    return found


@dataclass(frozen=True)
class Call:
    """One shared render: the view, its request built from nothing, and its arguments."""

    options: Options
    fresh: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    failed: FailedResponse
    language: str | None


def make_render(call: Call, caller: RequestThread | None = None) -> Any:
    """The render callable the engine runs for ``call``."""
    if call.options.is_async:
        return _async_render(call)
    if caller is None:
        return lambda: _sync_job(call, False)

    async def render() -> Rendered:
        return await caller.call(lambda in_request_thread: _sync_job(call, in_request_thread))

    return render


@contextlib.contextmanager
def _scope(call: Call) -> Iterator[orm_reads.Reads]:
    """The page's language and script prefix, and its database reads collected."""
    from django.core.handlers.wsgi import get_script_name
    from django.urls import set_script_prefix
    from django.utils import translation

    set_script_prefix(get_script_name(call.fresh.environ))
    max_rows = conf.get().orm_tags_max_rows
    reads, token = orm_reads.start(call.options.collects_orm_tags(), max_rows)
    language = translation.override(call.language) if call.language else contextlib.nullcontext()
    try:
        with language:
            yield reads
    finally:
        orm_reads.finish(reads, token)


def _sync_job(call: Call, in_request_thread: bool) -> Rendered:
    from django.db import close_old_connections

    if not in_request_thread:
        close_old_connections()  # render threads are not request threads: as Django would
    try:
        with _scope(call):
            try:
                response = call.options.view(call.fresh, *call.args, **call.kwargs)
            except Exception as exc:
                answered = answered_exception(exc)
                if answered is None:
                    raise
                response = exception_response(call.fresh, answered)
            result = rendered(response, call.fresh, call.failed)
    finally:
        if not in_request_thread:
            close_old_connections()
    ctx = current_render()
    if _refused_after_a_page(result, ctx):
        run_sync(_drop_old_page(ctx))
    return result


def _async_render(call: Call) -> Callable[[], Any]:
    async def render() -> Rendered:
        from asgiref.sync import sync_to_async

        with _scope(call):
            try:
                response = await call.options.view(call.fresh, *call.args, **call.kwargs)
            except Exception as exc:
                answered = answered_exception(exc)
                if answered is None:
                    raise
                response = await sync_to_async(exception_response)(call.fresh, answered)
            if needs_render(response):
                await sync_to_async(response.render)()
            body = None
            if getattr(response, "streaming", False) and getattr(response, "is_async", False):
                body = b"".join([bytes(chunk) async for chunk in response.streaming_content])
            result = rendered(response, call.fresh, call.failed, body)
        ctx = current_render()
        if _refused_after_a_page(result, ctx):
            await _drop_old_page(ctx)
        return result

    return render


def _refused_after_a_page(result: Rendered, ctx: RenderContext | None) -> bool:
    """A 400/401/403 in place of a page that was cached: that page is not public any more."""
    return result.status in UNCACHED_STATUSES and ctx is not None and ctx.is_revalidating


async def _drop_old_page(ctx: RenderContext | None) -> None:
    """Invalidate the cached copy of the page being rendered, so it is never served again."""
    if ctx is not None and ctx.engine is not None:
        await ctx.engine.revalidate_tags([key_tag(ctx.key)])
