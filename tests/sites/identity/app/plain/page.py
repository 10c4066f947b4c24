"""A shareable page with its own Cache-Control: pyisr's must be the only one sent."""

import uuid

from starlette.responses import HTMLResponse

revalidate = 60


def page(params):
    return HTMLResponse(f"plain {uuid.uuid4().hex}", headers={"cache-control": "public, max-age=5"})
