import uuid

from starlette.responses import HTMLResponse

revalidate = 60


def page(params):
    return HTMLResponse(f"vary {uuid.uuid4().hex}", headers={"vary": "*"})
