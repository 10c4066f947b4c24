import _spec

from pyisr import cached

revalidate = 100


def load():
    return _spec.stamp("at-data")


get_data = cached(load, ["k"], tags=["t1"], revalidate=100)


def page(params):
    return f"<html><body><p id='data'>{get_data()}</p><p id='stamp'>{_spec.stamp('at')}</p></body></html>"
