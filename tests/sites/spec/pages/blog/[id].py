import _spec


def get_static_paths():
    return {"paths": [{"params": {"id": "1"}}], "fallback": "blocking"}


def get_static_props(params):
    return {"props": {"id": params["id"], "stamp": _spec.stamp("blog/" + params["id"])},
            "revalidate": _spec.REVALIDATE}


def page(props):
    return f"<html><body><h1>Post {props['id']}</h1><p id='stamp'>{props['stamp']}</p></body></html>"
