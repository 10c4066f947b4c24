import os

import _spec

from pyisr import fetch

FETCH_REVALIDATE = int(os.environ.get("SPEC_FETCH_REVALIDATE", "3"))


async def page(params):
    response = await fetch(os.environ["SPEC_DATA_URL"], revalidate=FETCH_REVALIDATE, tags=["ft"])
    return f"<html><body><p id='data'>{response.text}</p><p id='stamp'>{_spec.stamp('af')}</p></body></html>"
