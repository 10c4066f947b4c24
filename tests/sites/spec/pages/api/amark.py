from pyisr import arevalidate_path, arevalidate_tag


async def handler(request):
    """Marks with the async forms, from an async handler."""
    q = request.query_params
    if "tag" in q:
        await arevalidate_tag(q["tag"])
    if "path" in q:
        await arevalidate_path(q["path"], q.get("type"))
    return {"marked": True}
