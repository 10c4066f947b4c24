from pyisr import revalidate_path, revalidate_tag


def handler(request):
    """Marks with the sync forms, from a sync handler (runs in a worker thread)."""
    q = request.query_params
    if "tag" in q:
        revalidate_tag(q["tag"])
    if "path" in q:
        revalidate_path(q["path"], q.get("type"))
    return {"marked": True}
