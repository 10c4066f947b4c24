import time

import _spec


def get_static_paths():
    return {"paths": [{"params": {"id": "1"}}], "fallback": "blocking"}


def get_static_props(params):
    if params["id"].startswith("slow"):
        time.sleep(0.5)  # slower than a burst of requests, so they all join one render
    return {
        "props": {"id": params["id"], "stamp": _spec.stamp("blog/" + params["id"])},
        "revalidate": _spec.REVALIDATE,
    }


def page(props):
    return f"<html><body><h1>Post {props['id']}</h1><p id='stamp'>{props['stamp']}</p></body></html>"
