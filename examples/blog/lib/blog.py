"""How pages read the blog's data: through pyisr's data cache, tagged ``posts``.

- The post list goes through ``cached`` (the App seed's ``unstable_cache`` example):
  ``cached(db.all_posts, ["posts"], tags=["posts"], revalidate=3600)``.
- One post goes through ``fetch`` from a JSON origin when ``$BLOG_API_URL`` is set (the
  seeds' ``fetch('https://api.vercel.app/blog/1')``; ``origin.py`` is such an origin,
  serving this database on 127.0.0.1), and through ``cached`` otherwise. The fetch
  takes the page's own window (60 s), as a fetch inside a ``revalidate = 60`` page
  does in the seed; the cached read keeps the seed's hour.

Both carry the tag ``posts``, so ``revalidate_tag("posts")`` (the admin form does it)
refreshes every page that shows a post. The windows can be shortened through the
environment for demos and tests; the defaults are the seeds'.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from lib import db
from pyisr import cached, fetch


def _seconds(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${name} must be a whole number of seconds, not {raw!r}") from None
    if value < 1:
        raise ValueError(f"${name} must be at least 1 second, not {value}")
    return value


#: /blog/[id] and /posts/[id]: "at most once every 60 seconds".
REVALIDATE = _seconds("BLOG_REVALIDATE", 60)
#: /blog: "invalidate every hour".
LIST_REVALIDATE = _seconds("BLOG_LIST_REVALIDATE", 3600)
#: Data read through cached(): ``{ revalidate: 3600, tags: ['posts'] }``.
DATA_REVALIDATE = _seconds("BLOG_DATA_REVALIDATE", 3600)

TAG = "posts"

get_cached_posts = cached(db.all_posts, ["posts"], tags=[TAG], revalidate=DATA_REVALIDATE)
get_cached_post = cached(db.get_post, ["post"], tags=[TAG], revalidate=DATA_REVALIDATE)


def rendered_at() -> str:
    """The render time shown in each page's footer: watch it change as pages regenerate."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def api_url() -> str | None:
    """The JSON origin (``$BLOG_API_URL``, e.g. ``http://127.0.0.1:4000``), if any."""
    return os.environ.get("BLOG_API_URL", "").strip().rstrip("/") or None


def parse_id(raw: str) -> int | None:
    """``"7"`` -> 7; anything that is not the canonical spelling of a positive id -> None."""
    if not raw.isascii() or not raw.isdigit() or raw != str(int(raw)) or int(raw) < 1:
        return None
    return int(raw)


async def all_posts() -> list[dict[str, Any]]:
    """Every post, newest first (cached, tag ``posts``)."""
    result: list[dict[str, Any]] = await get_cached_posts.aio()
    return result


async def post(post_id: int) -> dict[str, Any] | None:
    """One post, or ``None`` if it does not exist (fetched or cached, tag ``posts``)."""
    base = api_url()
    if base is None:
        found: dict[str, Any] | None = await get_cached_post.aio(post_id)
        return found
    res = await fetch(f"{base}/posts/{post_id}", tags=[TAG], revalidate=REVALIDATE)
    if res.status_code == 404:
        return None
    if res.status_code != 200:
        # As in the seed: throw instead of returning, so the cache is not updated
        # until the next successful request.
        raise RuntimeError(f"Failed to fetch post {post_id}, received status {res.status_code}")
    data: dict[str, Any] = res.json()
    return data
