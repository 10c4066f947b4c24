"""Says Cache-Control: private: never kept by pyisr, nor by the edge."""

import uuid

from lib import counters
from starlette.responses import HTMLResponse

revalidate = 60


def page(params):
    counters.record_render("private")
    return HTMLResponse(f"private {uuid.uuid4().hex}", headers={"cache-control": "private, max-age=60"})
