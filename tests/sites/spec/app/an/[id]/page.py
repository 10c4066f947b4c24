import _spec

revalidate = _spec.REVALIDATE
dynamic_params = False


def generate_static_params():
    return [{"id": "1"}]


def page(params):
    return f"<html><body>{_spec.stamp('an/' + params['id'])}</body></html>"
