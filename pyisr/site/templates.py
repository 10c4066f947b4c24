"""Jinja2 templates of a site (``SITE/templates``), and ``render_template`` for its pages.

Each site has its own environment; it is the current one while that site renders (a
context variable the server sets for each request and each route sets for each render),
so two sites in one process never render each other's templates, and loading a site
changes nothing global.

A served site's templates are read once, when the site is loaded (a snapshot of their
sources, :class:`SnapshotLoader`), and compiled from that snapshot at first use: a server
keeps rendering the templates of the build it started with even after ``pyisr build``
changed the files for the next build. Only ``pyisr dev`` reads them from disk at each
use (``live``), to show edits at once. Why not compile them all at start-up: Jinja
compiles ~100 templates of 4 kB a second, so a site of 500 would delay every worker's
start by 5 s, where reading their sources takes ~12 ms.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from pathlib import Path
from typing import Any

import jinja2
from jinja2.loaders import split_template_path

_current: ContextVar[jinja2.Environment | None] = ContextVar("pyisr_templates", default=None)

_AUTOESCAPE = ("html", "htm", "xml", "j2", "jinja")


class SnapshotLoader(jinja2.BaseLoader):
    """Every template's source as it was on disk when the site was loaded."""

    def __init__(self, sources: dict[str, tuple[str, str | None]]) -> None:
        self._sources = sources

    @classmethod
    def read(cls, template_dirs: list[Path]) -> SnapshotLoader:
        """Read every template under ``template_dirs`` (the first directory wins, as Jinja's).

        Files that are not UTF-8 text (an image beside the templates) are left out: they
        could not be rendered either.
        """
        disk = jinja2.FileSystemLoader([str(d) for d in template_dirs])
        probe = jinja2.Environment()
        sources: dict[str, tuple[str, str | None]] = {}
        for name in disk.list_templates():
            try:
                source, filename, _ = disk.get_source(probe, name)
            except (UnicodeDecodeError, jinja2.TemplateNotFound, OSError):
                continue
            sources[name] = (source, filename)
        return cls(sources)

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool]]:
        try:
            source, filename = self._sources["/".join(split_template_path(template))]
        except KeyError:
            raise jinja2.TemplateNotFound(template) from None
        return source, filename, lambda: True

    def list_templates(self) -> list[str]:
        return sorted(self._sources)


def make_environment(template_dirs: list[Path], *, live: bool = True) -> jinja2.Environment:
    """The site's environment: ``live`` reads the files at each use (dev), else a snapshot."""
    if live:
        return jinja2.Environment(
            loader=jinja2.FileSystemLoader([str(d) for d in template_dirs]),
            autoescape=jinja2.select_autoescape(_AUTOESCAPE),
            enable_async=False,
            auto_reload=True,
        )
    return jinja2.Environment(
        loader=SnapshotLoader.read(template_dirs),
        autoescape=jinja2.select_autoescape(_AUTOESCAPE),
        enable_async=False,
        auto_reload=False,
        cache_size=-1,  # a template compiled stays compiled: the set is the site's, fixed at load
    )


def use(env: jinja2.Environment | None) -> Token[jinja2.Environment | None]:
    """Make ``env`` the current site's templates (until :func:`reset` with the token)."""
    return _current.set(env)


def reset(token: Token[jinja2.Environment | None]) -> None:
    _current.reset(token)


def render_template(name: str, **context: Any) -> str:
    """Render ``templates/<name>`` of the site being rendered with ``context``."""
    env = _current.get()
    if env is None:
        raise RuntimeError(
            "render_template() needs a site: it is available inside pages of a pyisr site "
            "(pyisr build / start / dev, or pyisr.App)"
        )
    return env.get_template(name).render(**context)


def has_template(name: str) -> bool:
    env = _current.get()
    if env is None:
        return False
    try:
        env.get_template(name)
    except jinja2.TemplateNotFound:
        return False
    return True
