"""Counters a test changes by hand (files in $EDGE_DATA), and the renders that read them.

A page shows its counter's value; the value only reaches the page through a render, so
a changed value seen through Varnish proves the edge dropped its copy.
"""

import os
from pathlib import Path

from pyisr import cached

#: Text that makes a page big enough to be stored compressed.
FILLER = " ".join(f"Line {i} of a page long enough to be worth compressing." for i in range(60))


def data_dir() -> Path:
    return Path(os.environ["EDGE_DATA"])


def value(name: str) -> int:
    path = data_dir() / f"value-{name}"
    return int(path.read_text()) if path.exists() else 0


def bump(name: str) -> int:
    new = value(name) + 1
    (data_dir() / f"value-{name}").write_text(str(new))
    return new


def record_render(name: str) -> None:
    with open(data_dir() / f"renders-{name}", "a") as out:
        out.write("render\n")


def tag(name: str) -> str:
    """The tag of a counter's page: revalidating it is what the tests purge by."""
    return f"counter-{name}"


async def read(name: str) -> int:
    """The counter through the data cache, tagged: its page inherits the tag."""
    reader = cached(_read, ["counter", name], tags=[tag(name)])
    return await reader.aio(name)


def _read(name: str) -> int:
    return value(name)
