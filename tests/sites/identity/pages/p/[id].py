"""A Pages-style page whose page() sets a cookie."""

import uuid

from starlette.responses import HTMLResponse


def get_static_paths():
    return {"paths": [], "fallback": "blocking"}


def get_static_props(params):
    return {"props": {"id": params["id"]}, "revalidate": 60}


def page(props):
    token = uuid.uuid4().hex
    response = HTMLResponse(f"<html><body>p {props['id']} {token}</body></html>")
    response.set_cookie("session", token)
    return response
