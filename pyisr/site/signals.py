"""``not_found()`` and ``redirect()``: the App Router's ``notFound()`` / ``redirect()``.

They raise, so a page can stop rendering from any depth; the result is cached like
the page's own output, with the page's revalidate.
"""

from __future__ import annotations

from typing import NoReturn


class NotFoundSignal(Exception):
    """Raised by :func:`not_found`; becomes a cached 404."""


class RedirectSignal(Exception):
    """Raised by :func:`redirect`; becomes a cached 307 or 308."""

    def __init__(self, destination: str, permanent: bool) -> None:
        super().__init__(destination)
        self.destination = destination
        self.permanent = permanent


def not_found() -> NoReturn:
    """Answer this page with the 404 page (cached with the page's revalidate)."""
    raise NotFoundSignal()


def redirect(destination: str, permanent: bool = False) -> NoReturn:
    """Answer this page with a redirect: 307, or 308 when ``permanent``."""
    if not isinstance(destination, str) or not destination:
        raise ValueError(f"redirect() needs a destination URL, not {destination!r}")
    raise RedirectSignal(destination, permanent)
