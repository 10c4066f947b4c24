"""A Pages-Router page: ``pages/posts/[id].py`` with ``get_static_props`` and ``page(props)``.

Its paths and fallback come from ``get_static_paths()``; its revalidate, 404 and
redirect come from each ``get_static_props()`` result, so one route can have a
different policy per page. The props travel with the render (``PROPS_HEADER``) so a
client-side navigation can ask for them without rendering again.
"""

from __future__ import annotations

import json
import math
from typing import Any, Self

from pyisr import lifetimes
from pyisr.cache.entry import Revalidate
from pyisr.engine import OnMissing, Rendered
from pyisr.http import PROPS_HEADER
from pyisr.origin import LOCALHOST, Origin
from pyisr.paths import normalize_path
from pyisr.site.loader import ExportCheck
from pyisr.site.route import (
    Route,
    RouteKind,
    StaticPaths,
    as_rendered,
    call_maybe_async,
    not_found_result,
    redirect_result,
    with_header,
)
from pyisr.site.router import Params, PatternRoute, path_for
from pyisr.site.templates import render_template


def validate_props_revalidate(value: Any, key: str) -> Revalidate:
    """Check ``get_static_props``' ``revalidate`` the way Next.js does (SPEC S-25); a
    profile name (``"hourly"``) stands for its seconds (its expire: :func:`props_expire`)."""
    if isinstance(value, str):
        return lifetimes.profile(value, where=f"get_static_props() of {key}").revalidate
    if value is None or value is False:
        return None
    if value is True:
        return 1
    if isinstance(value, float) and not math.isnan(value) and not value.is_integer():
        raise ValueError(
            f"A page's revalidate option must be seconds expressed as a natural number for {key}. "
            f"Mixed numbers, such as {value!r}, cannot be used."
        )
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isnan(value) or value <= 0:
            raise ValueError(
                f"A page's revalidate option can not be less than or equal to zero for {key} "
                f"(got {value!r}). To never revalidate, return revalidate=False."
            )
        return int(value)
    raise ValueError(
        f"A page's revalidate option must be seconds expressed as a natural number. Mixed numbers "
        f"and strings cannot be used. Received {value!r} for {key}."
    )


def props_expire(result: dict[str, Any], revalidate: Revalidate, key: str) -> int | None:
    """``get_static_props``' ``expire`` (or its revalidate profile's), checked against its revalidate."""
    named = result.get("revalidate")
    given = result.get("expire")
    if given is None and not isinstance(named, str):
        return None
    where = f"get_static_props() of {key}"
    lifetime = lifetimes.parse(named if isinstance(named, str) else revalidate, given, where=where)
    return lifetime.expire


class PagesPage(Route):
    kind = RouteKind.PAGES_PAGE
    exports = ("get_static_paths", "get_static_props", "page", "template")
    is_page = True

    @classmethod
    def from_exports(cls, pattern: str, check: ExportCheck) -> Self:
        module = check.module
        dynamic_params = check.dynamic_params()
        tags = check.tags()
        check.need_callable("get_static_props", required=False)
        if not hasattr(module, "page") and not hasattr(module, "template"):
            check.error("define page(props) or template = 'name.html'")
        check.need_callable("page", required=False)
        if hasattr(module, "template") and not isinstance(module.template, str):
            check.error("template must be a template file name such as 'post.html'", "template")
        if "[" in pattern:
            if not hasattr(module, "get_static_paths"):
                check.error(
                    "a dynamic Pages route needs get_static_paths() returning "
                    "{'paths': [...], 'fallback': False | True | 'blocking'}"
                )
            else:
                check.need_callable("get_static_paths")
        elif hasattr(module, "get_static_paths"):
            check.error(
                "get_static_paths() is only for dynamic routes such as pages/blog/[id].py", "get_static_paths"
            )
        return cls(pattern, check.path, module, dynamic_params=dynamic_params, tags=tags)

    def describe_kind(self) -> str:
        if self.is_isr and hasattr(self.module, "get_static_props"):
            return "ISR (per page)"
        return super().describe_kind()

    def on_unknown_path(self, *, bot: bool) -> OnMissing:
        if self.fallback is False:
            return OnMissing.NOT_FOUND
        if self.fallback is True and not bot:
            return OnMissing.FALLBACK
        return OnMissing.RENDER

    async def dynamic_static_paths(self, matcher: PatternRoute[Route]) -> StaticPaths:
        fn = getattr(self.module, "get_static_paths", None)
        if fn is None:
            return StaticPaths([], self.fallback)
        where = f"{self.file}"
        result = await call_maybe_async(fn)
        if not isinstance(result, dict) or "paths" not in result:
            raise TypeError(f"{where}: get_static_paths() must return {{'paths': [...], 'fallback': ...}}")
        fallback = result.get("fallback", False)
        if fallback not in (True, False, "blocking"):
            raise ValueError(
                f"{where}: get_static_paths() fallback must be False, True or 'blocking', not {fallback!r}"
            )
        keys = []
        for item in result["paths"]:
            if isinstance(item, str):
                keys.append(normalize_path(item))
            elif isinstance(item, dict) and isinstance(item.get("params"), dict):
                keys.append(path_for(matcher.segments, item["params"], self.pattern))
            else:
                raise TypeError(
                    f"{where}: get_static_paths() paths must be '/path' strings or "
                    f"{{'params': {{...}}}} dicts, not {item!r}"
                )
        return StaticPaths(keys, fallback)

    async def render(
        self, key: str, params: Params, *, fallback_shell: bool = False, origin: Origin = LOCALHOST
    ) -> Rendered:
        if fallback_shell:
            from pyisr import context as render_context

            token = render_context.enter(render_context.RenderContext(key=key, is_fallback=True))
            try:
                return await self._render_body({}, None, params)
            finally:
                render_context.leave(token)
        gsp = getattr(self.module, "get_static_props", None)
        if gsp is None:
            return await self._render_body({}, None, params)
        result = await call_maybe_async(gsp, params)
        if not isinstance(result, dict):
            raise TypeError(
                f"{self.file}: get_static_props() must return a dict, not {type(result).__name__}"
            )
        extra = set(result) - {"props", "revalidate", "expire", "not_found", "redirect"}
        if extra:
            raise ValueError(
                f"{self.file}: get_static_props() returned unknown keys {sorted(extra)}; allowed: "
                "props, revalidate, expire, not_found, redirect"
            )
        revalidate = validate_props_revalidate(result.get("revalidate"), key)
        expire = props_expire(result, revalidate, key)
        rendered = await self._render_result(result, revalidate, params, key)
        rendered.expire = expire
        return rendered

    async def _render_result(
        self, result: dict[str, Any], revalidate: Revalidate, params: Params, key: str
    ) -> Rendered:
        if result.get("not_found") and result.get("redirect"):
            raise ValueError(f"{self.file}: get_static_props() cannot return both not_found and redirect")
        if result.get("not_found"):
            return with_header(not_found_result(revalidate), PROPS_HEADER, json.dumps({"not_found": True}))
        if result.get("redirect"):
            target = result["redirect"]
            if not isinstance(target, dict) or not isinstance(target.get("destination"), str):
                raise ValueError(
                    f"{self.file}: redirect must be {{'destination': '/path', 'permanent': False}}, "
                    f"not {target!r}"
                )
            rendered = redirect_result(target["destination"], bool(target.get("permanent")), revalidate)
            return with_header(rendered, PROPS_HEADER, json.dumps({"redirect": target}))
        props = result.get("props", {})
        if not isinstance(props, dict):
            raise TypeError(f"{self.file}: get_static_props() 'props' must be a dict")
        return await self._render_body(props, revalidate, params)

    async def _render_body(self, props: dict[str, Any], revalidate: Revalidate, params: Params) -> Rendered:
        page_fn = getattr(self.module, "page", None)
        if page_fn is not None:
            result = await call_maybe_async(page_fn, props)
        else:
            template = self.module.template
            result = render_template(template, **props, props=props, params=params)
        rendered = as_rendered(result, f"{self.file} page()")
        try:
            props_json = json.dumps({"props": props}, default=str)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{self.file}: props must be JSON-serialisable: {exc}") from exc
        rendered.revalidate = revalidate
        return with_header(rendered, PROPS_HEADER, props_json)
