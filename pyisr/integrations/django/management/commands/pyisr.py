"""``manage.py pyisr``: revalidate pages and look at the project's cache.

::

    manage.py pyisr revalidate --path /blog/2/          # regenerate now
    manage.py pyisr revalidate --path /blog/2/ --stale  # mark stale: refreshed at its next visit
    manage.py pyisr revalidate --path /blog/[id] --type page
    manage.py pyisr revalidate --tag posts [--stale]
    manage.py pyisr revalidate --model blog.post [--pk 2]
    manage.py pyisr cache list [--prefix /blog]
    manage.py pyisr cache inspect /blog/2/
    manage.py pyisr cache purge /blog/2/

They use the project's cache (``PYISR``), so a running server sees what they do. The
cache commands share their logic with ``pyisr cache`` (``pyisr.cache_tools``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pyisr import cache_tools
from pyisr.runtime import get_engine, run_sync


class Command(BaseCommand):
    help = "Revalidate pages and look at the pyisr cache of this project."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        revalidate = actions.add_parser("revalidate", help="Regenerate or invalidate pages.")
        target = revalidate.add_mutually_exclusive_group(required=True)
        target.add_argument("--path", help="A page's path: regenerated now (marked, with --stale or --type).")
        target.add_argument("--tag", help="Invalidate every page with this tag.")
        target.add_argument("--model", help="A model label (blog.post): the pages that read it.")
        revalidate.add_argument("--pk", help="With --model: only the pages of this row and its queries.")
        revalidate.add_argument(
            "--type", choices=["page", "layout"], help="With --path: a route or a subtree."
        )
        revalidate.add_argument(
            "--stale", action="store_true", help="Mark stale: answered at once, refreshed in the background."
        )
        cache = actions.add_parser("cache", help="List, inspect or purge cached pages.")
        what = cache.add_subparsers(dest="cache_action", required=True)
        listing = what.add_parser("list", help="List cached keys.")
        listing.add_argument("--prefix", default="")
        what.add_parser("inspect", help="Show what is cached for a path.").add_argument("path")
        what.add_parser("purge", help="Invalidate a path in every process.").add_argument("path")

    def handle(self, *args: Any, **options: Any) -> None:
        from pyisr.integrations.django import conf

        conf.checked()
        if options["action"] == "revalidate":
            self._revalidate(options)
        else:
            self._cache(options)

    def _revalidate(self, options: dict[str, Any]) -> None:
        from pyisr.cache.tags import tags_for_revalidate_path
        from pyisr.engine import RevalidationError
        from pyisr.integrations.django.invalidation import model_tags
        from pyisr.integrations.django.resolver import resolve_page
        from pyisr.revalidation import revalidate_sync

        engine = get_engine()
        engine.add_resolver(resolve_page)  # the URLconf's @isr views, imported when resolved
        stale = options["stale"]
        try:
            if options["tag"]:
                run_sync(engine.revalidate_tag(options["tag"], stale=stale))
                done = f"tag {options['tag']}"
            elif options["model"]:
                tags = model_tags(options["model"], options["pk"])
                run_sync(engine.revalidate_tags(tags, stale=stale))
                done = ", ".join(tags)
            elif stale or options["type"]:
                run_sync(
                    engine.revalidate_tags(
                        tags_for_revalidate_path(options["path"], options["type"]), stale=stale
                    )
                )
                done = f"path {options['path']}"
            else:
                revalidate_sync(options["path"])
                self.stdout.write(f"regenerated {options['path']}")
                return
        except (ValueError, LookupError, RevalidationError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"{'marked stale' if stale else 'invalidated'}: {done}")

    def _cache(self, options: dict[str, Any]) -> None:
        engine = get_engine()
        action = options["cache_action"]
        if action == "list":

            async def listed() -> list[str]:
                return [key async for key in cache_tools.keys(engine, options["prefix"])]

            for key in run_sync(listed()):
                self.stdout.write(key)
            return
        try:
            key = cache_tools.cache_key(options["path"])
        except ValueError as exc:
            raise CommandError(f"{options['path']!r}: {exc}") from exc
        if action == "inspect":
            info = run_sync(cache_tools.inspect(engine, key, time.time()))
            self.stdout.write(
                json.dumps(info if info is not None else {"key": key, "cached": False}, indent=2)
            )
            if info is None:
                raise CommandError(f"nothing is cached for {key}")
        else:
            run_sync(cache_tools.purge(engine, key))
            self.stdout.write(f"purged {key}: the next request renders it afresh")
