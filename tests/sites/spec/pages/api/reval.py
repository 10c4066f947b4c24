from starlette.responses import JSONResponse

from pyisr import revalidate


async def handler(request):
    path = request.query_params["path"]
    try:
        await revalidate(path)
    except Exception as exc:  # the Pages seed: 500 on error, old page still served
        return JSONResponse({"revalidated": False, "error": str(exc)}, status_code=500)
    return {"revalidated": True}
