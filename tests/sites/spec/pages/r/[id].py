def get_static_paths():
    return {"paths": [], "fallback": "blocking"}


def get_static_props(params):
    return {"redirect": {"destination": "/plain", "permanent": params["id"] == "perm"}, "revalidate": 9}


def page(props):
    return "never"
