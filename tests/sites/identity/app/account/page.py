"""Sets a session cookie for whoever caused the render: must never reach anyone else."""

import uuid

from starlette.responses import HTMLResponse

revalidate = 60


def page(params):
    token = uuid.uuid4().hex
    response = HTMLResponse(f"<html><body>account {token}</body></html>")
    response.set_cookie("session", token)
    response.set_cookie("theme", "dark")
    return response
