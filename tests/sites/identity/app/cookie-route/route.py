import uuid

from starlette.responses import JSONResponse

revalidate = 60


def GET(request):
    token = uuid.uuid4().hex
    response = JSONResponse({"token": token})
    response.set_cookie("session", token)
    return response
