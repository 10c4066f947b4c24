"""/blog: every post, newest first (the App seed's "Time-based revalidation" page)."""

from lib import blog

from pyisr import render_template

# Invalidate every hour (BLOG_LIST_REVALIDATE shortens it for demos and tests).
revalidate = blog.LIST_REVALIDATE


async def page(params):
    posts = await blog.all_posts()
    return render_template("blog.html", posts=posts, section="blog", rendered_at=blog.rendered_at())
