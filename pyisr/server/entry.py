"""Import target for servers started with several workers: ``pyisr.server.entry:app``.

Each worker process imports this module and builds its own ``App`` from the
environment the CLI prepared (``PYISR_SITE``, ``PYISR_DEV``).
"""

from __future__ import annotations

import os

from pyisr.server.app import App


def create_app() -> App:
    site = os.environ.get("PYISR_SITE")
    if not site:
        raise RuntimeError("PYISR_SITE is not set: start the server with `pyisr start SITE`")
    return App(site, dev=os.environ.get("PYISR_DEV") == "1", require_build=os.environ.get("PYISR_DEV") != "1")
