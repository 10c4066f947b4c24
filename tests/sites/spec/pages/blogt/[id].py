import time

import _spec

from pyisr import is_fallback


def get_static_paths():
    return {"paths": [], "fallback": True}


def get_static_props(params):
    time.sleep(0.3)
    return {"props": {"stamp": _spec.stamp("blogt/" + params["id"])}, "revalidate": _spec.REVALIDATE}


def page(props):
    if is_fallback():
        return "<html><body><p id='loading'>Loading...</p></body></html>"
    return f"<html><body><p id='stamp'>{props['stamp']}</p></body></html>"
