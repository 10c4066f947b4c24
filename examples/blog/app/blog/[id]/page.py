"""/blog/<id>: one post, App-Router style (the App seed's minimal example)."""

from lib import blog

from pyisr import not_found, render_template

# pyisr will invalidate the cache when a request comes in, at most once every 60 seconds.
revalidate = blog.REVALIDATE

# We prerender only the params from generate_static_params at build time. If a request
# comes in for a path that hasn't been generated (/blog/26), it is rendered on demand.
dynamic_params = True

# Every post page depends on the posts, even a 404 for a post that does not exist yet:
# revalidate_tag("posts") (the admin form) refreshes them all.
tags = [blog.TAG]


async def generate_static_params():
    return [{"id": str(post["id"])} for post in await blog.all_posts()]


async def page(params):
    post_id = blog.parse_id(params["id"])
    post = await blog.post(post_id) if post_id is not None else None
    if post is None:
        not_found()
    posts = await blog.all_posts()  # newest first; read once per build or per change
    newest_id = posts[0]["id"] if posts else post["id"]
    return render_template(
        "post.html",
        post=post,
        base="/blog",
        newest_id=newest_id,
        section="blog",
        router_note="App Router style: app/blog/[id]/page.py, revalidate = "
        f"{blog.REVALIDATE}, dynamic_params = True.",
        rendered_at=blog.rendered_at(),
    )
