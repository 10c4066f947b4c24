"""A site folder: its routes (``app/`` and ``pages/``), templates and public files.

Loading checks every module and collects every problem before raising, so one run
of ``pyisr build`` lists all the mistakes, each with its file, line and fix.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyisr.cache.entry import validate_revalidate
from pyisr.site.loader import (
    SiteError,
    SiteLoadError,
    definition_lines,
    import_error,
    load_module,
    unknown_exports,
)
from pyisr.site.route import HTTP_METHODS, Route, RouteKind
from pyisr.site.routes import Params, PatternError, PatternRoute, Router, parse_pattern
from pyisr.site.templates import make_environment, set_environment

APP_PAGE_EXPORTS = ("revalidate", "dynamic_params", "tags", "generate_static_params", "page")
PAGES_EXPORTS = ("get_static_paths", "get_static_props", "page", "template")
ROUTE_EXPORTS = ("revalidate", "tags", *HTTP_METHODS)
API_EXPORTS = ("handler",)

MANIFEST = "manifest.json"
BUILD_ID = "BUILD_ID"


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

    @property
    def dot_dir(self) -> Path:
        return self.root / ".pyisr"

    @property
    def public_dir(self) -> Path:
        return self.root / "public"

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, root: str | Path) -> Site:
        """Load and check every route of the site; raises :class:`SiteLoadError`."""
        root = Path(root).resolve()
        if not root.is_dir():
            raise SiteLoadError([SiteError(root, None, "site folder does not exist")])
        if not (root / "app").is_dir() and not (root / "pages").is_dir():
            raise SiteLoadError(
                [SiteError(root, None, "no app/ or pages/ folder: create app/page.py or pages/index.py")]
            )
        site = cls(root=root)
        # Pages import the site's own helpers (`from lib.db import posts`), as in Next.js.
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        set_environment(make_environment([root / "templates"]))
        errors: list[SiteError] = []
        routes: list[Route] = []
        for path, kind, pattern in site._discover():
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
            route, route_errors = _make_route(kind, pattern, path, module)
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
        site.router = Router(PatternRoute(r.pattern, r) for r in routes)
        for matcher in site.router.routes:
            matcher.target.matcher = matcher
        site._load_manifest()
        return site

    def _discover(self) -> list[tuple[Path, RouteKind, str]]:
        found: list[tuple[Path, RouteKind, str]] = []
        app = self.root / "app"
        if app.is_dir():
            for path in sorted(app.rglob("*.py")):
                rel = path.relative_to(app)
                if any(part.startswith(("_", ".")) for part in rel.parts[:-1]):
                    continue
                if path.name == "page.py":
                    found.append((path, RouteKind.APP_PAGE, _pattern_from_app(rel)))
                elif path.name == "route.py":
                    found.append((path, RouteKind.ROUTE_HANDLER, _pattern_from_app(rel)))
        pages = self.root / "pages"
        if pages.is_dir():
            for path in sorted(pages.rglob("*.py")):
                rel = path.relative_to(pages)
                if any(part.startswith(("_", ".")) for part in rel.parts):
                    continue
                kind = RouteKind.API if rel.parts[0] == "api" else RouteKind.PAGES_PAGE
                found.append((path, kind, _pattern_from_pages(rel)))
        return found

    def _load_manifest(self) -> None:
        manifest = self.read_manifest()
        if manifest is None:
            return
        self.build_id = manifest.get("build_id")
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
            route.prerendered = set(await route.static_keys())

    def read_manifest(self) -> dict[str, Any] | None:
        path = self.dot_dir / MANIFEST
        if not path.is_file():
            return None
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data

    # -- matching -----------------------------------------------------------------------

    def match(self, key: str) -> tuple[Route, Params] | None:
        found = self.router.match(key)
        if found is None:
            return None
        return found[0].target, found[1]


def _make_route(
    kind: RouteKind, pattern: str, path: Path, module: Any
) -> tuple[Route | None, list[SiteError]]:
    lines = definition_lines(path)
    errors: list[SiteError] = []
    known = {
        RouteKind.APP_PAGE: APP_PAGE_EXPORTS,
        RouteKind.PAGES_PAGE: PAGES_EXPORTS,
        RouteKind.ROUTE_HANDLER: ROUTE_EXPORTS,
        RouteKind.API: API_EXPORTS,
    }[kind]
    errors.extend(unknown_exports(path, module, known, lines))

    def err(name: str, message: str) -> None:
        errors.append(SiteError(path, lines.get(name), message))

    revalidate = None
    if kind in (RouteKind.APP_PAGE, RouteKind.ROUTE_HANDLER) and hasattr(module, "revalidate"):
        value = module.revalidate
        if isinstance(value, bool) and value:
            err("revalidate", "revalidate = True is not allowed: use seconds (e.g. 60) or False")
        else:
            try:
                revalidate = validate_revalidate(value, where=f"{pattern}")
            except ValueError:
                err(
                    "revalidate",
                    f"Invalid revalidate value {value!r} on {pattern!r}, must be a non-negative number "
                    "of seconds or False (e.g. revalidate = 60)",
                )
    dynamic_params = True
    if hasattr(module, "dynamic_params"):
        if not isinstance(module.dynamic_params, bool):
            err("dynamic_params", f"dynamic_params must be True or False, not {module.dynamic_params!r}")
        else:
            dynamic_params = module.dynamic_params
    tags: tuple[str, ...] = ()
    if hasattr(module, "tags"):
        try:
            from pyisr.cache.tags import validate_tags

            tags = validate_tags(module.tags, where="tags")
        except ValueError as exc:
            err("tags", str(exc))

    def need_callable(name: str, required: bool = True) -> None:
        fn = getattr(module, name, None)
        if fn is None:
            if required:
                errors.append(SiteError(path, None, f"missing {name}(): define `def {name}(...)`"))
        elif not callable(fn):
            err(name, f"{name} must be a function, not {type(fn).__name__}")

    fallback: bool | str = "blocking"
    methods: tuple[str, ...] = ("GET", "HEAD")
    if kind is RouteKind.APP_PAGE:
        need_callable("page")
        need_callable("generate_static_params", required=False)
        if "[" in pattern and not hasattr(module, "generate_static_params") and not dynamic_params:
            errors.append(
                SiteError(
                    path,
                    lines.get("dynamic_params"),
                    "dynamic_params = False but no generate_static_params(): "
                    "no page of this route could ever exist",
                )
            )
    elif kind is RouteKind.PAGES_PAGE:
        need_callable("get_static_props", required=False)
        if not hasattr(module, "page") and not hasattr(module, "template"):
            errors.append(SiteError(path, None, "define page(props) or template = 'name.html'"))
        need_callable("page", required=False)
        if hasattr(module, "template") and not isinstance(module.template, str):
            err("template", "template must be a template file name such as 'post.html'")
        if "[" in pattern:
            if not hasattr(module, "get_static_paths"):
                errors.append(
                    SiteError(
                        path,
                        None,
                        "a dynamic Pages route needs get_static_paths() returning "
                        "{'paths': [...], 'fallback': False | True | 'blocking'}",
                    )
                )
            else:
                need_callable("get_static_paths")
        elif hasattr(module, "get_static_paths"):
            err(
                "get_static_paths", "get_static_paths() is only for dynamic routes such as pages/blog/[id].py"
            )
    elif kind is RouteKind.ROUTE_HANDLER:
        methods = tuple(m for m in HTTP_METHODS if callable(getattr(module, m, None)))
        if not methods:
            errors.append(SiteError(path, None, "a route handler needs at least one of GET, POST, PUT, ..."))
        if hasattr(module, "revalidate") and "GET" not in methods:
            err("revalidate", "revalidate only applies to GET, which this route does not define")
    else:
        need_callable("handler")
    if errors:
        return None, errors
    if kind is RouteKind.ROUTE_HANDLER and not hasattr(module, "revalidate"):
        revalidate = 0
    return Route(
        kind=kind,
        pattern=pattern,
        file=path,
        module=module,
        revalidate=revalidate,
        dynamic_params=dynamic_params,
        fallback=fallback,
        tags=tags,
        methods=methods,
    ), errors


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
