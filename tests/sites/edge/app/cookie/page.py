"""Sets a cookie for whoever caused the render: pyisr answers it per visitor, so must the edge."""

import uuid

from lib import counters
from starlette.responses import HTMLResponse

revalidate = 60


def page(params):
    counters.record_render("cookie")
    token = uuid.uuid4().hex
    response = HTMLResponse(f"<html><body>cookie {token}</body></html>")
    response.set_cookie("session", token)
    return response
