import uuid

from starlette.responses import HTMLResponse

revalidate = 60


def page(params):
    return HTMLResponse(f"private {uuid.uuid4().hex}", headers={"cache-control": "private, max-age=60"})
