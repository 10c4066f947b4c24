def get_static_paths():
    return {"paths": [], "fallback": "blocking"}


VALUES = {"zero": 0, "neg": -1, "frac": 1.5, "str": "5"}


def get_static_props(params):
    return {"props": {}, "revalidate": VALUES[params["id"]]}


def page(props):
    return "never"
