"""An API route: ``pages/api/revalidate.py`` with ``handler(request)``.

It answers every method itself and is never cached, so it is the place for
on-demand revalidation and anything that reads the visitor's request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

from pyisr.engine import Rendered
from pyisr.origin import LOCALHOST, Origin
from pyisr.site.loader import ExportCheck
from pyisr.site.route import HTTP_METHODS, Route, RouteKind
from pyisr.site.router import Params


class ApiRoute(Route):
    kind = RouteKind.API
    exports = ("handler",)

    @classmethod
    def from_exports(cls, pattern: str, check: ExportCheck) -> Self:
        # Read, though an API route is never cached: a malformed value is still a mistake.
        dynamic_params = check.dynamic_params()
        tags = check.tags()
        check.need_callable("handler")
        return cls(pattern, check.path, check.module, dynamic_params=dynamic_params, tags=tags)

    @property
    def is_isr(self) -> bool:
        return False

    def describe_kind(self) -> str:
        return "api"

    async def render(
        self, key: str, params: Params, *, fallback_shell: bool = False, origin: Origin = LOCALHOST
    ) -> Rendered:
        raise TypeError(f"{self.kind} routes are not rendered into the cache")

    def handler_for(self, method: str) -> Callable[..., Any] | None:
        fn: Callable[..., Any] = self.module.handler  # one function for every method
        return fn

    def allowed_methods(self) -> list[str]:
        return list(HTTP_METHODS)
