"""An App-Router page: ``app/blog/[id]/page.py`` with ``page(params)``.

The module declares its cache policy as module attributes (``revalidate``, ``tags``,
``dynamic_params``) and lists its static params with ``generate_static_params()``;
``not_found()`` and ``redirect()`` raised while rendering become cached answers.
"""

from __future__ import annotations

from typing import Any, Self

from pyisr.engine import OnMissing, Rendered
from pyisr.origin import LOCALHOST, Origin
from pyisr.site.loader import ExportCheck
from pyisr.site.route import (
    Route,
    RouteKind,
    StaticPaths,
    as_rendered,
    call_maybe_async,
    not_found_result,
    redirect_result,
)
from pyisr.site.router import Params, PatternRoute, path_for
from pyisr.site.signals import NotFoundSignal, RedirectSignal


class AppPage(Route):
    kind = RouteKind.APP_PAGE
    exports = ("revalidate", "expire", "dynamic_params", "tags", "generate_static_params", "page")
    is_page = True

    @classmethod
    def from_exports(cls, pattern: str, check: ExportCheck) -> Self:
        lifetime = check.lifetime(pattern)
        dynamic_params = check.dynamic_params()
        tags = check.tags()
        check.need_callable("page")
        check.need_callable("generate_static_params", required=False)
        if "[" in pattern and not hasattr(check.module, "generate_static_params") and not dynamic_params:
            check.error(
                "dynamic_params = False but no generate_static_params(): "
                "no page of this route could ever exist",
                "dynamic_params",
            )
        return cls(
            pattern,
            check.path,
            check.module,
            revalidate=lifetime.revalidate,
            expire=lifetime.expire,
            dynamic_params=dynamic_params,
            tags=tags,
        )

    def on_unknown_path(self, *, bot: bool) -> OnMissing:
        return OnMissing.RENDER if self.dynamic_params else OnMissing.NOT_FOUND

    async def dynamic_static_paths(self, matcher: PatternRoute[Route]) -> StaticPaths:
        fn = getattr(self.module, "generate_static_params", None)
        if fn is None:
            return StaticPaths([], self.fallback)
        where = f"{self.file}"
        params_list = await call_maybe_async(fn)
        if not isinstance(params_list, list | tuple):
            raise TypeError(f"{where}: generate_static_params() must return a list of dicts")
        keys = [path_for(matcher.segments, _check_params(p, where), self.pattern) for p in params_list]
        return StaticPaths(keys, self.fallback)

    async def render(
        self, key: str, params: Params, *, fallback_shell: bool = False, origin: Origin = LOCALHOST
    ) -> Rendered:
        try:
            result = await call_maybe_async(self.module.page, params)
        except NotFoundSignal:
            return not_found_result()
        except RedirectSignal as sig:
            return redirect_result(sig.destination, sig.permanent)
        return as_rendered(result, f"{self.file} page()")


def _check_params(params: Any, where: str) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise TypeError(f"{where}: generate_static_params() items must be dicts, not {params!r}")
    return params
