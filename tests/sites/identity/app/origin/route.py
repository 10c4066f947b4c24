"""A cached route handler that shows the URL its request had (the canonical origin)."""

revalidate = 60


def GET(request):
    return {"url": str(request.url), "client": request.client and request.client.host}
