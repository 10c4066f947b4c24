import _spec


def get_static_paths():
    return {"paths": [], "fallback": "blocking"}


def get_static_props(params):
    _spec.count("nf/" + params["id"])
    if params["id"].startswith("nonrev"):
        return {"not_found": True}
    return {"not_found": True, "revalidate": 7}


def page(props):
    return "never"
