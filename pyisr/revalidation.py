"""On-demand revalidation from any code: request handlers, scripts, workers.

``revalidate_tag`` and ``revalidate_path`` *mark* entries (the App Router's
functions): one tag-manifest write, and the next request for any marked page waits
for a fresh render (or, with ``revalidate_tag(tag, stale=True)``, is answered stale
while it regenerates in the background). ``revalidate`` *regenerates* one path now and returns when it is
stored (the Pages Router's ``res.revalidate``). Each has a sync and an async form.
"""

from __future__ import annotations

from pyisr.engine import Engine, NoPageError
from pyisr.paths import validate_revalidate_target
from pyisr.provenance import current_source
from pyisr.runtime import get_engine, run_sync


async def arevalidate_tag(tag: str, *, stale: bool = False) -> None:
    """Invalidate every entry tagged ``tag`` (pages and data): the next request of each
    waits for a fresh render.

    ``stale=True`` (Next.js 16's ``revalidateTag(tag, "max")``) marks them stale instead:
    each is still answered at once while one background render refreshes it, at its
    next visit. Right for content where a few seconds of the old version hurt nobody and
    a slow first request would.
    """
    await get_engine().revalidate_tag(tag, stale=stale, by=current_source())


async def arevalidate_path(path: str, type: str | None = None) -> None:  # noqa: A002
    """Invalidate one path, every page of a route (``type="page"``) or a subtree (``"layout"``).

    ``arevalidate_path("/blog/1")``, ``arevalidate_path("/blog/[id]", "page")``,
    ``arevalidate_path("/blog", "layout")``; ``("/", "layout")`` invalidates everything.
    """
    await get_engine().revalidate_path(path, type, by=current_source())


def revalidate_tag(tag: str, *, stale: bool = False) -> None:
    """Sync form of :func:`arevalidate_tag` (in async code, prefer the async form)."""
    # Who called is named here: the engine runs in another thread's loop.
    run_sync(get_engine().revalidate_tag(tag, stale=stale, by=current_source()))


def revalidate_path(path: str, type: str | None = None) -> None:  # noqa: A002
    """Sync form of :func:`arevalidate_path` (in async code, prefer the async form)."""
    run_sync(get_engine().revalidate_path(path, type, by=current_source()))


async def revalidate(path: str, *, engine: Engine | None = None, by: str | None = None) -> None:
    """Regenerate the page at ``path`` now; return once the new page is stored.

    Raises ``ValueError`` for a path that does not start with ``/`` and
    :class:`RevalidationError` (``Failed to revalidate <path>: ...``) when the path is
    no page or its render fails, in which case the last good page keeps being served.
    """
    key = validate_revalidate_target(path)
    engine = engine if engine is not None else get_engine()
    if not engine.has_resolvers:
        raise NoPageError(
            f"Failed to revalidate {path}: no site is registered with this process's engine "
            "(revalidate(path) needs the pages; use revalidate_path() to mark a path instead)"
        )
    target = await engine.resolve(key)
    if target is None:
        raise NoPageError(f"Failed to revalidate {path}: no page at this path (404)")
    resolved_key, render, policy = target
    await engine.revalidate_now(resolved_key, render, policy, by=by or current_source())


def revalidate_sync(path: str) -> None:
    """Sync form of :func:`revalidate`."""
    run_sync(revalidate(path, by=current_source()))
