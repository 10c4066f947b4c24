import _spec

revalidate = _spec.REVALIDATE


def GET(request):
    return {"stamp": _spec.stamp("rh")}
