"""/c/<name>: a counter's value, cached an hour: only a purge brings a new value sooner."""

from lib import counters

revalidate = 3600


async def page(params):
    name = params["name"]
    counters.record_render(name)
    number = await counters.read(name)
    return f'<html><body><h1 id="value">{number}</h1><p>{counters.FILLER}</p></body></html>'
