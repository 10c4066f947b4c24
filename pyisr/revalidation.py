"""On-demand revalidation from any code: request handlers, scripts, workers.

``revalidate_tag`` and ``revalidate_path`` *mark* entries (the App Router's
functions): one tag-manifest write, and the next request for any marked page waits
for a fresh render. ``revalidate`` *regenerates* one path now and returns when it is
stored (the Pages Router's ``res.revalidate``). Each has a sync and an async form.
"""

from __future__ import annotations

from pyisr.cache.tags import tags_for_revalidate_path, validate_tags
from pyisr.engine import Resolver, RevalidationError
from pyisr.paths import validate_revalidate_target
from pyisr.runtime import get_engine, run_sync


async def arevalidate_tag(tag: str) -> None:
    """Invalidate every entry tagged ``tag`` (pages and data)."""
    tags = validate_tags([tag], where="revalidate_tag()")
    await get_engine().revalidate_tags(tags)


async def arevalidate_path(path: str, type: str | None = None) -> None:  # noqa: A002
    """Invalidate one path, every page of a route (``type="page"``) or a subtree (``"layout"``).

    ``arevalidate_path("/blog/1")``, ``arevalidate_path("/blog/[id]", "page")``,
    ``arevalidate_path("/blog", "layout")``; ``("/", "layout")`` invalidates everything.
    """
    await get_engine().revalidate_tags(tags_for_revalidate_path(path, type))


def revalidate_tag(tag: str) -> None:
    """Sync form of :func:`arevalidate_tag` (in async code, prefer the async form)."""
    tags = validate_tags([tag], where="revalidate_tag()")
    run_sync(get_engine().revalidate_tags(tags))


def revalidate_path(path: str, type: str | None = None) -> None:  # noqa: A002
    """Sync form of :func:`arevalidate_path` (in async code, prefer the async form)."""
    tags = tags_for_revalidate_path(path, type)
    run_sync(get_engine().revalidate_tags(tags))


#: Resolvers of framework views decorated with ``@isr`` (Django, Flask). A decorator runs
#: before any engine exists (the engine is chosen per request), so it registers here and
#: :func:`revalidate` asks these after the engine's own resolver.
_view_resolvers: list[Resolver] = []


def register_view_resolver(resolver: Resolver) -> None:
    """Let :func:`revalidate` regenerate pages of a framework's ``@isr`` views."""
    if resolver not in _view_resolvers:
        _view_resolvers.append(resolver)


async def revalidate(path: str) -> None:
    """Regenerate the page at ``path`` now; return once the new page is stored.

    Raises ``ValueError`` for a path that does not start with ``/`` and
    :class:`RevalidationError` (``Failed to revalidate <path>: ...``) when the path is
    no page or its render fails, in which case the last good page keeps being served.
    """
    key = validate_revalidate_target(path)
    engine = get_engine()
    resolvers = [r for r in (engine.path_resolver, *_view_resolvers) if r is not None]
    if not resolvers:
        raise RevalidationError(
            f"Failed to revalidate {path}: no site is registered with this process's engine "
            "(revalidate(path) needs the pages; use revalidate_path() to mark a path instead)"
        )
    target = None
    for resolver in resolvers:
        target = await resolver(key)
        if target is not None:
            break
    if target is None:
        raise RevalidationError(f"Failed to revalidate {path}: no page at this path (404)")
    resolved_key, render, policy = target
    await engine.revalidate_now(resolved_key, render, policy)


def revalidate_sync(path: str) -> None:
    """Sync form of :func:`revalidate`."""
    run_sync(revalidate(path))
