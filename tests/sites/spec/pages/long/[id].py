import _spec


def get_static_paths():
    return {"paths": [], "fallback": "blocking"}


def get_static_props(params):
    return {"props": {"stamp": _spec.stamp("long/" + params["id"])}, "revalidate": 30}


def page(props):
    return f"<html><body><p id='stamp'>{props['stamp']}</p></body></html>"
