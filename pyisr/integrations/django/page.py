"""A request's page: its key, its policy (lifetime and tags) and the render that makes it.

Shared by the view wrappers (a visitor's GET) and the resolver (``revalidate(path)``),
so both compute the same key and tags for the same page.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pyisr.cache.tags import key_tag
from pyisr.engine import RenderPolicy
from pyisr.integrations import key_for_decoded_path, page_policy, pattern_from_rule
from pyisr.integrations.django.i18n import variant_key
from pyisr.integrations.django.render import Options
from pyisr.paths import normalize_path


def key_and_policy(request: Any, options: Options, variant: str | None = None) -> tuple[str, RenderPolicy]:
    """The key and policy of ``request``'s page; ``variant``: the language its key names.

    ``path()`` routes give the page its route pattern's tag too
    (``revalidate_path("/blog/[id]", "page")``).
    """
    key = key_for_decoded_path(request.path)
    pattern = None
    match = getattr(request, "resolver_match", None)
    route = getattr(match, "route", None)
    if isinstance(route, str):
        found = pattern_from_rule(route)
        if found is not None:
            # ``route`` is relative to the script prefix (SCRIPT_NAME); the key is not.
            prefix = request.path[: len(request.path) - len(request.path_info)]
            pattern = normalize_path(key_for_decoded_path(prefix).rstrip("/") + found)
    policy = page_policy(key, pattern, options.lifetime_now(), options.tags)
    if variant is None:
        return key, policy
    # The language's own key, with the path's tags: revalidating the path reaches it.
    own = variant_key(key, variant)
    return own, dataclasses.replace(policy, tags=(*policy.tags, key_tag(own)))
