import _spec


def get_static_props(params):
    return {"props": {"stamp": _spec.stamp("static")}}


def page(props):
    return f"<html><body><p id='stamp'>{props['stamp']}</p></body></html>"
