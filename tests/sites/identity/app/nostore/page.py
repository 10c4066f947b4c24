import uuid

from starlette.responses import HTMLResponse

revalidate = 60


def page(params):
    return HTMLResponse(f"nostore {uuid.uuid4().hex}", headers={"cache-control": "no-store"})
