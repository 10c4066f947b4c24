"""POST /api/bump?name=<name>: change a counter, then revalidate its tag from the app itself."""

from lib import counters
from starlette.responses import JSONResponse

from pyisr import arevalidate_tag


async def POST(request):
    name = request.query_params["name"]
    new = counters.bump(name)
    await arevalidate_tag(counters.tag(name))
    return JSONResponse({"name": name, "value": new})
