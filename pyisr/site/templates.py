"""Jinja2 templates of a site (``SITE/templates``), and ``render_template`` for its pages.

Each site has its own environment; it is the current one while that site renders (a
context variable the server sets for each request and each route sets for each render),
so two sites in one process never render each other's templates, and loading a site
changes nothing global.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from pathlib import Path
from typing import Any

import jinja2

_current: ContextVar[jinja2.Environment | None] = ContextVar("pyisr_templates", default=None)


def make_environment(template_dirs: list[Path]) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in template_dirs]),
        autoescape=jinja2.select_autoescape(("html", "htm", "xml", "j2", "jinja")),
        enable_async=False,
        auto_reload=True,
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
