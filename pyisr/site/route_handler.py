"""A route handler: ``app/api/items/route.py`` with ``GET``, ``POST``... functions.

As in Next.js, only ``GET`` is ever cached, and only when the module says
``revalidate``; every other method, and a handler without ``revalidate``, runs per
request. A cached ``GET`` is rendered against a request built from nothing (no
visitor's cookies), so what is stored is what any visitor may see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from starlette.requests import Request

from pyisr.cache.entry import EntryKind
from pyisr.engine import Rendered
from pyisr.origin import LOCALHOST, Origin
from pyisr.site.loader import ExportCheck
from pyisr.site.route import (
    HTTP_METHODS,
    Route,
    RouteKind,
    as_rendered,
    call_maybe_async,
    handler_result,
)
from pyisr.site.router import Params


@dataclass
class RouteHandler(Route):
    kind = RouteKind.ROUTE_HANDLER
    exports = ("revalidate", "expire", "tags", *HTTP_METHODS)
    entry_kind = EntryKind.ROUTE

    #: The HTTP methods the module defines a function for.
    methods: tuple[str, ...] = ("GET", "HEAD")

    @classmethod
    def from_exports(cls, pattern: str, check: ExportCheck) -> Self:
        module = check.module
        lifetime = check.lifetime(pattern)
        revalidate = lifetime.revalidate
        dynamic_params = check.dynamic_params()
        tags = check.tags()
        methods = tuple(m for m in HTTP_METHODS if callable(getattr(module, m, None)))
        if not methods:
            check.error("a route handler needs at least one of GET, POST, PUT, ...")
        if hasattr(module, "revalidate") and "GET" not in methods:
            check.error("revalidate only applies to GET, which this route does not define", "revalidate")
        if not hasattr(module, "revalidate"):
            revalidate = 0  # a handler is cached only when its module asks to be
        return cls(
            pattern,
            check.path,
            module,
            revalidate=revalidate,
            expire=lifetime.expire,
            dynamic_params=dynamic_params,
            tags=tags,
            methods=methods,
        )

    @property
    def is_isr(self) -> bool:
        return hasattr(self.module, "revalidate") and self.revalidate != 0 and "GET" in self.methods

    async def render(
        self, key: str, params: Params, *, fallback_shell: bool = False, origin: Origin = LOCALHOST
    ) -> Rendered:
        request = synthetic_request(key, origin)
        return as_rendered(
            handler_result(await call_maybe_async(self.module.GET, request)), f"{self.file} GET"
        )

    def allowed_methods(self) -> list[str]:
        methods = [m for m in HTTP_METHODS if hasattr(self.module, m)]
        if "GET" in methods and "HEAD" not in methods:
            methods.insert(methods.index("GET") + 1, "HEAD")
        return methods


def synthetic_request(path: str, origin: Origin = LOCALHOST) -> Request:
    """A GET for ``path`` from no one, at ``origin``: what a cached route handler renders against."""
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", origin.host.encode("latin-1"))],
        "scheme": origin.scheme,
        "server": (origin.hostname, origin.port),
        "client": None,
        "root_path": "",
        "http_version": "1.1",
    }
    return Request(scope)
