"""A site folder: its routes (``app/`` and ``pages/``), templates and public files.

Loading checks every module and collects every problem before raising, so one run
of ``pyisr build`` lists all the mistakes, each with its file, line and fix.

A loaded site is one build, fixed for the process's lifetime: the id of the current
build is read once, with that build's own manifest (``.pyisr/builds/<id>/``), and the
templates are read once; a later ``pyisr build`` changes none of them (a new process
serves the new build). Under ``pyisr dev`` there is no build: templates
are read from disk at each use, and static paths are learnt from the code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyisr import lifetimes
from pyisr.config import load_config
from pyisr.deploys import read_manifest
from pyisr.site.api_route import ApiRoute
from pyisr.site.app_page import AppPage
from pyisr.site.loader import SiteError, SiteLoadError, import_error, import_from_source, load_module
from pyisr.site.pages_page import PagesPage
from pyisr.site.route import Route
from pyisr.site.route_handler import RouteHandler
from pyisr.site.router import Params, PatternError, PatternRoute, Router, parse_pattern
from pyisr.site.templates import make_environment
from pyisr.site_store import read_build_id


def _pattern_from_app(rel: Path) -> str:
    # app/blog/[id]/page.py -> /blog/[id]; "(group)" folders do not appear in the URL.
    parts = [p for p in rel.parent.parts if not (p.startswith("(") and p.endswith(")"))]
    return "/" + "/".join(parts)


def _pattern_from_pages(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts and parts[-1] == "index":
        parts.pop()
    return "/" + "/".join(parts)


@dataclass
class Site:
    root: Path
    routes: list[Route] = field(default_factory=list)
    router: Router[Route] = field(default_factory=lambda: Router([]))
    build_id: str | None = None
    #: ``SITE/middleware.py``'s ``middleware(request)``, run before every page request.
    middleware: Any = None
    #: The site's Jinja2 environment (``templates/``), current while it renders.
    templates: Any = None
    #: The manifest of the build this process serves (``None``: no build, or dev).
    manifest: dict[str, Any] | None = None

    @property
    def dot_dir(self) -> Path:
        return self.root / ".pyisr"

    @property
    def public_dir(self) -> Path:
        return self.root / "public"

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, root: str | Path, *, dev: bool = False) -> Site:
        """Load and check every route of the site; raises :class:`SiteLoadError`.

        ``dev``: templates live from disk and no build (``pyisr dev``). Otherwise the
        current build is pinned and every template is read now.
        """
        root = Path(root).resolve()
        if not root.is_dir():
            raise SiteLoadError([SiteError(root, None, "site folder does not exist")])
        if not (root / "app").is_dir() and not (root / "pages").is_dir():
            raise SiteLoadError(
                [SiteError(root, None, "no app/ or pages/ folder: create app/page.py or pages/index.py")]
            )
        # `revalidate = "hourly"` names a profile of the site's pyisr.toml: known before
        # any route is read (and by the data calls its pages make).
        lifetimes.use_config(load_config(root))
        site = cls(root=root)
        # Pages import the site's own helpers (`from lib.db import posts`), as in Next.js.
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        import_from_source(root)
        site.templates = make_environment([root / "templates"], live=dev)
        errors: list[SiteError] = []
        routes: list[Route] = []
        for path, route_class, pattern in site._discover():
            try:
                parse_pattern(pattern)
            except PatternError as exc:
                errors.append(SiteError(path, None, str(exc)))
                continue
            try:
                module = load_module(path, root)
            except BaseException as exc:  # noqa: BLE001 - every import failure is reported
                if isinstance(exc, KeyboardInterrupt):
                    raise
                errors.append(import_error(path, exc))
                continue
            route, route_errors = route_class.from_module(pattern, path, module)
            errors.extend(route_errors)
            if route is not None:
                routes.append(route)
        errors.extend(_duplicates(routes))
        middleware_file = root / "middleware.py"
        if middleware_file.is_file():
            try:
                module = load_module(middleware_file, root)
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                errors.append(import_error(middleware_file, exc))
            else:
                site.middleware = getattr(module, "middleware", None)
                if not callable(site.middleware):
                    errors.append(SiteError(middleware_file, None, "define middleware(request)"))
        if errors:
            raise SiteLoadError(errors)
        site.routes = routes
        for route in routes:
            route.templates = site.templates
        site.router = Router(PatternRoute(r.pattern, r) for r in routes)
        for matcher in site.router.routes:
            matcher.target.matcher = matcher
        if not dev:
            site._load_manifest()
        return site

    def _discover(self) -> list[tuple[Path, type[Route], str]]:
        """Every route file with the kind of route its place and name make it."""
        found: list[tuple[Path, type[Route], str]] = []
        app = self.root / "app"
        if app.is_dir():
            for path in sorted(app.rglob("*.py")):
                rel = path.relative_to(app)
                if any(part.startswith(("_", ".")) for part in rel.parts[:-1]):
                    continue
                if path.name == "page.py":
                    found.append((path, AppPage, _pattern_from_app(rel)))
                elif path.name == "route.py":
                    found.append((path, RouteHandler, _pattern_from_app(rel)))
        pages = self.root / "pages"
        if pages.is_dir():
            for path in sorted(pages.rglob("*.py")):
                rel = path.relative_to(pages)
                if any(part.startswith(("_", ".")) for part in rel.parts):
                    continue
                route_class = ApiRoute if rel.parts[0] == "api" else PagesPage
                found.append((path, route_class, _pattern_from_pages(rel)))
        return found

    def _load_manifest(self) -> None:
        """Pin the current build: its id (``BUILD_ID``, read once) and its own manifest."""
        build_id = read_build_id(self.root)
        manifest = read_manifest(self.root, build_id) if build_id is not None else None
        if manifest is None:
            return
        self.build_id, self.manifest = build_id, manifest
        by_pattern = {r.pattern: r for r in self.routes}
        for item in manifest.get("routes", []):
            route = by_pattern.get(item.get("pattern"))
            if route is not None:
                route.prerendered = set(item.get("prerendered", []))
                if item.get("fallback") in (True, False, "blocking"):
                    route.fallback = item["fallback"]

    async def prepare(self) -> None:
        """Learn each route's static paths and fallback without rendering (dev, no build)."""
        for route in self.routes:
            paths = await route.static_paths()
            route.prerendered, route.fallback = set(paths.keys), paths.fallback

    def current_build_id(self) -> str | None:
        """The site's current build as on disk now: :attr:`build_id` until another is built."""
        return read_build_id(self.root)

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest of the build this site was loaded with (never a later build's)."""
        return self.manifest

    # -- matching -----------------------------------------------------------------------

    def match(self, key: str) -> tuple[Route, Params] | None:
        found = self.router.match(key)
        if found is None:
            return None
        return found[0].target, found[1]


def _duplicates(routes: list[Route]) -> list[SiteError]:
    errors: list[SiteError] = []
    seen: dict[str, Route] = {}
    for route in routes:
        # Two files may spell the same URL with different parameter names.
        shape = "/".join("[]" if s.startswith("[") else s for s in route.pattern.split("/"))
        other = seen.get(shape)
        if other is not None:
            errors.append(
                SiteError(
                    route.file,
                    None,
                    f"the path {route.pattern} is also defined by {other.file}; remove one of the two files",
                )
            )
        else:
            seen[shape] = route
    return errors
