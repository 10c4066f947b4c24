import _spec

revalidate = 0


def page(params):
    return f"<html><body>{_spec.stamp('dyn')}</body></html>"
