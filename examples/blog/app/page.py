"""/: the home page, with the five newest posts.

It declares no revalidate of its own; it inherits the ``posts`` tag and the hour of
the cached post list it reads, so adding a post refreshes it too.
"""

from lib import blog

from pyisr import render_template


async def page(params):
    posts = await blog.all_posts()
    return render_template("home.html", latest=posts[:5], rendered_at=blog.rendered_at())
