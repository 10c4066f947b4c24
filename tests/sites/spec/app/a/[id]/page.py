import _spec

revalidate = _spec.REVALIDATE


def generate_static_params():
    return [{"id": "1"}]


def page(params):
    return f"<html><body><p id='stamp'>{_spec.stamp('a/' + params['id'])}</p></body></html>"
