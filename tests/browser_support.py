"""The system Chromium for the browser tests, driven by playwright.

It never downloads a browser (no ``playwright install``): Debian's ``chromium`` is used
as it is. Without it or the ``playwright`` package a browser test module is skipped,
except under ``CI=true``, where a skip is a failure.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require_browser() -> None:
    """Skip the calling test module when no browser can run (fail instead under CI)."""
    if not CHROMIUM.exists():
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    elif importlib.util.find_spec("playwright") is None:
        missing = "the playwright package is not installed (pip install playwright)"
    else:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(missing, pytrace=False)
    pytest.skip(missing, allow_module_level=True)


@contextmanager
def launched_chromium() -> Iterator[Any]:
    """A headless Chromium for one module's tests, closed after them."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()
