"""POST /admin/posts: add a post, then revalidate_tag("posts") (the App seed's Server Action).

The form posts urlencoded fields ``title``, ``content`` and optionally ``author``. On
success the answer is a 303 to /blog, which is rendered fresh with the new post. On
bad input the form is shown again with the error (400).

This example has no login: put real authentication in front of it before you deploy.
"""

import asyncio
from urllib.parse import parse_qs

from lib import blog, db
from starlette.responses import HTMLResponse, RedirectResponse

from pyisr import arevalidate_tag, render_template

MAX_BODY = 64 * 1024


async def POST(request):
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_BODY:
        return HTMLResponse("The post is too large.", status_code=413)
    body = await request.body()
    if len(body) > MAX_BODY:
        return HTMLResponse("The post is too large.", status_code=413)
    fields = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
    title, content = fields.get("title", ""), fields.get("content", "")
    author = fields.get("author", "")
    try:
        await asyncio.to_thread(db.add_post, title, content, author)
    except ValueError as exc:
        page = render_template(
            "admin.html",
            section="admin",
            error=f"Could not publish: {exc}.",
            title=title,
            content=content,
            author=author,
        )
        return HTMLResponse(page, status_code=400)
    # Invalidate all data tagged with 'posts' in the cache, and the pages built from it.
    await arevalidate_tag(blog.TAG)
    return RedirectResponse("/blog", status_code=303)
