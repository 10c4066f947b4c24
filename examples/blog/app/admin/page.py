"""/admin: the form that writes a post (never cached: revalidate = 0)."""

from lib import blog

from pyisr import render_template

revalidate = 0


def page(params):
    return render_template("admin.html", section="admin", rendered_at=blog.rendered_at())
