"""Jinja2 templates of the site being served (``SITE/templates``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

_env: jinja2.Environment | None = None


def make_environment(template_dirs: list[Path]) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in template_dirs]),
        autoescape=jinja2.select_autoescape(("html", "htm", "xml", "j2", "jinja")),
        enable_async=False,
        auto_reload=True,
    )
    return env


def set_environment(env: jinja2.Environment | None) -> None:
    global _env
    _env = env


def render_template(name: str, **context: Any) -> str:
    """Render ``templates/<name>`` of the current site with ``context``."""
    if _env is None:
        raise RuntimeError(
            "render_template() needs a site: it is available inside pages of a pyisr site "
            "(pyisr build / start / dev, or pyisr.App)"
        )
    return _env.get_template(name).render(**context)


def has_template(name: str) -> bool:
    if _env is None:
        return False
    try:
        _env.get_template(name)
    except jinja2.TemplateNotFound:
        return False
    return True
