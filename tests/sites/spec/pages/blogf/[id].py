import _spec


def get_static_paths():
    return {"paths": ["/blogf/1"], "fallback": False}


def get_static_props(params):
    return {"props": {"stamp": _spec.stamp("blogf/" + params["id"])}, "revalidate": _spec.REVALIDATE}


def page(props):
    return f"<html><body><p id='stamp'>{props['stamp']}</p></body></html>"
