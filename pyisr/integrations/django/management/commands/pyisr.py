"""``manage.py pyisr``: revalidate pages and look at the project's cache.

::

    manage.py pyisr revalidate --path /blog/2/          # regenerate now
    manage.py pyisr revalidate --path /blog/2/ --stale  # mark stale: refreshed at its next visit
    manage.py pyisr revalidate --path /blog/[id] --type page
    manage.py pyisr revalidate --tag posts [--stale]
    manage.py pyisr revalidate --model blog.post [--pk 2]
    manage.py pyisr cache list [--state stale] [--tag posts] [--sort hits] [--limit 20] [--json]
    manage.py pyisr cache inspect /blog/2/ [--json]
    manage.py pyisr cache explain /blog/2/ [--json]
    manage.py pyisr cache purge /blog/2/ [--json]

They use the project's cache (``PYISR``), so a running server sees what they do. The
cache commands share their logic with ``pyisr cache`` (``pyisr.cache_tools``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pyisr import cache_tools
from pyisr.explain import SORTS, EntryState
from pyisr.provenance import invalidated_by
from pyisr.runtime import get_engine, run_sync

#: Who the store's record says asked (``pyisr cache explain``).
REVALIDATE_BY = "manage.py pyisr revalidate"


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
        listing = what.add_parser("list", help="List cached entries: key, state, age, size, tags, hits.")
        listing.add_argument("--prefix", default="")
        listing.add_argument("--state", choices=[s.value for s in EntryState])
        listing.add_argument("--tag")
        listing.add_argument("--route")
        listing.add_argument("--sort", choices=list(SORTS), default="age")
        listing.add_argument("--limit", type=int)
        listing.add_argument("--json", action="store_true", help="Print JSON, for scripts.")
        for name, text in (
            ("inspect", "Show what is cached for a path."),
            ("explain", "Say why a path is in its state."),
            ("purge", "Invalidate a path in every process."),
        ):
            command = what.add_parser(name, help=text)
            command.add_argument("path")
            command.add_argument("--json", action="store_true", help="Print JSON, for scripts.")

    def handle(self, *args: Any, **options: Any) -> None:
        from pyisr.integrations.django import conf

        conf.checked()
        if options["action"] == "revalidate":
            with invalidated_by(REVALIDATE_BY):
                self._revalidate(options)
        else:
            self._cache(options)

    def _revalidate(self, options: dict[str, Any]) -> None:
        from pyisr.engine import RevalidationError
        from pyisr.integrations.django.invalidation import model_tags
        from pyisr.integrations.django.resolver import resolve_page
        from pyisr.revalidation import revalidate_sync

        engine = get_engine()
        engine.add_resolver(resolve_page)  # the URLconf's @isr views, imported when resolved
        stale = options["stale"]
        try:
            if options["tag"]:
                run_sync(engine.revalidate_tag(options["tag"], stale=stale, by=REVALIDATE_BY))
                done = f"tag {options['tag']}"
            elif options["model"]:
                tags = model_tags(options["model"], options["pk"])
                run_sync(engine.revalidate_tags(tags, stale=stale, by=REVALIDATE_BY))
                done = ", ".join(tags)
            elif stale or options["type"]:
                path = options["path"]
                run_sync(engine.revalidate_path(path, options["type"], stale=stale, by=REVALIDATE_BY))
                done = f"path {options['path']}"
            else:
                revalidate_sync(options["path"])
                self.stdout.write(f"regenerated {options['path']}")
                return
        except (ValueError, LookupError, RevalidationError) as exc:
            raise CommandError(str(exc)) from exc
        try:
            run_sync(cache_tools.ensure_written(engine, done))
        except cache_tools.NotWritten as exc:  # a deploy script must not go on as if it were done
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"{'marked stale' if stale else 'invalidated'}: {done}")

    def _cache(self, options: dict[str, Any]) -> None:
        engine = get_engine()
        action = options["cache_action"]
        as_json = options["json"]
        now = time.time()
        if action == "list":
            filters = {k: options[k] for k in ("state", "tag", "route", "sort")}
            rows = run_sync(cache_tools.rows(engine, now, **filters))
            every = [row for row in rows if row.key.startswith(options["prefix"])]
            rows = every[: options["limit"]]
            if as_json:
                self.stdout.write(json.dumps([row.to_json() for row in rows], indent=2))
            else:
                title = cache_tools.list_title(rows, engine.handler, len(every))
                self.stdout.write(
                    cache_tools.render_text(cache_tools.rows_table(rows, title=title)), ending=""
                )
            return
        try:
            key = cache_tools.cache_key(options["path"])
        except ValueError as exc:
            raise CommandError(f"{options['path']!r}: {exc}") from exc
        if action == "purge":
            try:
                run_sync(cache_tools.purge(engine, key, by=cache_tools.DJANGO_PURGE_BY))
            except cache_tools.NotWritten as exc:
                raise CommandError(str(exc)) from exc
            if as_json:
                self.stdout.write(json.dumps({"key": key, "purged": True}))
            else:
                self.stdout.write(f"purged {key}: the next request renders it afresh")
            return
        why = run_sync(cache_tools.explain_key(engine, key, now))
        if action == "inspect":
            info = run_sync(cache_tools.inspect(engine, key, now))
            if as_json:
                self.stdout.write(
                    json.dumps(info or {"key": key, "cached": False, "explain": why.text}, indent=2)
                )
            else:
                self.stdout.write(cache_tools.render_text(cache_tools.entry_block(why, info, now)), ending="")
        elif as_json:
            self.stdout.write(json.dumps(why.to_json(), indent=2))
        else:
            self.stdout.write(f"{key}: {why.state.value if why.state else 'not cached'}")
            for sentence in why.sentences:
                self.stdout.write(f"  {sentence}")
        if why.state is None:
            raise CommandError(f"nothing is cached for {key} in {cache_tools.where(engine.handler)}")
