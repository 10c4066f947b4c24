import hashlib


async def handler(request):
    """What the server handed over: the request body, query and repeated headers."""
    body = await request.body()
    return {
        "method": request.method,
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "query": dict(request.query_params),
        "x_a": request.headers.getlist("x-a"),
    }
