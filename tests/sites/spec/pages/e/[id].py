import _spec


def get_static_paths():
    return {"paths": [], "fallback": "blocking"}


def get_static_props(params):
    if _spec.flag_on():
        _spec.count("e-fail/" + params["id"])
        raise RuntimeError(f"flag is on for {params['id']}")
    return {"props": {"stamp": _spec.stamp("e/" + params["id"])}, "revalidate": 3}


def page(props):
    return f"<html><body><p id='stamp'>{props['stamp']}</p></body></html>"
