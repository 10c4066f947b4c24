"""/posts/<id>: the same post, Pages-Router style (the Pages seed's minimal example).

The Pages Router has no data cache: get_static_props reads SQLite directly, every
time the page is (re)generated. If it raises (the database is down), the last good
page keeps being served and the next request retries.
"""

from lib import blog, db

from pyisr import render_template


def get_static_paths():
    paths = [{"params": {"id": str(post["id"])}} for post in db.all_posts()]
    # We prerender only these paths at build time. { fallback: 'blocking' } will
    # server-render pages on demand if the path doesn't exist.
    return {"paths": paths, "fallback": "blocking"}


def get_static_props(params):
    post_id = blog.parse_id(params["id"])
    post = db.get_post(post_id) if post_id is not None else None
    if post is None:
        # A 404, cached for the same window: the post may be written later.
        return {"not_found": True, "revalidate": blog.REVALIDATE}
    newest_id = db.newest_id() or post_id
    return {
        "props": {"post": post, "newest_id": newest_id, "rendered_at": blog.rendered_at()},
        # pyisr will invalidate the cache when a request comes in, at most once every 60 seconds.
        "revalidate": blog.REVALIDATE,
    }


def page(props):
    return render_template(
        "post.html",
        post=props["post"],
        base="/posts",
        newest_id=props["newest_id"],
        section="posts",
        router_note="Pages Router style: pages/posts/[id].py, get_static_paths with fallback "
        f"'blocking', get_static_props with revalidate {blog.REVALIDATE}.",
        rendered_at=props["rendered_at"],
    )
